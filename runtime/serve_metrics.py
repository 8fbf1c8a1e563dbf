"""The serving engine's Prometheus metrics (one registry per server, so servers in one process stay apart)."""

from __future__ import annotations

from .errors import MissingDependencyError
from .serve import Engine, Observer, Request

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
except ImportError:
    raise MissingDependencyError("maskbit-run serve needs prometheus_client: pip install 'maskbit[serve]'") from None

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)


class Metrics(Observer):
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.queued = Gauge("maskbit_queued_images", "Images waiting for a slot", registry=registry)
        self.occupied = Gauge("maskbit_occupied_slots", "Slots holding an image", registry=registry)
        self.slots = Gauge("maskbit_slots", "Slots (images stepped together at most)", registry=registry)
        self.in_flight = Gauge("maskbit_requests_in_flight", "Requests queued or running", registry=registry)
        self.ready = Gauge("maskbit_ready", "1 when warmed up and admitting requests", registry=registry)
        self.step = Histogram("maskbit_step_seconds", "One scheduler iteration: a step over the occupied slots, "
                              "admission and decodes", buckets=STEP_BUCKETS, registry=registry)
        self.slot_steps = Counter("maskbit_slot_steps", "Image-steps run (occupancy = rate / (step rate x slots))",
                                  registry=registry)
        self.latency = Histogram("maskbit_request_seconds", "Request latency by phase: queued (until its first "
                                 "image was admitted), computing (from then to the end), total",
                                 ["phase"], buckets=LATENCY_BUCKETS, registry=registry)
        self.requests = Counter("maskbit_requests", "Requests that ended, by status", ["status"], registry=registry)
        self.images = Counter("maskbit_images", "Images that ended, by outcome", ["outcome"], registry=registry)
        self.rejections = Counter("maskbit_rejections", "Requests refused, by reason", ["reason"], registry=registry)
        for reason in ("queue_full", "draining", "too_large", "invalid"):
            self.rejections.labels(reason)
        for outcome in ("done", "failed", "cancelled"):
            self.images.labels(outcome)

    def bind(self, engine: Engine) -> None:
        self.queued.set_function(lambda: engine.queued)
        self.occupied.set_function(lambda: engine.occupied)
        self.slots.set(engine.capacity)
        self.in_flight.set_function(lambda: engine.in_flight)
        self.ready.set_function(lambda: float(engine.ready and not engine.draining))

    # -- Observer -----------------------------------------------------------------------------------------------
    def iteration(self, seconds: float, rows: int) -> None:
        self.step.observe(seconds)
        self.slot_steps.inc(rows)

    def image_ended(self, outcome: str) -> None:
        self.images.labels(outcome).inc()

    def request_ended(self, request: Request) -> None:
        self.requests.labels(request.status).inc()
        self.latency.labels("queued").observe(request.queued_seconds)
        self.latency.labels("computing").observe(request.computing_seconds)
        self.latency.labels("total").observe(request.queued_seconds + request.computing_seconds)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()
