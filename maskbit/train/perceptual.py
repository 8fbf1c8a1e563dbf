"""Perceptual loss: MSE between ResNet-50 logits of the two images (MASKBIT_SPEC 6.1), frozen and in eval mode.

Weights come from a local file or the torch hub cache (torchvision's IMAGENET1K_V1 file); nothing is downloaded.
`random_weights=True` builds a seeded random network for tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from maskbit_runtime.errors import MaskbitError

RESNET50_FILE = "resnet50-0676ba61.pth"          # torchvision ResNet50_Weights.IMAGENET1K_V1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualWeightsMissing(MaskbitError, FileNotFoundError):
    """No ResNet-50 weights were given and none are cached."""


def find_resnet50_weights(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        if not Path(path).is_file():
            raise PerceptualWeightsMissing(f"perceptual weights {path} do not exist")
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / RESNET50_FILE
    if cached.is_file():
        return cached
    raise PerceptualWeightsMissing(
        f"no ResNet-50 weights for the perceptual loss: {cached} is absent; pass --perceptual-weights PATH "
        f"(torchvision's {RESNET50_FILE}), or set losses.perceptual_weight=0")


class PerceptualLoss(nn.Module):
    def __init__(self, weights: str | os.PathLike | None = None, random_weights: bool = False, seed: int = 0):
        super().__init__()
        from torchvision.models import resnet50
        if random_weights:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.model = resnet50(weights=None)
        else:
            self.model = resnet50(weights=None)
            state = torch.load(find_resnet50_weights(weights), map_location="cpu", weights_only=True)
            self.model.load_state_dict(state)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.model.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):   # the network stays in eval mode (BN running statistics)
        super().train(mode)
        self.model.eval()
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        return self.model((x - self.mean) / self.std)                                  # (B, 1000)

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.logits(images), self.logits(reconstructions))
