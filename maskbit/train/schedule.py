"""Learning-rate schedule (cosine with minimum), EMA decay, and the training-time mask of generator groups.

The mask ratio calls `maskbit_runtime.schedules.mask_ratio`, the one definition of the schedule formulas. Training
draws r ~ U[0, 1) per sample and the official `get_mask_tokens` applies no clamp, while `mask_ratio` clamps to
[1e-6, 1]. With r < 1 the unclamped ratio is never above 1, and it falls below 1e-6 only for r within ~1e-6 of 1
(linear/square/cosine; never for arccos in float32), where it raises a masking probability of < 1e-6 to 1e-6:
a difference no training run can observe, accepted to keep one definition.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from maskbit_runtime.schedules import mask_ratio
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_minimum(step: int, warmup_steps: int, total_steps: int, minimum_rate: float = 0.1) -> float:
    """LR multiplier at `step`: linear warmup, then cosine from 1 down to `minimum_rate` (MASKBIT_SPEC 6.3), held there
    after `total_steps`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    c = 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, c + minimum_rate - minimum_rate * c)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                   minimum_rate: float = 0.1) -> LambdaLR:
    """The schedule for a run of `total_steps`. LambdaLR checkpoints the `__dict__` of a callable object and restores
    it on resume, which would pin a resumed run to the length it was started with (and, extended past it, send the
    cosine back up); a `partial` has no such state, so a run extended with a larger --max-steps follows the schedule
    of its new length from the step it resumes at."""
    return LambdaLR(optimizer, partial(cosine_with_minimum, warmup_steps=warmup_steps, total_steps=total_steps,
                                       minimum_rate=minimum_rate))


def ema_decay(num_updates: int, max_decay: float = 0.999) -> float:
    """EMA decay after the counter was incremented to `num_updates`: 0 for n <= 1, else min(n/(n+9), max)."""
    if num_updates <= 1:
        return 0.0
    return min(num_updates / (num_updates + 9), max_decay)


def mask_groups(groups: torch.Tensor, mask_token: int, schedule: str = "arccos",
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask every group independently with a per-sample ratio (official get_mask_tokens).

    groups [B,N,M] int64 -> (masked groups [B,N,M], mask [B,N,M] bool). Draws rand(B) then rand(B,N,M) from
    `generator` (the global CPU generator when None), in the official order.
    """
    r = torch.rand(groups.shape[0], generator=generator)                           # (B,)
    ratio = torch.tensor([mask_ratio(float(x), schedule) for x in r], dtype=torch.float32)
    noise = torch.rand(groups.shape, generator=generator)                           # (B, N, M)
    mask = (noise < ratio.view(-1, *([1] * (groups.dim() - 1)))).to(groups.device)
    return torch.where(mask, torch.full_like(groups, mask_token), groups), mask
