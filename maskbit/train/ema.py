"""Exponential moving average of model parameters (MASKBIT_SPEC 6.3): buffers are not tracked."""

from __future__ import annotations

import torch
from torch import nn

from .schedule import ema_decay


class EMA:
    """Shadow copies of `model`'s parameters, updated after every optimiser step."""

    def __init__(self, model: nn.Module, max_decay: float = 0.999):
        self.max_decay = max_decay
        self.num_updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        self.num_updates += 1
        decay = ema_decay(self.num_updates, self.max_decay)
        for name, p in model.named_parameters():
            s = self.shadow[name]
            if p.requires_grad:
                s.sub_((1.0 - decay) * (s - p.detach()))
            else:
                s.copy_(p.detach())
        return decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name])

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters (e.g. {min(missing)})")
        for name, s in self.shadow.items():
            s.copy_(tensors[name])
        self.num_updates = int(num_updates)
