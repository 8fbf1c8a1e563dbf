"""The decode loop: a pure function of a step callable, labels, a step plan and seeded noise.

The loop does not know which backend is behind the stepper (eager PyTorch, ONNX Runtime, TensorRT); each
stepper keeps its token state wherever it likes (device buffers) and only its `result` leaves it.
`sample` is the one driver of "labels -> settings -> plan -> loop" that the eager sampler and the runtime share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import InputError
from .noise import StepNoise
from .sampling import SamplingSettings
from .schedules import StepParams

MAX_IMAGES = 1_000_000      # per call; `maskbit-run sample` splits larger runs into chunks


class Stepper(Protocol):
    def start(self, labels: np.ndarray) -> None:
        """Reset the token state to fully masked for a batch with these labels."""

    def step(self, noise: np.ndarray, params: StepParams) -> None:
        """Run one unmasking step; the step's next tokens become the state."""

    def result(self) -> Any:
        """The last step's `sampled` groups (backend-specific handle)."""


@dataclass
class GenerationOutput:
    images: np.ndarray      # uint8 (B, H, W, 3)
    tokens: np.ndarray      # int64 (B, h, w) full token indices


def run_loop(stepper: Stepper, labels: np.ndarray, plan: Sequence[StepParams], noise: StepNoise,
             on_step: Callable[[int], None] | None = None) -> Any:
    """Run every step of `plan` and return the stepper's final `sampled` groups."""
    stepper.start(labels)
    for i, params in enumerate(plan):
        stepper.step(noise.draw(), params)
        if on_step is not None:
            on_step(i)
    return stepper.result()


def sample(stepper_for: Callable[[int], Stepper], finish: Callable[[Any, int], Any], labels: np.ndarray,
           settings: SamplingSettings, seed: int, num_tokens: int, num_groups: int, max_batch: int,
           first_index: int = 0, on_step: Callable[[int], None] | None = None) -> list[Any]:
    """Generate `labels` in batches of at most `max_batch`; returns `finish(result, batch)` of each batch.

    Image j uses the noise stream (seed, first_index + j), so how a request is split never changes an image.
    """
    plan = settings.plan(num_tokens * num_groups)
    outputs = []
    for start in range(0, len(labels), max_batch):
        part = labels[start:start + max_batch]
        noise = StepNoise(seed, len(part), num_tokens, num_groups, first_index=first_index + start)
        outputs.append(finish(run_loop(stepper_for(len(part)), part, plan, noise, on_step), len(part)))
    return outputs


def check_labels(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Labels as int64 [B]; raises InputError naming the first label outside [0, num_classes)."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise InputError(f"labels must be a non-empty list of class indices, got shape {array.shape}")
    if array.size > MAX_IMAGES:
        raise InputError(f"{array.size} labels in one call; at most {MAX_IMAGES} (use maskbit-run sample)")
    if not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        raise InputError(f"labels must be integers, got {array.dtype}")
    bad = array[(array < 0) | (array >= num_classes)]
    if bad.size:
        raise InputError(f"label {int(bad[0])} is out of range: this model has classes 0..{num_classes - 1}")
    return array.astype(np.int64)
