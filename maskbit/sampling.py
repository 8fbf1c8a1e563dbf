"""Eager generation: the runtime's decode-loop driver (`maskbit_runtime.loop.sample`) over the step module."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from maskbit_runtime.loop import GenerationOutput, check_labels, sample
from maskbit_runtime.sampling import SamplingSettings
from maskbit_runtime.schedules import StepParams

from .bits import combine_groups
from .generator import Generator
from .step import GenerationStep
from .tokenizer import Tokenizer, images_to_uint8


class EagerStepper:
    """Keeps the token state as a torch tensor and runs the step module eagerly."""

    def __init__(self, step: GenerationStep, device: torch.device):
        self.module = step
        self.device = device
        self.tokens = self.sampled = self.labels = None

    def start(self, labels: np.ndarray) -> None:
        cfg = self.module.generator.config
        self.labels = torch.as_tensor(labels, device=self.device)
        shape = (len(labels), cfg.num_tokens, cfg.codebook_splits)
        self.tokens = torch.full(shape, cfg.mask_token, dtype=torch.int64, device=self.device)

    def step(self, noise: np.ndarray, params: StepParams) -> None:
        scalar = lambda value, dtype=torch.float32: torch.tensor(value, dtype=dtype, device=self.device)
        self.tokens, self.sampled = self.module(
            self.tokens, self.labels, torch.from_numpy(noise).to(self.device), scalar(params.guidance_scale),
            scalar(params.softmax_temperature), scalar(params.confidence_noise_scale),
            scalar(params.num_to_mask, torch.int64))

    def result(self) -> torch.Tensor:
        return self.sampled


def sampling_settings(generator: Generator, **overrides) -> SamplingSettings:
    """The generator's sampling defaults (from its config) with the given fields replaced (None = keep)."""
    base = getattr(generator, "sampling_config", None) or SamplingSettings()
    return base.with_overrides(**overrides)


@torch.no_grad()
def generate_groups(generator: Generator, labels: Sequence[int], sampling: SamplingSettings, seed: int = 0,
                    on_step: Callable[[int], None] | None = None, first_index: int = 0) -> torch.Tensor:
    """The final sampled groups [B,N,M] of a seeded generation (one batch: eager has no batch limit)."""
    cfg = generator.config
    labels = check_labels(labels, cfg.num_classes)
    device = next(generator.parameters()).device
    stepper = EagerStepper(GenerationStep(generator, guidance=sampling.uses_guidance).eval(), device)
    (groups,) = sample(lambda batch: stepper, lambda result, batch: result, labels, sampling, seed, cfg.num_tokens,
                       cfg.codebook_splits, len(labels), first_index, on_step)
    return groups


@torch.no_grad()
def generate(tokenizer: Tokenizer, generator: Generator, labels: Sequence[int], num_steps: int | None = None,
             guidance_scale: float | None = None, seed: int = 0, *, on_step: Callable[[int], None] | None = None,
             **sampling) -> GenerationOutput:
    """Generate images for `labels`; unset sampling settings (see `SamplingSettings`) come from the generator's
    config."""
    if tokenizer.config.num_bits != generator.config.num_bits or not tokenizer.config.is_lookup_free:
        raise ValueError(f"the generator predicts {generator.config.num_bits}-bit tokens but the tokenizer is a "
                         f"{tokenizer.config.num_bits}-bit {tokenizer.config.quantizer_type} tokenizer")
    settings = sampling_settings(generator, num_steps=num_steps, guidance_scale=guidance_scale, **sampling)
    groups = generate_groups(generator, labels, settings, seed, on_step)
    side = generator.config.latent_size
    indices = combine_groups(groups, generator.config.num_bits).view(-1, side, side)      # (B, h, w)
    images = images_to_uint8(tokenizer.decode_tokens(indices))
    return GenerationOutput(images=images.cpu().numpy(), tokens=indices.cpu().numpy())
