"""Eager generation: the shared decode loop driving the `GenerationStep` module in PyTorch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, replace

import numpy as np
import torch
from maskbit_runtime.loop import GenerationOutput, check_labels, run_loop
from maskbit_runtime.noise import StepNoise
from maskbit_runtime.schedules import StepParams, plan_steps

from .bits import combine_groups
from .config import SamplingConfig
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


def sampling_settings(generator: Generator, **overrides) -> SamplingConfig:
    """The generator's sampling defaults (from its config) with the given fields replaced (None = keep)."""
    base = getattr(generator, "sampling_config", None) or SamplingConfig()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@torch.no_grad()
def generate_groups(generator: Generator, labels: Sequence[int], sampling: SamplingConfig, seed: int = 0,
                    on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """The final sampled groups [B,N,M] of a seeded generation."""
    cfg = generator.config
    labels = check_labels(labels, cfg.num_classes)
    device = next(generator.parameters()).device
    settings = asdict(sampling)
    num_steps = settings.pop("num_steps")
    plan = plan_steps(num_steps, cfg.num_tokens * cfg.codebook_splits, **settings)
    step = GenerationStep(generator, guidance=sampling.guidance_scale != 0).eval()
    noise = StepNoise(seed, len(labels), cfg.num_tokens, cfg.codebook_splits)
    return run_loop(EagerStepper(step, device), labels, plan, noise, on_step)


@torch.no_grad()
def generate(tokenizer: Tokenizer, generator: Generator, labels: Sequence[int], num_steps: int | None = None,
             guidance_scale: float | None = None, seed: int = 0, *, guidance_annealing: str | None = None,
             scale_pow: float | None = None, softmax_temperature: float | None = None,
             randomize_temperature: float | None = None, mask_schedule: str | None = None,
             use_sampling_annealing: bool | None = None,
             on_step: Callable[[int], None] | None = None) -> GenerationOutput:
    """Generate images for `labels`; unset sampling parameters default to the generator config's values."""
    if tokenizer.config.num_bits != generator.config.num_bits or not tokenizer.config.is_lookup_free:
        raise ValueError(f"the generator predicts {generator.config.num_bits}-bit tokens but the tokenizer is a "
                         f"{tokenizer.config.num_bits}-bit {tokenizer.config.quantizer_type} tokenizer")
    sampling = sampling_settings(
        generator, num_steps=num_steps, guidance_scale=guidance_scale, guidance_annealing=guidance_annealing,
        scale_pow=scale_pow, softmax_temperature=softmax_temperature, randomize_temperature=randomize_temperature,
        mask_schedule=mask_schedule, use_sampling_annealing=use_sampling_annealing)
    groups = generate_groups(generator, labels, sampling, seed, on_step)
    side = generator.config.latent_size
    indices = combine_groups(groups, generator.config.num_bits).view(-1, side, side)      # (B, h, w)
    images = images_to_uint8(tokenizer.decode_tokens(indices))
    return GenerationOutput(images=images.cpu().numpy(), tokens=indices.cpu().numpy())
