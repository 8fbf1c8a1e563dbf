"""Tokenizer stage (MASKBIT_SPEC 6.1-6.3): reconstruction + perceptual + quantizer (+ annealed entropy) losses,
the VQGAN+ discriminator with hinge loss from `discriminator_start` and LeCAM, two AdamW optimisers, EMA.

Step order: tokenizer forward -> generator-side loss backward/clip/step/lr-step -> (if s >= discriminator_start)
discriminator loss on the same detached reconstruction backward/clip/step/lr-step -> EMA update (in the runner).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import save_tokenizer
from ..image_quality import psnr, ssim
from ..tokenizer import Tokenizer
from . import distributed
from .losses import TokenizerLoss
from .metrics import codebook_stats
from .perceptual import PerceptualLoss
from .runner import RunOptions, Stage, TrainResult, run
from .schedule import make_scheduler


class _LossState:
    """Checkpoint adapter: the loss module's discriminator and LeCAM buffers, never the frozen perceptual net."""

    def __init__(self, loss: TokenizerLoss):
        self.loss = loss

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.loss.trainable_state()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.loss.trainable_state())
        if set(state) != expected:
            raise ValueError(f"loss-module checkpoint keys differ: missing {sorted(expected - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - expected)[:3]}")
        self.loss.load_state_dict(state, strict=False)


class TokenizerStage(Stage):
    name = "tokenizer"

    def resolution(self) -> int:
        return self.config.tokenizer.resolution

    def build(self) -> None:
        s, dev = self.settings, self.dist.device
        self.model = Tokenizer(self.config.tokenizer).to(dev)
        perceptual = None
        if s.perceptual_weight > 0:
            perceptual = PerceptualLoss(self.options.perceptual_weights, self.options.random_perceptual, s.seed)
        self.loss = TokenizerLoss(s, perceptual).to(dev)
        self.train_model = self.wrap(self.model)
        self.train_disc = self.wrap(self.loss.discriminator)
        self.optimizers = {"model": self.adamw(self.model.parameters(), s.learning_rate),
                           "discriminator": self.adamw(self.loss.discriminator.parameters(),
                                                       s.discriminator_learning_rate)}
        self.schedulers = {
            "model": make_scheduler(self.optimizers["model"], s.warmup_steps, s.max_train_steps, s.minimum_rate),
            "discriminator": make_scheduler(self.optimizers["discriminator"], s.warmup_steps,
                                            max(1, s.max_train_steps - s.discriminator_start), s.minimum_rate)}
        self.modules = {"model": self.model, "loss": _LossState(self.loss)}

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        self.model.train()
        self.loss.train()
        opt = self.optimizers["model"]
        with self.autocast():
            recon, qout = self.train_model(images)                                   # (B, 3, H, W)
            total, logs = self.loss.generator_loss(images, recon, qout, step)
        opt.zero_grad(set_to_none=True)
        total.backward()
        logs["grad_norm"] = self.clip_and_step(self.model, "model")
        if self.loss.discriminator_active(step):
            d_opt = self.optimizers["discriminator"]
            with self.autocast():
                d_loss, d_logs = self.loss.discriminator_loss(images, recon.detach(), step, self.train_disc)
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.clip_and_step(self.loss.discriminator, "discriminator")
            distributed.average_buffers([self.loss.ema_real_logits_mean, self.loss.ema_fake_logits_mean], self.dist)
            logs.update(d_logs)
        return logs

    def evaluate(self, model: Tokenizer, batches) -> dict[str, float]:
        """PSNR, SSIM (7.1) and codebook usage/entropy over the eval images, EMA weights, eval mode."""
        psnrs, ssims, indices = [], [], []
        for images, _ in batches:
            images = images.to(self.dist.device)
            recon, qout = model(images)
            psnrs.append(psnr(images, recon.float()))
            ssims.append(ssim(images, recon.float()))
            indices.append(qout.indices.cpu())
        if not psnrs:
            return {}
        stats = codebook_stats(torch.cat(indices), self.config.tokenizer.codebook_size)
        return {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()), **stats}

    def export(self, model: Tokenizer, path: Path) -> Path:
        return save_tokenizer(model, path, self.config)


def train_tokenizer(options: RunOptions, callback=None) -> TrainResult:
    """Train a tokenizer; the EMA weights are exported as `<output_dir>/tokenizer.safetensors`."""
    return run(TokenizerStage, options, callback)
