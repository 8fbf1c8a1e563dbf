"""The decode loop: a pure function of a step callable, labels, a step plan and seeded noise.

The loop does not know which backend is behind the stepper (eager PyTorch, ONNX Runtime, TensorRT); each
stepper keeps its token state wherever it likes (device buffers) and only its `result` leaves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .noise import StepNoise
from .schedules import StepParams


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


def check_labels(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Labels as int64 [B]; raises ValueError naming the first label outside [0, num_classes)."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"labels must be a non-empty list of class indices, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {array.dtype}")
    bad = array[(array < 0) | (array >= num_classes)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} is out of range: this model has classes 0..{num_classes - 1}")
    return array.astype(np.int64)
