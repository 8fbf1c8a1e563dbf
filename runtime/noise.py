"""Seeded noise for generation, drawn on the host with numpy, the same for every backend.

Each image has its own stream, seeded by (seed, image index), so an image's noise does not depend on the
batch it is generated in: splitting a request into smaller batches gives the same images.
Uniforms are of the form (k + 0.5) / 2**23, strictly inside (0, 1) and exact in float32, so the Gumbel
transform -log(-log(u)) is always finite. Under a fixed unmask order (`unmask_order.py`) the confidence half,
noise[...,1], is the order's fixed array instead; the stream is drawn all the same, so the class draws,
noise[...,0], are those of the confidence order.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

_BITS = 23
_SCALE = np.float32(2.0 ** -_BITS)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 63:
        raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


class ImageNoise:
    """One image's stream of step noise (float32 [N, M, 2] per step), seeded by (seed, index)."""

    def __init__(self, seed: int, index: int, shape: tuple[int, int, int], confidence: np.ndarray | None = None):
        self.shape = shape
        self._rng = np.random.Generator(np.random.PCG64([check_seed(seed), index]))
        self.confidence = confidence            # float32 [N, M]: a fixed order's noise[...,1] (None: drawn)

    def draw(self, out: np.ndarray | None = None) -> np.ndarray:
        """The next step's noise, written into `out` (float32 of `shape`) when given."""
        k = self._rng.integers(0, 1 << _BITS, size=self.shape, dtype=np.int64)
        if out is None:
            out = np.empty(self.shape, dtype=np.float32)
        np.multiply(k.astype(np.float32) + np.float32(0.5), _SCALE, out=out)
        if self.confidence is not None:
            out[..., 1] = self.confidence
        return out


class StepNoise:
    """Draws the step input `noise` (float32 [B, N, M, 2]) for images `first_index ... first_index + B - 1`."""

    def __init__(self, seed: int, batch_size: int, num_tokens: int, num_groups: int, first_index: int = 0,
                 confidence: np.ndarray | None = None):
        check_seed(seed)
        self.shape = (num_tokens, num_groups, 2)
        self._images = [ImageNoise(seed, first_index + b, self.shape, confidence) for b in range(batch_size)]

    def draw(self) -> np.ndarray:
        out = np.empty((len(self._images), *self.shape), dtype=np.float32)
        for b, image in enumerate(self._images):
            image.draw(out=out[b])
        return out
