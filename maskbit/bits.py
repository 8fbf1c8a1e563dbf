"""Token <-> group <-> bit conversions in torch, export-friendly (integer division and remainder, no bitwise ops).

The numpy twins live in `maskbit_runtime.tokens`; both follow one rule: bits LSB first, group 0 = low bits.
"""

from __future__ import annotations

import torch


def _powers(count: int, base: int, device) -> torch.Tensor:
    return base ** torch.arange(count, dtype=torch.int64, device=device)


def index_to_bits(indices: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Token indices [...] -> bits [..., K] as int64 0/1, LSB first."""
    return torch.remainder(torch.div(indices.long()[..., None], _powers(num_bits, 2, indices.device),
                                     rounding_mode="floor"), 2)


def index_to_signs(indices: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Token indices [...] -> LFQ latent values [..., K] in {-1, +1} (float32)."""
    return index_to_bits(indices, num_bits).float() * 2.0 - 1.0


def signs_to_index(latent: torch.Tensor) -> torch.Tensor:
    """Latents [..., K] -> token indices [...]: bit k is set where channel k > 0 (exactly 0 counts as -1)."""
    bits = (latent > 0).long()
    return (bits * _powers(latent.shape[-1], 2, latent.device)).sum(-1)


def split_groups(indices: torch.Tensor, num_bits: int, num_groups: int) -> torch.Tensor:
    """Full token indices [...] -> groups [..., M] in [0, 2**(K/M))."""
    base = 2 ** (num_bits // num_groups)
    return torch.remainder(torch.div(indices.long()[..., None], _powers(num_groups, base, indices.device),
                                     rounding_mode="floor"), base)


def combine_groups(groups: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Groups [..., M] -> full token indices [...] (int64)."""
    base = 2 ** (num_bits // groups.shape[-1])
    return (groups.long() * _powers(groups.shape[-1], base, groups.device)).sum(-1)
