"""The serving engine: one Pipeline, one slot Scheduler, one thread that steps it; no HTTP here (`serve_app.py`).

Requests come from any thread (`Engine.submit`); each image of a request becomes an `ImageJob(label_j, seed,
first_index + j, settings)`, exactly the job `Pipeline.generate` makes, so a served image equals its offline one
byte for byte whatever shares its steps. The loop thread sleeps while the scheduler is idle and wakes on submit or
cancel; between two steps it expires deadlines and frees the slots of cancelled requests.

A request ends once: `done` (every image made), `failed` (a backend failure touched one of its images: its
other images are cancelled, other requests go on), `cancelled` (the client left), `expired` (its deadline
passed) or `shutdown` (still running when the server stopped). Admission is refused while draining and when the
images waiting for a slot would exceed `max_queue` (`Overloaded`, with a retry-after estimate); a request of more
images than could ever be admitted is `TooLarge`.

`policy` says when accepted requests reach the scheduler: "step" (the default) at the next step boundary, into
any free slot; "request" as a dynamic batch (up to the slots' worth of images, or what arrived within
`batch_wait` seconds) that runs to its end before the next batch starts (request-level batching, as Triton's
dynamic batcher or Ray Serve's `@serve.batch` do); "single" one request at a time. The last two exist to be
measured against (`benchmarks/serve_load.py`).
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError, MaskbitError
from .generation import check_labels
from .noise import check_seed
from .pipeline import Pipeline
from .sampling import SamplingSettings
from .scheduler import ImageJob, Scheduler

POLICIES = ("step", "request", "single")   # when images join: any step boundary (the scheduler), a dynamic batch
#                                             run to its end (request-level batching), one request at a time
ADMISSIONS = ("fifo", "shortest")   # with policy "step": which accepted requests take free slots first (arrival
#                                     order, or fewest steps first: measured in benchmarks/serve_load.py)
MAX_PREVIEWS = 16            # decoded previews per image at most: preview_every >= ceil(num_steps / 16)


class Overloaded(MaskbitError):
    """The queue is full or the server is draining; retry after `retry_after` seconds."""

    def __init__(self, message: str, reason: str, retry_after: int):
        super().__init__(message)
        self.reason, self.retry_after = reason, retry_after


class TooLarge(InputError):
    """More images in one request than this server admits."""


class Observer:
    """What the engine reports (the HTTP layer turns it into Prometheus metrics); every method may be left as is."""

    def iteration(self, seconds: float, rows: int) -> None: ...

    def image_ended(self, outcome: str) -> None: ...

    def request_ended(self, request: Request) -> None: ...

    def rejected(self, reason: str) -> None: ...


@dataclass(eq=False)
class Request:
    """One client request: its images' jobs and how it ended. `on_event(kind, data)` runs on the engine thread
    with kind "progress" ({"steps": [per image], "num_steps": n}), "preview" ({"image": j, "step": s,
    "pixels": uint8 [H,W,3]}) or "end" (the request itself)."""

    labels: list[int]
    seed: int
    first_index: int
    settings: SamplingSettings
    preview_every: int = 0
    timeout: float | None = None
    on_event: Callable[[str, Any], None] | None = None
    jobs: list[ImageJob] = field(default_factory=list)
    created: float = 0.0
    started: float | None = None         # the start of the iteration that admitted its first image
    finished: float | None = None
    deadline: float | None = None
    status: str = "queued"               # running, then done | failed | cancelled | expired | shutdown
    error: str | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    _progressed: bool = False

    @property
    def images(self) -> np.ndarray:
        return np.stack([job.image for job in self.jobs])

    @property
    def tokens(self) -> np.ndarray:
        return np.stack([job.tokens for job in self.jobs])

    @property
    def queued_seconds(self) -> float:
        end = self.started if self.started is not None else self.finished
        return max(0.0, (end or time.monotonic()) - self.created)

    @property
    def computing_seconds(self) -> float:
        if self.started is None:
            return 0.0
        return max(0.0, (self.finished or time.monotonic()) - self.started)


class Engine:
    """`Engine(pipeline).start()`, then `submit(Request)` from any thread; `drain()` + `stop()` to end."""

    def __init__(self, pipeline: Pipeline, max_batch: int | None = None, max_queue: int = 256,
                 max_images: int = 64, request_timeout: float | None = 300.0, observer: Observer | None = None,
                 policy: str = "step", batch_wait: float = 0.05, admission: str = "fifo"):
        if not pipeline.manifest.has_generator:
            raise InputError(f"bundle {pipeline.manifest.root} has no generator: nothing to serve")
        for name, value in (("max_queue", max_queue), ("max_images", max_images)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "max_images" else 0):
                raise InputError(f"{name} must be an integer >= {1 if name == 'max_images' else 0}, got {value!r}")
        if request_timeout is not None and not (math.isfinite(request_timeout) and request_timeout > 0):
            raise InputError(f"request timeout must be a finite number of seconds > 0, got {request_timeout!r}")
        if policy not in POLICIES:
            raise InputError(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
        if admission not in ADMISSIONS:
            raise InputError(f"admission {admission!r} is not one of {', '.join(ADMISSIONS)}")
        self.pipeline = pipeline
        self.policy, self.batch_wait, self.admission = policy, batch_wait, admission
        self.scheduler = Scheduler(pipeline.backend, pipeline._batch_size(max_batch, "step"))
        self.capacity = self.scheduler.capacity
        self.max_queue, self.request_timeout = max_queue, request_timeout
        self.max_images = min(max_images, max_queue + self.capacity)
        self.observer = observer or Observer()
        self.ready = False
        self.draining = False
        self.step_seconds = 0.05             # running mean of one iteration, for Retry-After
        self._active: list[Request] = []
        self._pending: collections.deque[Request] = collections.deque()    # accepted, not yet in the scheduler
        self._rows = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._iteration_start = 0.0

    # -- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Warm up (one tiny guided and one unguided image, with a preview: every session and buffer the first
        request needs exists afterwards), then start the loop thread."""
        settings = self.pipeline.sampling.with_overrides(num_steps=2)
        jobs = [ImageJob(0, 0, 0, settings, preview_every=1, on_preview=lambda job, image: None),
                ImageJob(0, 0, 1, settings.with_overrides(guidance_scale=0.0))]
        begin = time.monotonic()
        self.scheduler.run(jobs)
        self.step_seconds = (time.monotonic() - begin) / 4
        self._thread = threading.Thread(target=self._loop, name="maskbit-engine", daemon=True)
        self._thread.start()
        self.ready = True
        return self

    def drain(self) -> None:
        """Refuse new requests from now on (running and queued ones go on)."""
        self.draining = True

    def stop(self, grace: float = 0.0) -> None:
        """Drain, wait up to `grace` seconds for the requests in flight, end the rest as `shutdown`, stop."""
        self.drain()
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        for request in list(self._active):
            self._end(request, "shutdown", "the server shut down before the request finished")
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.ready = False

    @property
    def alive(self) -> bool:
        """Started and its loop thread running (a health check's question)."""
        return self.ready and self._thread is not None and self._thread.is_alive()

    # -- requests -----------------------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        """Images waiting for a slot."""
        with self._wake:                         # reentrant: `submit` asks while holding it
            return self.scheduler.queued + sum(len(r.jobs) for r in self._pending)

    @property
    def occupied(self) -> int:
        return self.scheduler.occupied

    def request(self, labels: Sequence[int], seed: int = 0, first_index: int = 0, preview_every: int = 0,
                timeout: float | None = None, on_event: Callable[[str, Any], None] | None = None,
                **sampling) -> Request:
        """A checked request (labels as indices; unset sampling settings from the bundle); InputError if bad."""
        labels = [int(x) for x in check_labels(list(labels), self.pipeline.num_classes)]
        if len(labels) > self.max_images:
            raise TooLarge(f"{len(labels)} images in one request; this server takes at most {self.max_images}")
        if isinstance(first_index, bool) or not isinstance(first_index, int) or not 0 <= first_index < 2 ** 63:
            raise InputError(f"first_index must be an integer in [0, 2**63), got {first_index!r}")
        settings = self.pipeline.sampling.with_overrides(**sampling)
        if isinstance(preview_every, bool) or not isinstance(preview_every, int) or preview_every < 0:
            raise InputError(f"preview_every must be an integer >= 0, got {preview_every!r}")
        least = math.ceil(settings.num_steps / MAX_PREVIEWS)
        if preview_every and not least <= preview_every <= settings.num_steps:
            raise InputError(f"preview_every must be 0 or in [{least}, {settings.num_steps}] for {settings.num_steps} "
                             f"steps (at most {MAX_PREVIEWS} previews per image), got {preview_every}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise InputError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        limit = self.request_timeout
        timeout = min(timeout, limit) if timeout is not None and limit is not None else (timeout or limit)
        return Request(labels, check_seed(seed), first_index, settings, preview_every, timeout, on_event)

    def submit(self, request: Request) -> Request:
        """Queue the request's images; raises Overloaded when draining or when the queue is full."""
        with self._wake:
            if self.draining or self._stopping:
                self.observer.rejected("draining")
                raise Overloaded("the server is shutting down", "draining", self.retry_after())
            jobs = [self._job(request, j, label) for j, label in enumerate(request.labels)]
            if self.scheduler.would_wait([job for r in self._pending for job in r.jobs] + jobs) > self.max_queue:
                self.observer.rejected("queue_full")
                raise Overloaded(f"the queue is full ({self.queued} images waiting, at most "
                                 f"{self.max_queue})", "queue_full", self.retry_after())
            request.created = time.monotonic()
            if request.timeout is not None:
                request.deadline = request.created + request.timeout
            request.jobs = jobs
            self._active.append(request)
            self._pending.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request, status: str = "cancelled", reason: str = "cancelled by the client") -> None:
        """End the request now; its slots are freed at the next step boundary. No-op once it ended."""
        self._end(request, status, reason)

    def retry_after(self) -> int:
        """Seconds until the work ahead is likely done: the steps left of every image in a slot or waiting (the
        pending requests' too), over the slots, times one iteration."""
        with self._wake:
            pending = sum(len(r.jobs) * r.settings.num_steps for r in self._pending)
        steps = self.scheduler.remaining_steps() + pending
        return max(1, math.ceil(steps / self.capacity * self.step_seconds))

    # -- the loop -----------------------------------------------------------------------------------------------
    def _job(self, request: Request, j: int, label: int) -> ImageJob:
        preview = (lambda job, image, j=j: self._emit(request, "preview", {"image": j, "step": job.step,
                                                                          "pixels": image.copy()}))
        return ImageJob(label, request.seed, request.first_index + j, request.settings,
                        preview_every=request.preview_every, on_step=lambda job: self._stepped(request),
                        on_preview=preview if request.preview_every else None,
                        on_done=lambda job: self._job_ended(request, job))

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping:
                    wait = self._release()
                    if not self.scheduler.idle():
                        break
                    self._wake.wait(timeout=wait)
                if self._stopping:
                    return
            self._expire()
            self._iteration_start = begin = time.monotonic()
            self._rows = 0
            try:
                self.scheduler.iterate()
            except Exception as exc:  # a bug outside the backend: fail what is in flight, keep serving
                for request in list(self._active):
                    self._end(request, "failed", f"internal error: {type(exc).__name__}: {exc}")
                continue
            seconds = time.monotonic() - begin
            if self._rows:
                self.step_seconds = 0.9 * self.step_seconds + 0.1 * seconds
                self.observer.iteration(seconds, self._rows)
            for request in list(self._active):
                if request._progressed:
                    request._progressed = False
                    self._emit(request, "progress", self._progress(request))

    @staticmethod
    def _progress(request: Request) -> dict:
        return {"steps": [job.step for job in request.jobs], "num_steps": request.settings.num_steps}

    def _expire(self) -> None:
        now = time.monotonic()
        for request in list(self._active):
            if request.deadline is not None and now >= request.deadline:
                self._end(request, "expired", f"deadline of {request.timeout:g} s exceeded "
                                              f"({request.queued_seconds:.2f} s of it queued)")

    def _release(self) -> float | None:
        """Hand accepted requests to the scheduler as the policy says (the caller holds `_wake`); returns how long
        the loop may sleep before a dynamic batch is due (None: until woken)."""
        pending = self._pending
        if self.policy == "step" and self.admission == "fifo":
            while pending:
                self.scheduler.submit(pending.popleft().jobs)
            return None
        if self.policy == "step":        # shortest first: requests of fewest steps take the slots free now
            for request in sorted(pending, key=lambda r: r.settings.num_steps):
                if self.scheduler.would_wait(request.jobs) < len(request.jobs):
                    pending.remove(request)
                    self.scheduler.submit(request.jobs)
            return None
        if not pending or not self.scheduler.idle():
            return None
        if self.policy == "single":
            self.scheduler.submit(pending.popleft().jobs)
            return None
        age = time.monotonic() - pending[0].created             # "request": a dynamic batch, run to its end
        if sum(len(r.jobs) for r in pending) < self.capacity and age < self.batch_wait:
            return self.batch_wait - age
        taken = 0
        while pending and (taken == 0 or taken + len(pending[0].jobs) <= self.capacity):
            request = pending.popleft()
            taken += len(request.jobs)
            self.scheduler.submit(request.jobs)
        return None

    def _stepped(self, request: Request) -> None:
        self._rows += 1
        if request.started is None:
            request.started = self._iteration_start
            request.status = "running"
        request._progressed = True

    def _job_ended(self, request: Request, job: ImageJob) -> None:
        outcome = "cancelled" if job.cancelled else "failed" if job.error is not None else "done"
        self.observer.image_ended(outcome)
        if job.error is not None and not job.cancelled:
            reason = str(job.error).splitlines()[0] if str(job.error) else type(job.error).__name__
            self._end(request, "failed", f"generation failed: {reason}")
        elif all(j.done or j is job for j in request.jobs) and not any(j.cancelled for j in request.jobs):
            self._end(request, "done", None)

    def _emit(self, request: Request, kind: str, data: Any, ending: bool = False) -> None:
        if request.on_event is not None and (request.finished is None or ending):
            with contextlib.suppress(Exception):    # a listener that is gone (its loop closed) stops nobody else
                request.on_event(kind, data)

    def _end(self, request: Request, status: str, error: str | None) -> None:
        with self._wake:
            if request.finished is not None:
                return
            request.finished = time.monotonic()
            request.status, request.error = status, error
            if request in self._active:
                self._active.remove(request)
            if request in self._pending:
                self._pending.remove(request)
            if status != "done":
                for job in request.jobs:
                    if not job.done:
                        self.scheduler.cancel(job)
            self._wake.notify()
        self.observer.request_ended(request)
        if request._progressed and status == "done":          # its last step's progress, before the end
            request._progressed = False
            self._emit(request, "progress", self._progress(request), ending=True)
        self._emit(request, "end", request, ending=True)
        request.ended.set()
