"""Seeded noise for generation, drawn on the host with numpy, the same for every backend.

Each image has its own stream, seeded by (seed, image index), so an image's noise does not depend on the
batch it is generated in: splitting a request into smaller batches gives the same images.
Uniforms are of the form (k + 0.5) / 2**23, strictly inside (0, 1) and exact in float32, so the Gumbel
transform -log(-log(u)) is always finite.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

_BITS = 23
_SCALE = np.float32(2.0 ** -_BITS)


class StepNoise:
    """Draws the step input `noise` (float32 [B, N, M, 2]) for images `first_index ... first_index + B - 1`."""

    def __init__(self, seed: int, batch_size: int, num_tokens: int, num_groups: int, first_index: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 63:
            raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        self.shape = (num_tokens, num_groups, 2)
        self._rngs = [np.random.Generator(np.random.PCG64([seed, first_index + b])) for b in range(batch_size)]

    def draw(self) -> np.ndarray:
        out = np.empty((len(self._rngs), *self.shape), dtype=np.float32)
        for b, rng in enumerate(self._rngs):
            k = rng.integers(0, 1 << _BITS, size=self.shape, dtype=np.int64)
            out[b] = (k.astype(np.float32) + np.float32(0.5)) * _SCALE
        return out
