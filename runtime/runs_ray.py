"""Ray as the distributed engine of sample runs (`maskbit-run sample --ray`); imported only when Ray is asked for.

One actor per worker holds a loaded Pipeline; every chunk is one actor task that returns the chunk's tokens and
images, and this process (the driver) alone writes chunk files, each under its claim. A task whose actor
died (process killed, node lost) is handed to another actor and the dead actor is replaced; chunks are written
only from completed results, by chunk index, so no image is lost or written twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .errors import InputError, MaskbitError, require
from .chunks import claims, generate_chunk, load_run_pipeline, write_chunk
from .run_spec import RunSpec, RunStats

TASKS_PER_WORKER = 2          # one running, one queued: an actor never waits for the driver between chunks
READY_TIMEOUT_S = 300.0       # every actor placed and its pipeline loaded by then, or the run fails naming why


class RayError(MaskbitError, RuntimeError):
    """The Ray cluster cannot be reached, or its workers keep dying."""


def require_ray():
    return require("ray", "distributed", "maskbit-run sample --ray")


class ChunkWorker:
    """A Ray actor: one Pipeline, loaded once, making whole chunks."""

    def __init__(self, bundle: str, spec_json: dict, backend: str, threads: int | None, options: dict | None = None):
        self.spec = RunSpec.from_json(spec_json, "run spec")
        options = dict(options or {})
        if threads and backend == "ort":
            options["threads"] = threads
        self.pipe = load_run_pipeline(bundle, self.spec, backend, **options)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, chunk: int, batch_size: int | None):
        start = time.perf_counter()
        tokens, images = generate_chunk(self.pipe, self.spec, chunk, batch_size)
        return tokens, images, time.perf_counter() - start


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address` ('local' or None: start one here); True when this call started Ray."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if address in (None, "", "local"):
        ray.init(**options)
        return True
    check_address(address)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RayError(f"cannot join the Ray cluster at {address}: {text}") from None
    return True


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast (instead of Ray's long retries) when Ray is missing or host:port accepts no connections."""
    require_ray()
    if address in (None, "", "local", "auto"):
        return
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray {address}: expected host:port, ray://host:port or 'auto'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} "
                       f"(is `ray start --head` running there?)") from None


