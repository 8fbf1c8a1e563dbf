"""Generator stage (MASKBIT_SPEC 6.4): a frozen tokenizer turns images into tokens, groups are masked with the
training schedule, labels are dropped with probability class_label_dropout, and the loss is label-smoothed
cross-entropy over all groups. AdamW betas (0.9, 0.96), weight decay 0.045, EMA.

Legend: B batch, N tokens, M groups per token, C classes per group.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import load_tokenizer, save_generator
from ..bits import split_groups
from ..config import ConfigError
from ..generator import Generator
from .losses import mlm_loss
from .metrics import masked_group_stats
from .runner import RunOptions, Stage, TrainResult, run
from .schedule import make_scheduler, mask_groups

EVAL_MASK_SEED = 1234


class GeneratorStage(Stage):
    name = "generator"

    def resolution(self) -> int:
        return self.config.generator.image_size

    def build(self) -> None:
        s, dev, cfg = self.settings, self.dist.device, self.config.generator
        if not self.options.tokenizer:
            raise ConfigError("the generator stage needs --tokenizer PATH (a trained tokenizer checkpoint)")
        try:
            self.tokenizer = load_tokenizer(self.options.tokenizer)
        except ConfigError:      # an official .bin carries no config: use the generator config's tokenizer
            self.tokenizer = load_tokenizer(self.options.tokenizer, self.config)
        self.tokenizer = self.tokenizer.to(dev).eval()
        for p in self.tokenizer.parameters():
            p.requires_grad_(False)
        tok = self.tokenizer.config
        if tok.num_bits != cfg.num_bits or tok.resolution // tok.stride != cfg.latent_size:
            raise ConfigError(f"tokenizer {self.options.tokenizer} makes {tok.num_bits}-bit tokens on a "
                              f"{tok.resolution // tok.stride}x{tok.resolution // tok.stride} grid; the generator of "
                              f"{self.config.name!r} expects {cfg.num_bits} bits on "
                              f"{cfg.latent_size}x{cfg.latent_size}")
        if self.num_classes > cfg.num_classes:
            raise ConfigError(f"the dataset has {self.num_classes} classes but the generator has {cfg.num_classes}")
        self.model = Generator(cfg).to(dev)
        self.train_model = self.wrap(self.model)
        self.optimizers = {"model": self.adamw(self.model.parameters(), s.learning_rate)}
        self.schedulers = {"model": make_scheduler(self.optimizers["model"], s.warmup_steps, s.max_train_steps,
                                                   s.minimum_rate)}
        self.modules = {"model": self.model}

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config.generator
        indices = self.tokenizer.encode(images).flatten(1)                           # (B, N)
        return split_groups(indices, cfg.num_bits, cfg.codebook_splits)              # (B, N, M)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        cfg, s = self.config.generator, self.settings
        self.model.train()
        targets = self.targets(images)
        masked, mask = mask_groups(targets.cpu(), cfg.mask_token, s.train_mask_schedule)
        masked, mask = masked.to(images.device), mask.to(images.device)
        drop = (torch.rand(labels.shape[0]) < cfg.class_label_dropout).to(images.device)
        with self.autocast():
            logits = self.train_model(masked, labels, drop)                          # (B, N, M, C)
            loss = mlm_loss(logits, targets, s.label_smoothing, s.sum_splits)
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = self.clip_and_step(self.model, "model")
        with torch.no_grad():
            stats = masked_group_stats(logits.detach(), targets, mask)
        return {"loss": loss.detach(), "grad_norm": norm, "masked_accuracy": torch.tensor(stats["masked_accuracy"]),
                "masked_ce": torch.tensor(stats["masked_ce"])}

    def evaluate(self, model: Generator, batches) -> dict[str, float]:
        """Masked-group accuracy and cross-entropy with fixed-seed masks (EMA weights, eval mode)."""
        gen = torch.Generator().manual_seed(EVAL_MASK_SEED)
        cfg = self.config.generator
        correct = ce = count = 0.0
        for images, labels in batches:
            images, labels = images.to(self.dist.device), labels.to(self.dist.device)
            targets = self.targets(images)
            masked, mask = mask_groups(targets.cpu(), cfg.mask_token, self.settings.train_mask_schedule, gen)
            mask = mask.to(images.device)
            logits = model(masked.to(images.device), labels, torch.zeros_like(labels, dtype=torch.bool))
            stats = masked_group_stats(logits, targets, mask)
            if stats["masked_count"]:
                correct += stats["masked_accuracy"] * stats["masked_count"]
                ce += stats["masked_ce"] * stats["masked_count"]
                count += stats["masked_count"]
        if not count:
            return {}
        return {"masked_accuracy": correct / count, "masked_ce": ce / count,
                "log_classes": math.log(cfg.group_classes)}

    def export(self, model: Generator, path: Path) -> Path:
        return save_generator(model, path, self.config)


def train_generator(options: RunOptions, callback=None) -> TrainResult:
    """Train a generator on a frozen tokenizer; EMA weights are exported as `<output_dir>/generator.safetensors`."""
    return run(GeneratorStage, options, callback)
