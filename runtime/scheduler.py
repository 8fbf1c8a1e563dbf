"""The one execution model of the runtime: a table of slots, one image each, stepped together.

Every generation runs here: `Pipeline.generate`, `maskbit-run sample` and the server submit `ImageJob`s. Each
iteration (`Scheduler.iterate`):
1. drops cancelled rows and admits waiting images into free slots (FIFO), writing fully masked tokens into
   their rows on the device;
2. runs one step over the occupied rows of each lane (one lane per step graph: guided, and unguided for the steps
   of images with guidance 0 or outside their guidance interval), every row with its own label, noise and settings
   (step graphs of bundle format 3 take the four settings per row);
3. retires rows that took their last step to one batched combine + decode, and decodes previews of rows that
   asked for one at this step; then moves the last rows into the holes, so the occupied rows stay 0..n-1;
4. moves the rows whose next step runs on the other graph to the other lane (a device copy of their token state).
   An image that will still move keeps a row reserved in the other lane, so the move always finds room.

An image's tokens depend only on its own row: its label, its settings' plan and its noise stream, seeded by
(seed, index). So an image is the same whichever other images share its steps and whenever it was admitted.

Bundles of format 1-2 take the settings as scalars: a lane then admits images only while it is empty and only
ones with equal settings, which is batch-at-a-time generation (a batch that will move holds the whole other lane).
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .backends.base import Executor, copy_rows
from .lanes import Lane, Slot
from .noise import ImageNoise
from .sampling import SamplingSettings
from .schedules import StepParams
from .specs import DECODER, STEP, STEP_UNGUIDED


@dataclass(eq=False)
class ImageJob:
    """One image to make, and what became of it. Set `cancelled` from any thread; the row is freed at the next
    step boundary. Callbacks run on the scheduler's thread."""

    label: int
    seed: int
    index: int                                 # the image's noise stream is (seed, index)
    settings: SamplingSettings
    preview_every: int = 0                     # decode a preview every k steps (0: none)
    on_step: Callable[[ImageJob], None] | None = None
    on_preview: Callable[[ImageJob, np.ndarray], None] | None = None
    on_done: Callable[[ImageJob], None] | None = None
    step: int = 0                              # steps taken
    image: np.ndarray | None = None            # uint8 [H, W, 3] when done
    tokens: np.ndarray | None = None           # int64 [h, w] when done
    error: BaseException | None = None
    cancelled: bool = False
    done: bool = False
    arrival: int = 0                           # set by `submit`: the order images came in

    @property
    def num_steps(self) -> int:
        return self.settings.num_steps


