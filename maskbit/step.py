"""One unmasking step (transformer + guidance + draw + re-masking), the module every backend runs.

Legend: B batch, N tokens, M groups, C classes per group (C is also the mask value), G = N*M groups per image.
The eager sampler calls this module and `maskbit_export` exports the same one, so eager and exported
generation compute one function. No random numbers are drawn inside: `noise` carries the uniforms.
Inputs and outputs follow the step contract of DESIGN.md; the arithmetic of the draw stays float32.
"""

from __future__ import annotations

import torch
from torch import nn

from .generator import Generator


def guided_logits(generator: Generator, tokens: torch.Tensor, labels: torch.Tensor,
                  guidance_scale: torch.Tensor) -> torch.Tensor:
    """cond + scale * (cond - uncond), from one forward over the doubled batch; `guidance_scale` is [B] or []."""
    B = tokens.shape[0]
    drop = torch.cat([torch.zeros_like(labels, dtype=torch.bool), torch.ones_like(labels, dtype=torch.bool)])
    logits = generator(torch.cat([tokens, tokens]), torch.cat([labels, labels]), drop)   # (2B, N, M, C)
    cond, uncond = logits[:B], logits[B:]
    return cond + per_row(guidance_scale, cond) * (cond - uncond)


def per_row(setting: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A step setting ([B] one per row, or [] for the whole batch) shaped to broadcast against `like` [B, ...]."""
    return setting.reshape(-1, *([1] * (like.dim() - 1)))


def categorical_draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Exact inverse-CDF draw: the first class whose cumulative probability exceeds u * total."""
    cdf = torch.cumsum(probs, dim=-1)                                             # (B, N, M, C)
    threshold = uniform[..., None] * cdf[..., -1:]
    drawn = (cdf <= threshold).long().sum(-1)                                     # (B, N, M)
    return torch.clamp(drawn, max=probs.shape[-1] - 1)


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform))


def lowest_k_mask(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """True for exactly the k lowest entries of each row [B, G] (k: [B] or []); ties go to the lower position."""
    G = confidence.shape[1]
    c_i, c_j = confidence[:, :, None], confidence[:, None, :]                    # (B, G, 1), (B, 1, G)
    position = torch.arange(G, device=confidence.device)
    earlier = position[None, :] < position[:, None]                               # (G, G): j before i
    beaten_by = (c_j < c_i) | ((c_j == c_i) & earlier)                            # (B, G, G)
    rank = beaten_by.long().sum(-1)                                               # (B, G)
    return rank < per_row(k, rank)


class GenerationStep(nn.Module):
    """(tokens, labels, noise, guidance_scale, softmax_temperature, confidence_noise_scale, num_to_mask)
    -> (next_tokens, sampled). The four settings hold one value per row ([B]), so rows at different steps of
    different generations share a call. With `guidance=False` it runs the conditional model only and ignores the
    scale."""

    def __init__(self, generator: Generator, guidance: bool = True):
        super().__init__()
        self.generator = generator
        self.guidance = guidance
        self.mask_token = generator.config.mask_token

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor, guidance_scale: torch.Tensor,
                softmax_temperature: torch.Tensor, confidence_noise_scale: torch.Tensor,
                num_to_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.guidance:
            logits = guided_logits(self.generator, tokens, labels, guidance_scale)
        else:
            logits = self.generator(tokens, labels, torch.zeros_like(labels, dtype=torch.bool))
        probs = torch.softmax(logits.float() / per_row(softmax_temperature, logits), dim=-1)   # (B, N, M, C)
        drawn = categorical_draw(probs, noise[..., 0])
        masked = tokens == self.mask_token
        sampled = torch.where(masked, drawn, tokens)                              # (B, N, M)
        p_drawn = torch.gather(probs, -1, sampled.clamp(max=self.mask_token - 1)[..., None])[..., 0]
        confidence = torch.log(p_drawn) + gumbel(noise[..., 1]) * per_row(confidence_noise_scale, p_drawn)
        confidence = torch.where(masked, confidence, torch.full_like(confidence, float("inf")))
        B = tokens.shape[0]
        remask = lowest_k_mask(confidence.reshape(B, -1), num_to_mask).view_as(tokens)
        next_tokens = torch.where(remask, torch.full_like(sampled, self.mask_token), sampled)
        return next_tokens, sampled