def default_workers(ray, gpus_per_worker: float) -> int:
    resources = ray.cluster_resources()
    if gpus_per_worker:
        count = int(resources.get("GPU", 0) // gpus_per_worker)
        if count < 1:
            raise RayError(f"the Ray cluster has {resources.get('GPU', 0):g} GPU(s); --gpus-per-worker "
                           f"{gpus_per_worker:g} fits no worker")
        return count
    return max(1, int(resources.get("CPU", 1)))


def check_resources(ray, workers: int, gpus_per_worker: float) -> None:
    """Refuse, before any actor is created, a pool the cluster cannot hold (Ray would wait for it forever)."""
    kind, each = ("GPU", gpus_per_worker) if gpus_per_worker else ("CPU", 1)
    have = float(ray.cluster_resources().get(kind, 0))
    if workers * each > have:
        free = float(ray.available_resources().get(kind, 0))
        raise RayError(f"{workers} Ray worker(s) x {each:g} {kind} ask for {workers * each:g} {kind}, but the cluster "
                       f"has {have:g} ({free:g} free); use fewer --workers"
                       + (" or a smaller --gpus-per-worker" if gpus_per_worker else ""))


def run_on_ray(out: str | Path, spec: RunSpec, todo: list[int], bundle: str | Path, stats: RunStats, *,
               backend: str = "ort", batch_size: int | None = None, address: str | None = None,
               workers: int | None = None, gpus_per_worker: float = 0, replacements: int | None = None,
               on_chunk: Callable[[int], None] | None = None,
               on_workers: Callable[[list[int]], None] | None = None, options: dict | None = None) -> None:
    """Make chunks `todo` on a pool of Ray actors; `replacements` bounds how many dead actors are replaced;
    `options` go to every worker's `Pipeline.load`."""
    ray = require_ray()
    started = connect(address)
    pool = None
    try:
        workers = workers or default_workers(ray, gpus_per_worker)
        check_resources(ray, workers, gpus_per_worker)
        pool = _Pool(ray, str(Path(bundle).resolve()), spec, backend, gpus_per_worker, workers, options)
        pids = pool.start()
        if on_workers:
            on_workers(pids)
        stats.workers = workers
        start = time.perf_counter()
        pool.drive(out, claims(out, spec, todo), batch_size, stats, on_chunk,
                   2 * workers if replacements is None else replacements)
        stats.wall_s = time.perf_counter() - start
    finally:
        if pool is not None:
            pool.close()
        if started:
            ray.shutdown()


class _Pool:
    """Actors, the tasks in flight on each, and the replacement of dead ones."""

    def __init__(self, ray, bundle: str, spec: RunSpec, backend: str, gpus: float, workers: int,
                 options: dict | None = None):
        self.ray = ray
        self.spec = spec
        self.gpus = gpus
        cpus = 0 if gpus else 1
        self.make = lambda: ray.remote(ChunkWorker).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0).remote(
            bundle, spec.to_json(), backend, None if gpus else 1, options)
        self.actors = [self.make() for _ in range(workers)]
        self.load = [0] * workers
        self.inflight = {}         # ObjectRef -> (slot, actor, chunk, claim)

    def start(self, timeout: float = READY_TIMEOUT_S) -> list[int]:
        try:
            return self.ray.get([a.pid.remote() for a in self.actors], timeout=timeout)
        except self.ray.exceptions.GetTimeoutError:
            asked = f"{self.gpus:g} GPU" if self.gpus else "1 CPU"
            raise RayError(f"{len(self.actors)} Ray worker(s) of {asked} each were not all started within "
                           f"{timeout:g} s; the cluster has {_resources(self.ray.cluster_resources())} "
                           f"({_resources(self.ray.available_resources())} free)") from None
        except self.ray.exceptions.RayError as exc:
            raise RayError(f"a Ray worker could not start: {_cause(exc)}") from None

    def drive(self, out, pending, batch_size, stats: RunStats, on_chunk, replacements: int) -> None:
        retry = deque()            # (chunk, claim, slot it failed on)

        def fill():
            while True:
                free = [s for s in range(len(self.actors)) if self.load[s] < TASKS_PER_WORKER]
                item = retry.popleft() if retry and free else (next(pending, None) if free else None)
                if item is None:
                    return
                chunk, claim, failed_on = item if len(item) == 3 else (*item, None)
                slot = min(free, key=lambda s: (s == failed_on, self.load[s], s))   # elsewhere, if possible
                ref = self.actors[slot].generate.remote(chunk, batch_size)
                self.inflight[ref] = (slot, self.actors[slot], chunk, claim)
                self.load[slot] += 1

        fill()
        while self.inflight:
            [ref], _ = self.ray.wait(list(self.inflight), num_returns=1)
            slot, actor, chunk, claim = self.inflight.pop(ref)
            self.load[slot] -= 1
            try:
                tokens, images, seconds = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as exc:     # generate() raised: a real error, not a death
                claim.release()
                raise RayError(f"chunk {chunk} failed on a Ray worker: {_cause(exc)}") from None
            except self.ray.exceptions.RayError as exc:         # actor died, node lost, object lost
                stats.retried += 1
                retry.append((chunk, claim, slot))
                if self.actors[slot] is actor:                  # first news of this death: replace the actor
                    if replacements <= 0:
                        raise RayError(f"Ray workers keep dying (last: {_cause(exc)}); rerun to resume") from None
                    replacements -= 1
                    self.actors[slot] = self.make()
                fill()
                continue
            try:
                write_chunk(out, self.spec, chunk, tokens, images)
            finally:
                claim.release()
            stats.generated.append(chunk)
            stats.compute_s += seconds
            if on_chunk:
                on_chunk(len(tokens))
            fill()

    def close(self) -> None:
        for _, _, _, claim in self.inflight.values():
            claim.release()
        for actor in self.actors:
            with contextlib.suppress(Exception):     # an actor already gone is fine
                self.ray.kill(actor)


def _resources(found: dict) -> str:
    return ", ".join(f"{float(found.get(k, 0)):g} {k}" for k in ("CPU", "GPU"))


def _cause(exc: BaseException) -> str:
    """The first informative line of a Ray error (the original exception's message when there is one)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and not hasattr(cause, "cause"):
        text = str(cause).strip()
        if text:
            return f"{type(cause).__name__}: {text.splitlines()[0]}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line and not line.startswith(("File ", "Traceback"))]
    return (errors[-1] if errors else lines[0] if lines else type(exc).__name__)[:300]
