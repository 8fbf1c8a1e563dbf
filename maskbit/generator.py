"""MaskBit generator (official LFQBert): a BERT-style transformer over groups of bits.

Legend: B batch, N image tokens, M groups per token, E bits per group (K = M*E), C = 2**E classes per group,
D hidden size, L = N + 1 sequence length (class token last).
A group value in [0, C) is E bits; the value C means "masked" and enters the model as all-zero bits.
Written for export: integer division/remainder instead of bitwise ops, `where` instead of masked assignment,
and inputs are never modified (the official model writes dropped labels into the caller's tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GeneratorConfig

LAYER_NORM_EPS = 1e-12


class SelfAttention(nn.Module):
    """Multi-head self-attention with the packed parameters of torch.nn.MultiheadAttention (same keys)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)                 # (B, L, 3D)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, heads, L, D/heads)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(a.transpose(1, 2).reshape(B, L, D))                 # (B, L, D)


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, prenorm: bool):
        super().__init__()
        self.prenorm = prenorm
        self.mha = SelfAttention(dim, heads, dropout)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prenorm:
            return x + self.dropout(self.mha(self.norm(x)))
        return self.norm(x + self.dropout(self.mha(x)))


class FeedForwardBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, prenorm: bool):
        super().__init__()
        self.prenorm = prenorm
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prenorm:
            return x + self.net(self.norm(x))
        return self.norm(x + self.net(x))


class Transformer(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([AttentionBlock(cfg.hidden_dim, cfg.heads, cfg.dropout, cfg.use_prenorm),
                           FeedForwardBlock(cfg.hidden_dim, cfg.mlp_dim, cfg.dropout, cfg.use_prenorm)])
            for _ in range(cfg.depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attention, feed_forward in self.layers:
            x = feed_forward(attention(x))
        return x


class Generator(nn.Module):
    """LFQBert: (groups [B,N,M], labels [B], drop_label_mask [B]) -> logits [B,N,M,C]."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        cfg = config
        dim = cfg.hidden_dim
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.num_tokens + 1, dim))
        self.register_buffer("bits_to_indices", torch.pow(2.0, torch.arange(cfg.bits_per_group)).int())
        self.class_emb = nn.Embedding(cfg.num_classes + 1, dim)    # last row: the dropped ("unconditional") label
        self.input_proj = nn.Linear(cfg.num_bits, dim)
        self.first_layer = nn.Sequential(nn.LayerNorm(dim, eps=LAYER_NORM_EPS), nn.Dropout(cfg.dropout))
        self.transformer = Transformer(cfg)
        if cfg.use_prenorm:
            self.norm_after_transformer = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.last_layer = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=LAYER_NORM_EPS))
        self.prediction_layer = nn.Linear(dim, cfg.codebook_splits * cfg.group_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init (MASKBIT_SPEC 4.3): trunc-normal(0.02) linears and embeddings; packed in_proj keeps xavier."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_emb, std=0.02, a=-2.0, b=2.0)

    def groups_to_bits(self, groups: torch.Tensor) -> torch.Tensor:
        """Groups [B,N,M] -> input features [B,N,K]: +-1 per bit (LSB first), 0 for every bit of a masked group."""
        powers = self.bits_to_indices.long()                                       # (E,)
        bits = torch.remainder(torch.div(groups[..., None], powers, rounding_mode="floor"), 2)  # (B, N, M, E)
        signs = bits.float() * 2.0 - 1.0
        masked = (groups == self.config.mask_token)[..., None]
        signs = torch.where(masked, torch.zeros_like(signs), signs)
        return signs.flatten(2)                                                     # (B, N, K)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, drop_label_mask: torch.Tensor) -> torch.Tensor:
        """tokens: groups [B,N,M] (value C = masked); labels [B]; drop_label_mask [B] -> logits [B,N,M,C]."""
        cfg = self.config
        labels = torch.where(drop_label_mask, torch.full_like(labels, cfg.num_classes), labels)
        x = self.input_proj(self.groups_to_bits(tokens))                            # (B, N, D)
        x = torch.cat([x, self.class_emb(labels)[:, None]], dim=1) + self.pos_emb   # (B, L, D)
        x = self.transformer(self.first_layer(x))
        if cfg.use_prenorm:
            x = self.norm_after_transformer(x)
        logits = self.prediction_layer(self.last_layer(x))                          # (B, L, M*C)
        logits = logits.view(x.shape[0], x.shape[1], cfg.codebook_splits, cfg.group_classes)
        return logits[:, :cfg.num_tokens]                                           # (B, N, M, C)
