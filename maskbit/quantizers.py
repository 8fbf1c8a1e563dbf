"""Quantizers of the VQGAN+ tokenizer: lookup-free (bit tokens) and lookup (VQ codebook).

Legend: B batch, K bits (LFQ) or embedding dim (VQ), H/W latent grid, C codes.
Both return (z_q [B,K,H,W] with a straight-through gradient, QuantizerOutput). Losses follow MASKBIT_SPEC 1.9-1.11.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bits import index_to_signs, signs_to_index


@dataclass
class QuantizerOutput:
    indices: torch.Tensor             # (B, H, W) int64
    quantizer_loss: torch.Tensor
    commitment_loss: torch.Tensor
    entropy_loss: torch.Tensor
    per_sample_entropy: torch.Tensor
    avg_entropy: torch.Tensor
    codebook_loss: torch.Tensor | None = None


def clamp_log(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return torch.log(torch.clamp(x, min=eps))


def entropy_loss_fn(affinity: torch.Tensor, temperature: float,
                    gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample entropy, gamma * entropy of the mean distribution) of softmax(affinity / T) over codes."""
    flat = affinity.reshape(-1, affinity.shape[-1]) / temperature        # (M, C)
    probs = F.softmax(flat, dim=-1)
    avg_probs = probs.mean(0)
    per_sample_entropy = torch.mean(-(probs * clamp_log(probs)).sum(-1))
    avg_entropy = -(avg_probs * clamp_log(avg_probs)).sum()
    return per_sample_entropy, avg_entropy * gamma


class LookupFreeQuantizer(nn.Module):
    """Sign quantization: every latent channel is one bit (channel k = bit k, LSB first)."""

    def __init__(self, token_bits: int, commitment_cost: float = 0.25, entropy_loss_weight: float = 0.02,
                 entropy_loss_temperature: float = 0.01, entropy_gamma: float = 1.0):
        super().__init__()
        self.token_bits = token_bits
        self.commitment_cost = commitment_cost
        self.entropy_loss_weight = entropy_loss_weight
        self.entropy_loss_temperature = entropy_loss_temperature
        self.entropy_gamma = entropy_gamma
        # persistent buffers, as in the official state dict
        self.register_buffer("bits_to_indices", torch.pow(2.0, torch.arange(token_bits)).int())
        self.register_buffer("codebook", index_to_signs(torch.arange(2 ** token_bits), token_bits))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        z = z.permute(0, 2, 3, 1)                                    # (B, H, W, K)
        z_q = torch.where(z > 0, torch.ones_like(z), -torch.ones_like(z))
        indices = signs_to_index(z_q)                                # (B, H, W)
        commitment_loss = self.commitment_cost * torch.mean((z_q.detach() - z) ** 2)
        zero = z.new_zeros(())
        entropy_loss = per_sample_entropy = avg_entropy = zero
        if self.training and self.entropy_loss_weight != 0:
            affinity = 2.0 * torch.einsum("bhwk,ck->bhwc", z, self.codebook)   # (B, H, W, 2**K)
            per_sample_entropy, avg_entropy = entropy_loss_fn(affinity, self.entropy_loss_temperature,
                                                              self.entropy_gamma)
            entropy_loss = self.entropy_loss_weight * (per_sample_entropy - avg_entropy)
        z_q = z + (z_q - z).detach()
        out = QuantizerOutput(indices, commitment_loss + entropy_loss, commitment_loss, entropy_loss,
                              per_sample_entropy, avg_entropy)
        return z_q.permute(0, 3, 1, 2).contiguous(), out

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [...] -> latent vectors [..., K] in {-1, +1}."""
        return index_to_signs(indices, self.token_bits)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantization (official SimpleVectorizer), optional L2 normalisation."""

    def __init__(self, codebook_size: int, token_size: int, commitment_cost: float = 0.25,
                 entropy_loss_weight: float = 0.0, entropy_loss_temperature: float = 0.01, entropy_gamma: float = 1.0,
                 use_l2_normalisation: bool = False):
        super().__init__()
        self.commitment_cost = commitment_cost
        self.entropy_loss_weight = entropy_loss_weight
        self.entropy_loss_temperature = entropy_loss_temperature
        self.entropy_gamma = entropy_gamma
        self.use_l2_normalisation = use_l2_normalisation
        self.embedding = nn.Embedding(codebook_size, token_size)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        z = z.permute(0, 2, 3, 1)                                    # (B, H, W, D)
        embedding = self.embedding.weight                            # (C, D)
        if self.use_l2_normalisation:
            z = F.normalize(z, dim=-1)
            embedding = F.normalize(embedding, dim=-1)
        flat = z.reshape(-1, z.shape[-1])                            # (BHW, D)
        distances = (torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(embedding ** 2, dim=1)
                     - 2 * torch.einsum("bd,dn->bn", flat, embedding.T))           # (BHW, C)
        indices = torch.argmin(distances, dim=1)
        z_q = self.get_codebook_entry(indices).view(z.shape)
        commitment_loss = self.commitment_cost * torch.mean((z_q.detach() - z) ** 2)
        codebook_loss = torch.mean((z_q - z.detach()) ** 2)
        zero = z.new_zeros(())
        entropy_loss = per_sample_entropy = avg_entropy = zero
        if self.training and self.entropy_loss_weight != 0:
            per_sample_entropy, avg_entropy = entropy_loss_fn(-distances, self.entropy_loss_temperature,
                                                              self.entropy_gamma)
            entropy_loss = self.entropy_loss_weight * (per_sample_entropy - avg_entropy)
        z_q = z + (z_q - z).detach()
        out = QuantizerOutput(indices.view(z.shape[:-1]), commitment_loss + codebook_loss + entropy_loss,
                              commitment_loss, entropy_loss, per_sample_entropy, avg_entropy, codebook_loss)
        return z_q.permute(0, 3, 1, 2).contiguous(), out

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [...] -> embeddings [..., D] (re-normalised when the L2 option is on)."""
        z_q = self.embedding(indices.long())
        return F.normalize(z_q, dim=-1) if self.use_l2_normalisation else z_q
