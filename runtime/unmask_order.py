"""Fixed unmasking orders, imposed through the exported step's inputs: no new graph, the same on every backend.

The step re-masks the `num_to_mask` groups of lowest confidence = log p(sampled) + Gumbel(noise[...,1]) x
confidence_noise_scale. An order sets noise[...,1] of position r-th in the order to u_r = 1 - (r + 1/2) / G
(G groups per image: the first in the order gets the largest Gumbel value, so it is the first kept) and the
scale to S = 4 x 104 x G / e, so the order's term outweighs any log p:

* Gumbel(u) = -ln(-ln u) has slope 1 / (u (-ln u)) >= e on (0, 1) (u (-ln u) peaks at 1/e), so adjacent
  positions, 1/G apart in u, differ by >= e/G in Gumbel and by >= 4 x 104 = 416 in confidence;
* the drawn class has p > 0 (the inverse-CDF draw picks a class where the cumulative sum steps up), so
  log p(sampled) lies in [ln 2**-149, 0] = [-103.3, 0], a spread of less than 104;
* float32 rounding of u (< 2**-24, against a gap of 1/G >= 2**-16) and of the logs and the product moves each
  confidence by well under 1, so 416 - 104 leaves a margin of more than 300. tests/test_plans.py checks every
  adjacent pair in float32 with log p at both ends of its range.
(One corner is left as the confidence order has it: when u x total rounds up to the total, the clamped draw may be
a class of probability 0, log p = -inf, and that group is re-masked, drawn again at the next step.)
The class draw noise[...,0] stays the image's own stream, so images still vary with the seed.

Halton order: Besnier, Chen, Hurault et al. 2025, "Halton Scheduler for Masked Generative Image Transformer",
arXiv 2503.17076: token positions in the order the 2-D Halton sequence (bases 2, 3) first visits their cell of
the latent grid, which spreads the tokens decided at one step evenly over the image. A token's M groups are
ordered by the same walk: the j-th visit of a cell orders its group j, so a token's two halves are decided at
well separated steps (drawn together they would be independent given the context) and each half follows a
Halton order of its own.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .errors import InputError

UNMASK_ORDERS = ("confidence", "halton")
LOG_P_SPREAD = 104.0            # > -ln(2**-149) = 103.28: the widest spread of log p over positive float32
MAX_ORDERED_GROUPS = 1 << 16    # u rounding (2**-24) stays < 1/256 of the gap between adjacent positions


def order_noise_scale(order: str, num_groups: int) -> float | None:
    """The confidence_noise_scale of every step under a fixed order of `num_groups` groups (None: the
    confidence order, whose scale is the annealed randomize_temperature)."""
    if _check(order, num_groups) == "confidence":
        return None
    return float(np.float32(math.ceil(4 * LOG_P_SPREAD * num_groups / math.e)))


def order_noise(order: str, num_tokens: int, groups_per_token: int) -> np.ndarray | None:
    """noise[...,1] of every step under a fixed order: float32 [N, M] (None: the confidence order draws it)."""
    if _check(order, num_tokens * groups_per_token) == "confidence":
        return None
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise InputError(f"unmask_order {order!r} needs a square token grid, got {num_tokens} tokens")
    ranks = halton_ranks(side, groups_per_token)
    return order_uniforms(ranks)


def order_uniforms(ranks: np.ndarray) -> np.ndarray:
    """u = 1 - (rank + 1/2) / G in float32: rank 0 gets the largest Gumbel value (kept first)."""
    G = ranks.size
    return (1.0 - (ranks.astype(np.float64) + 0.5) / G).astype(np.float32)


@lru_cache(maxsize=16)
def _halton_ranks(side: int, groups: int) -> bytes:
    ranks = np.full((side * side, groups), -1, dtype=np.int64)
    visits = np.zeros(side * side, dtype=np.int64)
    rank, k = 0, 0
    while rank < ranks.size:
        col, row = int(radical_inverse(k, 2) * side), int(radical_inverse(k, 3) * side)
        cell = row * side + col
        if visits[cell] < groups:
            ranks[cell, visits[cell]] = rank
            visits[cell] += 1
            rank += 1
        k += 1
    return ranks.tobytes()


def halton_ranks(side: int, groups: int) -> np.ndarray:
    """int64 [side*side, groups]: each (token, group) position's place in the Halton order (tokens row-major)."""
    return np.frombuffer(_halton_ranks(side, groups), dtype=np.int64).reshape(side * side, groups).copy()


def radical_inverse(k: int, base: int) -> float:
    """The k-th point (from 0) of the van der Corput sequence in `base`: k's digits mirrored after the point."""
    value, scale = 0.0, 1.0 / base
    while k:
        k, digit = divmod(k, base)
        value += digit * scale
        scale /= base
    return value


def _check(order: str, num_groups: int) -> str:
    if order not in UNMASK_ORDERS:
        raise InputError(f"unmask_order {order!r} is not one of {', '.join(UNMASK_ORDERS)}")
    if order != "confidence" and num_groups > MAX_ORDERED_GROUPS:
        raise InputError(f"unmask_order {order!r} orders at most {MAX_ORDERED_GROUPS} groups per image, "
                         f"got {num_groups}")
    return order
