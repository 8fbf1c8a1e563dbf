"""Eager PyTorch generation as a user of the official code writes it (MASKBIT_SPEC 5.2), for comparison only.

The official `sample` loop: one batched forward over [cond; uncond], cosine guidance annealing, softmax,
`torch.multinomial`, Gumbel confidence noise, and re-masking by sorting the confidences and thresholding at
the k-th smallest. It is written here, not in the package: the package's own sampler runs `GenerationStep`.
"""

from __future__ import annotations

import math

import torch

from maskbit.generator import Generator


def arccos_ratio(progress: float) -> float:
    return min(max(math.acos(progress) / (math.pi / 2), 1e-6), 1.0)


def official_logits(model: Generator, tokens: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """cond + scale * (cond - uncond) from one forward over the doubled batch."""
    B = tokens.shape[0]
    drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)])
    logits = model(torch.cat([tokens, tokens]), torch.cat([labels, labels]), drop)    # (2B, N, M, C)
    cond, uncond = logits[:B], logits[B:]
    return cond + scale * (cond - uncond)


def official_step(model: Generator, tokens: torch.Tensor, labels: torch.Tensor, i: int, num_steps: int,
                  guidance_scale: float, scale_pow: float, randomize_temperature: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step i of the official loop: (tokens [B,N,M]) -> (next tokens, sampled)."""
    cfg = model.config
    B, N, M = tokens.shape
    progress = (i + 1) / num_steps
    mask = tokens == cfg.mask_token
    scale = guidance_scale * (1 - math.cos(math.pi * (i / num_steps) ** scale_pow)) / 2
    logits = official_logits(model, tokens, labels, scale)                          # (B, N, M, C)
    probs = torch.softmax(logits, dim=-1)
    sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(B, N, M)
    num_masked = int(mask[0].sum())
    sampled = torch.where(mask, sampled, tokens)
    confidence = torch.gather(probs, -1, sampled.clamp(max=cfg.mask_token - 1)[..., None])[..., 0]
    confidence = torch.where(mask, confidence, torch.full_like(confidence, float("inf")))
    u = torch.rand(confidence.shape, generator=generator).clamp(1e-20, 1 - 1e-7)
    confidence = torch.log(confidence) - torch.log(-torch.log(u)) * randomize_temperature * (1 - progress)
    k = int(min(max(math.floor(arccos_ratio(progress) * N * M), 1), max(num_masked - 1, 0)))
    threshold = torch.sort(confidence.view(B, -1), dim=-1).values[:, k - 1:k]       # (B, 1)
    remask = (confidence.view(B, -1) <= threshold).view(B, N, M)
    return torch.where(remask, torch.full_like(sampled, cfg.mask_token), sampled), sampled


@torch.inference_mode()
def official_generate(model: Generator, labels: torch.Tensor, num_steps: int, guidance_scale: float,
                      scale_pow: float, randomize_temperature: float, seed: int = 0) -> torch.Tensor:
    """The final sampled groups [B,N,M] of the official-style loop."""
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(labels), cfg.num_tokens, cfg.codebook_splits), cfg.mask_token, dtype=torch.int64)
    sampled = tokens
    for i in range(num_steps):
        tokens, sampled = official_step(model, tokens, labels, i, num_steps, guidance_scale, scale_pow,
                                        randomize_temperature, generator)
    return sampled
