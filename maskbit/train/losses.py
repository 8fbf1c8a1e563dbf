"""Loss terms of both stages (MASKBIT_SPEC 6.1, 6.4) and the tokenizer's loss module.

The module mirrors the official VQGANLoss: it owns the discriminator, the frozen perceptual network and the LeCAM
EMA buffers `ema_real_logits_mean` / `ema_fake_logits_mean`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import QuantizerOutput
from .discriminator import Discriminator
from .settings import TrainSettings


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def lecam_loss(real_mean: torch.Tensor, fake_mean: torch.Tensor, ema_real: torch.Tensor,
               ema_fake: torch.Tensor) -> torch.Tensor:
    """Unweighted LeCAM term relu(mean D(x) - ema_fake)^2 + relu(ema_real - mean D(x_hat))^2."""
    return (F.relu(real_mean - ema_fake).pow(2) + F.relu(ema_real - fake_mean).pow(2)).sum()


def entropy_annealing(step: int, steps: int, factor: float) -> float:
    """Extra multiple of the entropy loss at `step`: max(0, 1 - step/steps) * factor (0 when disabled)."""
    if factor <= 0 or steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / steps) * factor


def adopt_weight(factor: float, step: int, threshold: int) -> float:
    return factor if step >= threshold else 0.0


def quantizer_objective(out: QuantizerOutput, step: int, steps: int, factor: float) -> torch.Tensor:
    """Q of 6.1: quantizer_loss + annealing(step) * entropy_loss (entropy_loss already carries its weight)."""
    return out.quantizer_loss + entropy_annealing(step, steps, factor) * out.entropy_loss


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1,
             sum_splits: bool = False) -> torch.Tensor:
    """Cross-entropy over all groups, masked or not: logits [B,N,M,C], targets [B,N,M]."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           label_smoothing=label_smoothing)
    return loss * logits.shape[2] if sum_splits else loss


class TokenizerLoss(nn.Module):
    def __init__(self, settings: TrainSettings, perceptual: nn.Module | None = None):
        super().__init__()
        self.settings = settings
        s = settings
        self.discriminator = Discriminator(s.disc_num_channels, s.disc_hidden_channels, s.disc_num_stages,
                                           s.disc_blur_resample, s.disc_blur_kernel_size)
        self.perceptual_loss = perceptual
        self.register_buffer("ema_real_logits_mean", torch.zeros(1))
        self.register_buffer("ema_fake_logits_mean", torch.zeros(1))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint keeps: discriminator and LeCAM buffers (not the frozen perceptual net)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("perceptual_loss.")}

    def discriminator_active(self, step: int) -> bool:
        return step >= self.settings.discriminator_start

    def generator_loss(self, images: torch.Tensor, recon: torch.Tensor, qout: QuantizerOutput,
                       step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        if s.reconstruction_loss == "l2":
            rec = F.mse_loss(recon.float(), images.float())
        else:
            rec = F.l1_loss(recon.float(), images.float())
        total = s.reconstruction_weight * rec
        logs = {"reconstruction_loss": rec.detach()}
        if s.perceptual_weight > 0:
            if self.perceptual_loss is None:
                raise RuntimeError("perceptual_weight > 0 but the loss module has no perceptual network")
            perceptual = self.perceptual_loss(images, recon)
            total = total + s.perceptual_weight * perceptual
            logs["perceptual_loss"] = perceptual.detach()
        q = quantizer_objective(qout, step, s.entropy_annealing_steps, s.entropy_annealing_factor)
        total = total + s.quantizer_weight * q
        logs.update(quantizer_loss=q.detach(), commitment_loss=qout.commitment_loss.detach(),
                    entropy_loss=qout.entropy_loss.detach())
        if self.discriminator_active(step):
            weight = adopt_weight(s.discriminator_factor, step, s.discriminator_start)
            for p in self.discriminator.parameters():
                p.requires_grad_(False)
            g = hinge_g_loss(self.discriminator(recon))
            for p in self.discriminator.parameters():
                p.requires_grad_(True)
            total = total + s.discriminator_weight * weight * g
            logs["gan_loss"] = g.detach()
        logs["total_loss"] = total.detach()
        return total, logs

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor, step: int,
                           discriminator: Callable | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge + LeCAM on the detached reconstruction; updates the LeCAM EMA buffers after using them."""
        s = self.settings
        disc = discriminator or self.discriminator
        both = disc(torch.cat([images, recon.detach()]))                              # (2B, 1, 16, 16)
        real, fake = both.float().chunk(2)
        weight = adopt_weight(s.discriminator_factor, step, s.discriminator_start)
        hinge = hinge_d_loss(real, fake)
        real_mean, fake_mean = real.mean(), fake.mean()
        lecam = lecam_loss(real_mean, fake_mean, self.ema_real_logits_mean, self.ema_fake_logits_mean)
        loss = weight * hinge + s.lecam_regularization_weight * lecam
        with torch.no_grad():
            d = s.lecam_ema_decay
            self.ema_real_logits_mean.mul_(d).add_((1 - d) * real_mean.detach())
            self.ema_fake_logits_mean.mul_(d).add_((1 - d) * fake_mean.detach())
        return loss, {"discriminator_loss": hinge.detach(), "lecam_loss": lecam.detach(),
                      "logits_real": real_mean.detach(), "logits_fake": fake_mean.detach()}