class Scheduler:
    """Slots over one executor. `submit` may be called from any thread; `iterate` (or `run`) from one."""

    def __init__(self, executor: Executor, capacity: int | None = None):
        manifest = executor.manifest
        self.executor = executor
        limit = manifest.max_batch(STEP.name)
        self.capacity = min(capacity or limit, limit)
        self.decode_batch = manifest.max_batch(DECODER.name)
        self.has_unguided = STEP_UNGUIDED.name in manifest.components
        self.waiting = {True: collections.deque(), False: collections.deque()}   # by lane (guided or not), FIFO
        self.lock = threading.Lock()
        self._cancelled_waiting = False
        self.num_groups = manifest.dims.num_tokens * manifest.dims.num_groups
        self.noise_shape = (manifest.dims.num_tokens, manifest.dims.num_groups, 2)
        self._plans: dict[SamplingSettings, list[StepParams]] = {}
        self._orders: dict[str, np.ndarray | None] = {}
        self._arrivals = itertools.count()

    def lane(self, guided: bool) -> Lane:
        spec = STEP if guided or not self.has_unguided else STEP_UNGUIDED
        key = (spec.name, self.capacity)
        lanes = self.executor.lanes
        if key not in lanes:
            lanes[key] = Lane(self.executor, self.executor.manifest.spec(spec.name), self.capacity)
        return lanes[key]

    def lanes(self) -> list[Lane]:
        return [lane for (_, capacity), lane in self.executor.lanes.items() if capacity == self.capacity]

    def _existing(self, guided: bool) -> Lane | None:
        spec = STEP if guided or not self.has_unguided else STEP_UNGUIDED
        return self.executor.lanes.get((spec.name, self.capacity))

    def _load(self, guided: bool) -> int:
        """Rows of a lane taken: its images and the rows reserved for images of the other lane that will move in."""
        here, there = self._existing(guided), self._existing(not guided) if self.has_unguided else None
        return (len(here.slots) if here else 0) + (sum(s.reserves(guided) for s in there.slots) if there else 0)

    @property
    def occupied(self) -> int:
        return sum(len(lane.slots) for lane in self.lanes())

    @property
    def queued(self) -> int:
        return sum(map(len, self.waiting.values()))

    def idle(self) -> bool:
        return not self.queued and not self.occupied

    def submit(self, jobs: Sequence[ImageJob]) -> None:
        with self.lock:
            for job in jobs:
                job.arrival = next(self._arrivals)
                self.waiting[self._guided(job)].append(job)

    def cancel(self, job: ImageJob) -> None:
        """Free the job's slot (or its place in the queue) at the next step boundary."""
        with self.lock:
            job.cancelled = True
            self._cancelled_waiting = True

    def would_wait(self, jobs: Sequence[ImageJob] = ()) -> int:
        """Images that would still wait for a slot if the queue, plus `jobs`, were admitted now: counted per lane,
        since a free slot of one lane is no room for an image of the other."""
        with self.lock:
            waiting = {guided: len(queue) for guided, queue in self.waiting.items()}
        for job in jobs:
            waiting[self._guided(job)] += 1
        return sum(max(0, count - (self.capacity - self._load(guided))) for guided, count in waiting.items())

    def remaining_steps(self) -> int:
        """Steps left to take by every image in a slot or waiting for one."""
        with self.lock:
            waiting = sum(job.num_steps for queue in self.waiting.values() for job in queue)
        return waiting + sum(slot.job.num_steps - slot.job.step for lane in self.lanes() for slot in lane.slots)

    def _guided(self, job: ImageJob) -> bool:
        """The lane of the job's next step (the guided one for every step when the bundle has no unguided graph)."""
        return self.plan(job.settings)[job.step].guided or not self.has_unguided

    def plan(self, settings: SamplingSettings) -> list[StepParams]:
        if settings not in self._plans:
            self._plans[settings] = settings.plan(self.num_groups)
        return self._plans[settings]

    def _slot(self, job: ImageJob) -> Slot:
        plan, order = self.plan(job.settings), job.settings.unmask_order
        if order not in self._orders:
            self._orders[order] = job.settings.order_noise(*self.noise_shape[:2])
        last = {guided: max((i for i, p in enumerate(plan) if (p.guided or not self.has_unguided) == guided),
                            default=-1) for guided in (True, False)}
        return Slot(job, plan, ImageNoise(job.seed, job.index, self.noise_shape, self._orders[order]), last)

    # -- the iteration ------------------------------------------------------------------------------------------
    def iterate(self) -> list[ImageJob]:
        """Admit, step every non-empty lane once, retire; returns the jobs that ended (done, failed, cancelled).
        Iterations of schedulers over one executor (which share its lanes) never overlap (`executor.lock`)."""
        with self.executor.lock:
            ended = self._drop_cancelled() + self._admit()
            for lane in self.lanes():
                if not lane.slots:
                    continue
                try:
                    lane.step()
                    ended += self._retire(lane)
                except Exception as exc:  # a backend failure ends only the images it touched
                    ended += lane.fail(exc)
            ended += self._switch_lanes()
        for job in ended:
            job.done = True
            _callback(job, job.on_done, job)
        return ended

    def run(self, jobs: Sequence[ImageJob], on_iteration: Callable[[int], None] | None = None) -> None:
        """Submit `jobs` (a few slots' worth ahead at a time, so a long list costs no more host memory than its
        results) and iterate until all of them ended; raises the first failed job's error."""
        mine, remaining, submitted, iteration = {id(job) for job in jobs}, len(jobs), 0, 0
        try:
            while remaining:
                if self.queued < 2 * self.capacity and submitted < len(jobs):
                    self.submit(jobs[submitted:submitted + 2 * self.capacity])
                    submitted += 2 * self.capacity
                remaining -= sum(id(job) in mine for job in self.iterate())
                if on_iteration is not None:
                    on_iteration(iteration)
                iteration += 1
        finally:
            if remaining:        # left early (an exception, a KeyboardInterrupt): free this call's slots now
                for job in jobs[:submitted]:
                    if not job.done:
                        self.cancel(job)
                self.iterate()
        failed = next((job for job in jobs if job.error is not None), None)
        if failed is not None:
            raise failed.error

    def _drop_cancelled(self) -> list[ImageJob]:
        ended = []
        with self.lock:
            if self._cancelled_waiting:
                for queue in self.waiting.values():
                    ended += [job for job in queue if job.cancelled]
                    kept = [job for job in queue if not job.cancelled]
                    queue.clear()
                    queue.extend(kept)
                self._cancelled_waiting = False
        for lane in self.lanes():
            rows = [r for r, slot in enumerate(lane.slots) if slot.job.cancelled]
            if rows:
                ended += [lane.slots[r].job for r in rows]
                lane.remove(rows)
        return ended

    def _admit(self) -> list[ImageJob]:
        """FIFO per lane: the oldest waiting images go into free slots (an image of one lane never waits for
        room in the other, unless it will move there: then it waits for a row to reserve there too)."""
        ended = []
        for guided in self._admission_order():
            queue = self.waiting[guided]
            pending: list[Slot] = []
            lane = None
            with self.lock:
                while queue:
                    job = queue[0]
                    try:
                        lane = lane or self.lane(guided)
                        slot = self._slot(job)
                        if not self._room(guided, slot, pending):
                            break
                    except Exception as exc:  # buffers that cannot be made: this image fails, the rest go on
                        job.error = exc
                        ended.append(queue.popleft())
                        continue
                    queue.popleft()
                    pending.append(slot)
            if pending:
                try:
                    lane.admit(pending)
                except Exception as exc:  # the rows could not be written: these images fail, the rest go on
                    for slot in pending:
                        slot.job.error = exc
                    ended += [slot.job for slot in pending]
        return ended

    def _room(self, guided: bool, slot: Slot, pending: list[Slot]) -> bool:
        """Room in the image's first lane and, if it will move, a row to reserve in the other lane."""
        there = self._existing(not guided) if self.has_unguided else None
        reserved = sum(s.reserves(guided) for s in there.slots) if there else 0
        if not self.lane(guided).fits(slot.job, pending, reserved):
            return False
        if not self.has_unguided or not slot.reserves(not guided):
            return True
        moving = sum(s.reserves(not guided) for s in self.lane(guided).slots + pending) + 1
        return self.lane(not guided).can_hold(moving)

    def _admission_order(self) -> list[bool]:
        """The lanes' queues in the order they take free rows: the one whose first image came first goes first, so
        an image that will move to the other lane is not passed there by images that came later (it reserves a row
        there; under a steady stream of those it would wait forever)."""
        with self.lock:
            first = {guided: queue[0].arrival if queue else -1 for guided, queue in self.waiting.items()}
        return sorted(self.waiting, key=first.get)

    def _switch_lanes(self) -> list[ImageJob]:
        """Move the rows whose next step runs on the other graph (reserved rows: there is always room)."""
        ended = []
        for guided in (True, False) if self.has_unguided else ():
            lane = self._existing(guided)
            rows = [r for r, s in enumerate(lane.slots) if self._guided(s.job) != guided] if lane else []
            if rows:
                try:
                    lane.move(rows, self.lane(not guided))
                except Exception as exc:  # the copy failed: these images fail, the rest go on
                    jobs = [lane.slots[r].job for r in rows]
                    lane.remove(rows)
                    for job in jobs:
                        job.error = exc
                    ended += jobs
        return ended

    def _retire(self, lane: Lane) -> list[ImageJob]:
        """Decode rows that took their last step (and previews due now); free the finished rows."""
        finished = [r for r, s in enumerate(lane.slots) if s.job.step >= s.job.num_steps]
        previews = [r for r, s in enumerate(lane.slots) if s.job.preview_every and s.job.step < s.job.num_steps
                    and s.job.step % s.job.preview_every == 0 and s.job.on_preview is not None]
        for slot in lane.slots:
            _callback(slot.job, slot.job.on_step, slot.job)
        rows = finished + previews
        for start in range(0, len(rows), self.decode_batch):
            part = rows[start:start + self.decode_batch]
            # buffers for a power-of-two number of rows: a few sizes serve every count (the padding rows decode
            # whatever they hold, and are not returned)
            finisher = self.executor.finisher(min(1 << (len(part) - 1).bit_length(), self.decode_batch))
            copy_rows(lane.primitives, finisher.groups, lane.sampled, list(enumerate(part)))
            images, indices = finisher.run()
            for i, r in enumerate(part):
                job = lane.slots[r].job
                if r in finished:
                    job.image, job.tokens = images[i], indices[i]
                else:
                    _callback(job, job.on_preview, job, images[i])
        ended = [lane.slots[r].job for r in finished]
        if finished:
            lane.remove(finished)
        return ended


def _callback(job: ImageJob, callback: Callable | None, *args) -> None:
    """Run one job's callback; if it raises, that job alone fails (its slot is freed at the next step boundary),
    never the other images of its lane."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception as exc:  # the caller's code: any exception ends only this image
        if job.error is None:
            job.error = exc
        job.cancelled = True
