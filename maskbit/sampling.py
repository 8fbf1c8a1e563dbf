"""Eager generation: the reference sampler, a plain loop over the step module.

It uses the runtime's schedules (`SamplingSettings.plan`) and noise streams (`StepNoise`, image j seeded by
(seed, first_index + j)), so the same seed gives the same tokens here and on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from maskbit_runtime.generation import GenerationOutput, check_labels
from maskbit_runtime.noise import StepNoise
from maskbit_runtime.sampling import SamplingSettings

from .bits import combine_groups
from .generator import Generator
from .step import GenerationStep
from .tokenizer import Tokenizer, images_to_uint8


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
    steps = {guided: GenerationStep(generator, guidance=guided).eval() for guided in (True, False)}
    noise = StepNoise(seed, len(labels), cfg.num_tokens, cfg.codebook_splits, first_index,
                      sampling.order_noise(cfg.num_tokens, cfg.codebook_splits))
    B = len(labels)
    tokens = torch.full((B, cfg.num_tokens, cfg.codebook_splits), cfg.mask_token, dtype=torch.int64, device=device)
    labels = torch.as_tensor(labels, device=device)
    row = lambda value, dtype=torch.float32: torch.full((B,), value, dtype=dtype, device=device)   # one per row
    for i, params in enumerate(sampling.plan(cfg.num_tokens * cfg.codebook_splits)):
        step = steps[params.guided]          # outside the guidance interval: the conditional model alone
        tokens, sampled = step(tokens, labels, torch.from_numpy(noise.draw()).to(device), row(params.guidance_scale),
                               row(params.softmax_temperature), row(params.confidence_noise_scale),
                               row(params.num_to_mask, torch.int64))
        if on_step is not None:
            on_step(i)
    return sampled


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
