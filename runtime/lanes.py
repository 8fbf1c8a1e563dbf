"""The slots' device side: one `Lane` per step graph (guided, unguided) holds the token state of its rows and
steps them together; a `Slot` is one image's row (its job, plan and noise stream). `scheduler.Scheduler` decides
which images go where and when."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends.base import Executor, copy_rows, put
from .noise import ImageNoise
from .schedules import StepParams
from .specs import LABELS, NEXT_TOKENS, NOISE, SAMPLED, STEP_SETTINGS, TOKENS, ComponentSpec, per_row_settings

if TYPE_CHECKING:
    from .scheduler import ImageJob


@dataclass(eq=False)
class Slot:
    job: ImageJob
    plan: Sequence[StepParams]
    noise: ImageNoise
    last_step: dict[bool, int]          # per lane (guided or not), the last step the image takes there (-1: none)

    def reserves(self, guided: bool) -> bool:
        """Whether the image still has a step to take in that lane (it keeps a row reserved there)."""
        return self.last_step[guided] >= self.job.step


class Lane:
    """The device buffers of one step graph at one capacity: token state (two buffers that ping-pong), the
    `sampled` output, the per-row inputs (two sets, one per parity, so the host fills one while a step may still
    read the other), and one binding per (occupied rows, parity), made on first use."""

    def __init__(self, executor: Executor, spec: ComponentSpec, capacity: int):
        ex, dims = executor.primitives, executor.manifest.dims
        self.executor, self.primitives, self.spec, self.capacity = executor, ex, spec, capacity
        self.per_row = per_row_settings(spec)
        shapes = {t.name: dims.resolve(t.shape, capacity) for t in spec.inputs + spec.outputs}
        allocate = lambda name: ex.allocate(shapes[name], (spec.inputs + spec.outputs)[self._index(name)].dtype)
        self.state = [allocate(TOKENS), allocate(TOKENS)]
        self.sampled = allocate(SAMPLED)
        self.inputs = [{name: allocate(name) for name in (LABELS, NOISE, *STEP_SETTINGS)} for _ in (0, 1)]
        self.masked = allocate(TOKENS)
        put(ex, self.masked, np.full(shapes[TOKENS], dims.group_classes, np.int64))
        self.bindings: dict[tuple[int, int], Any] = {}
        self.slots: list[Slot] = []
        self.parity = 0
        self.labels_stale = [True, True]      # labels change only when rows come or go

    def _index(self, name: str) -> int:
        return [t.name for t in self.spec.inputs + self.spec.outputs].index(name)

    def binding(self, rows: int, parity: int):
        key = (rows, parity)
        if key not in self.bindings:
            ex, view = self.primitives, lambda buffer: self.primitives.rows(buffer, 0, rows)
            inputs = {name: view(b) if self.per_row or name in (LABELS, NOISE) else b
                      for name, b in self.inputs[parity].items()}
            self.bindings[key] = ex.bind(self.spec.name, {TOKENS: view(self.state[parity]),
                                                          NEXT_TOKENS: view(self.state[1 - parity]),
                                                          SAMPLED: view(self.sampled), **inputs})
        return self.bindings[key]

    # -- admission ----------------------------------------------------------------------------------------------
    def fits(self, job: ImageJob, pending: list[Slot], reserved: int) -> bool:
        """Whether `job` can join the rows this lane has and the ones admitted with it (`pending`), while
        `reserved` rows are held for images of the other lane that will move here."""
        if len(self.slots) + len(pending) + reserved >= self.capacity:
            return False
        if self.per_row:
            return True
        # scalar settings (format 1-2): every row at the same step with the same plan, none about to move in
        return not reserved and all(s.job.step == 0 and s.job.settings == job.settings for s in self.slots + pending)

    def can_hold(self, rows: int) -> bool:
        """Room for `rows` images that will move in later (scalar settings: only into an empty lane)."""
        return len(self.slots) + rows <= self.capacity and (self.per_row or not self.slots)

    def admit(self, slots: list[Slot]) -> None:
        start = len(self.slots)
        self.primitives.copy(self.primitives.rows(self.state[self.parity], start, len(slots)),
                             self.primitives.rows(self.masked, 0, len(slots)))
        self.slots.extend(slots)
        self.labels_stale = [True, True]

    # -- one step -----------------------------------------------------------------------------------------------
    def step(self) -> None:
        ex, n, p = self.primitives, len(self.slots), self.parity
        inputs = self.inputs[p]
        noise = ex.staging(inputs[NOISE])
        for row, slot in enumerate(self.slots):
            slot.noise.draw(out=noise[row])
        ex.upload(inputs[NOISE], noise)
        if self.labels_stale[p]:
            put(ex, inputs[LABELS], np.array([s.job.label for s in self.slots] + [0] * (self.capacity - n)))
            self.labels_stale[p] = False
        for name in STEP_SETTINGS:
            host = ex.staging(inputs[name])
            if self.per_row:
                host[:n] = [getattr(s.plan[s.job.step], name) for s in self.slots]
            else:
                first = self.slots[0]
                host[...] = getattr(first.plan[first.job.step], name)
            ex.upload(inputs[name], host)
        ex.run(self.binding(n, p))
        self.parity ^= 1
        for slot in self.slots:
            slot.job.step += 1

    def move(self, rows: list[int], target: Lane) -> None:
        """Hand these rows to the other lane: their token state is copied into its next rows on the device."""
        start = len(target.slots)
        copy_rows(self.primitives, target.state[target.parity], self.state[self.parity],
                  [(start + i, row) for i, row in enumerate(rows)])
        target.slots.extend(self.slots[row] for row in rows)
        target.labels_stale = [True, True]
        self.remove(rows)

    def remove(self, rows: list[int]) -> None:
        """Free these rows: the last occupied rows move into the holes (device copies of their token state; runs
        of consecutive rows in one copy), so the occupied rows stay 0..n-1."""
        gone = set(rows)
        count = len(self.slots) - len(gone)
        holes = sorted(r for r in gone if r < count)
        movers = [r for r in range(count, len(self.slots)) if r not in gone]
        copy_rows(self.primitives, self.state[self.parity], self.state[self.parity], list(zip(holes, movers)))
        for hole, mover in zip(holes, movers):
            self.slots[hole] = self.slots[mover]
        self.slots = self.slots[:count]
        self.labels_stale = [True, True]

    def fail(self, error: BaseException) -> list[ImageJob]:
        jobs = [s.job for s in self.slots]
        self.slots = []
        self.labels_stale = [True, True]
        for job in jobs:
            job.error = error
        return jobs
