"""Token <-> group <-> bit conversions in numpy (the torch twins in `maskbit.bits` follow the same rule).

A K-bit token index t is split into M groups of K/M bits; group m holds bits m*K/M ... (m+1)*K/M - 1 of t
(group 0 = least significant bits). Bits are read LSB first. Only integer division and remainder are used.
"""

from __future__ import annotations

import numpy as np


def split_groups(indices: np.ndarray, num_bits: int, num_groups: int) -> np.ndarray:
    """Full token indices [...] -> groups [..., M] in [0, 2**(K/M))."""
    base = 1 << (num_bits // num_groups)
    indices = np.asarray(indices, dtype=np.int64)
    return np.stack([(indices // base ** m) % base for m in range(num_groups)], axis=-1)


def combine_groups(groups: np.ndarray, num_bits: int) -> np.ndarray:
    """Groups [..., M] -> full token indices [...] (int64)."""
    groups = np.asarray(groups, dtype=np.int64)
    base = 1 << (num_bits // groups.shape[-1])
    weights = base ** np.arange(groups.shape[-1], dtype=np.int64)
    return (groups * weights).sum(-1)


def index_to_bits(indices: np.ndarray, num_bits: int) -> np.ndarray:
    """Token indices [...] -> bits [..., K] in {0, 1} (uint8), LSB first."""
    indices = np.asarray(indices, dtype=np.int64)
    return ((indices[..., None] // (1 << np.arange(num_bits, dtype=np.int64))) % 2).astype(np.uint8)


def bits_to_index(bits: np.ndarray) -> np.ndarray:
    """Bits [..., K] in {0, 1} -> token indices [...] (int64)."""
    bits = np.asarray(bits, dtype=np.int64)
    return (bits << np.arange(bits.shape[-1], dtype=np.int64)).sum(-1)
