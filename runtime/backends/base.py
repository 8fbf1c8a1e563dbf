"""The small interface every backend implements: load, allocate buffers once per batch size, run, close."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..loop import Stepper
from ..errors import MaskbitError


class BackendError(MaskbitError, RuntimeError):
    """A backend that cannot run this bundle here (missing library, wrong GPU, engine mismatch)."""


class Backend(Protocol):
    name: str

    def stepper(self, batch: int) -> Stepper:
        """A stepper whose device buffers for `batch` images are allocated once and reused."""

    def finish(self, sampled: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Final sampled groups (device handle) -> (uint8 images [B,H,W,3], int64 indices [B,h,w]) on the host."""

    def encode(self, images: np.ndarray) -> np.ndarray:
        """float32 [B,3,H,W] in [0,1] -> int64 indices [B,h,w]."""

    def decode(self, indices: np.ndarray) -> np.ndarray:
        """int64 indices [B,h,w] -> uint8 images [B,H,W,3]."""

    def describe(self) -> dict:
        """Providers/devices/versions for `maskbit-run info`."""

    def close(self) -> None:
        """Release sessions and device memory."""
