"""VQGAN+ tokenizer (official ConvVQModel): conv encoder, quantizer, conv decoder.

Legend: B batch, C channels, H/W image size, h/w latent grid (H / stride), K token size.
Arithmetic follows MASKBIT_SPEC section 1: TF-style "same" padding, GroupNorm(32, eps 1e-6), and the
residual-block quirk where a channel-changing block adds its 1x1 shortcut of its *own output*, not of its input.
Images are float RGB in [0, 1]; the decoder output is unclamped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TokenizerConfig
from .quantizers import LookupFreeQuantizer, QuantizerOutput, VectorQuantizer


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding: asymmetric (bottom/right) when the total padding is odd."""

    def _pad(self, size: int, dim: int) -> tuple[int, int]:
        k, s, d = self.kernel_size[dim], self.stride[dim], self.dilation[dim]
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pad(x.shape[-2], 0)
        left, right = self._pad(x.shape[-1], 1)
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return super().forward(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = Conv2dSame(in_channels, out_channels, 3, bias=False)
        self.norm2 = group_norm(out_channels)
        self.conv2 = Conv2dSame(out_channels, out_channels, 3, bias=False)
        changes_width = in_channels != out_channels
        self.nin_shortcut = Conv2dSame(out_channels, out_channels, 1, bias=False) if changes_width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is None:
            return h + x
        return h + self.nin_shortcut(h)    # official quirk: the block input is discarded


class ResidualStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            [ResidualBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res_blocks:
            x = block(x)
        return x


class DownsamplingStage(ResidualStage):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, sample_with_conv: bool):
        super().__init__(in_channels, out_channels, num_blocks)
        self.down_conv = Conv2dSame(out_channels, out_channels, 3, stride=2) if sample_with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return self.down_conv(x) if self.down_conv is not None else F.avg_pool2d(x, 2, 2)   # (B, C, H/2, W/2)


class UpsamplingStage(ResidualStage):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int):
        super().__init__(in_channels, out_channels, num_blocks)
        self.upsample_conv = Conv2dSame(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(super().forward(x), scale_factor=2.0, mode="nearest")             # (B, C, 2H, 2W)
        return self.upsample_conv(x)


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        width = [cfg.hidden_channels * m for m in (1, *cfg.channel_mult)]
        last = cfg.num_resolutions - 1
        self.conv_in = Conv2dSame(cfg.num_channels, cfg.hidden_channels, 3, bias=False)
        self.down = nn.ModuleList([
            DownsamplingStage(width[i], width[i + 1], cfg.num_res_blocks, cfg.sample_with_conv) if i < last
            else ResidualStage(width[i], width[i + 1], cfg.num_res_blocks)
            for i in range(cfg.num_resolutions)])
        self.mid = ResidualStage(width[-1], width[-1], cfg.num_res_blocks)
        self.norm_out = group_norm(width[-1])
        self.conv_out = Conv2dSame(width[-1], cfg.token_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down:
            x = stage(x)                                             # (B, C_i, H / 2^i, W / 2^i)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))              # (B, K, h, w)


class Decoder(nn.Module):
    """Stages run from the latent resolution up; the legacy (MaskGIT) layout stores them in reverse order."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        mult = (*cfg.channel_mult, cfg.channel_mult[-1])
        blocks = cfg.num_res_blocks_decoder
        self.legacy = cfg.legacy_decoder
        width = cfg.hidden_channels * cfg.channel_mult[-1]
        self.conv_in = Conv2dSame(cfg.token_size, width, 3)
        self.mid = ResidualStage(width, width, blocks)
        stages = []
        for level in reversed(range(cfg.num_resolutions)):
            c_in, c_out = cfg.hidden_channels * mult[level + 1], cfg.hidden_channels * mult[level]
            stages.append(UpsamplingStage(c_in, c_out, blocks) if level > 0 else ResidualStage(c_in, c_out, blocks))
        self.up = nn.ModuleList(stages[::-1] if self.legacy else stages)
        self.norm_out = group_norm(cfg.hidden_channels)
        self.conv_out = Conv2dSame(cfg.hidden_channels, cfg.num_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))                                # (B, C, h, w)
        for stage in (reversed(self.up) if self.legacy else self.up):
            x = stage(x)                                             # up to (B, hidden, H, W)
        return self.conv_out(F.silu(self.norm_out(x)))              # (B, 3, H, W)


class Tokenizer(nn.Module):
    """ConvVQModel: images [0,1] <-> token indices. State-dict keys equal the official ones."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.is_lookup_free:
            self.quantize = LookupFreeQuantizer(config.token_size, config.commitment_cost, config.entropy_loss_weight,
                                                config.entropy_loss_temperature, config.entropy_gamma)
        else:
            self.quantize = VectorQuantizer(config.codebook_size, config.token_size, config.commitment_cost,
                                            config.entropy_loss_weight, config.entropy_loss_temperature,
                                            config.entropy_gamma, config.use_l2_normalisation)

    def quantize_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """(z_q [B,K,h,w], quantizer output) of images [B,3,H,W]."""
        return self.quantize(self.encoder(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [0,1] -> token indices int64 [B,h,w]."""
        return self.quantize_latents(images)[1].indices

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q)

    def decode_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Token indices [B,h,w] or [B,h*w] -> images [B,3,H,W] (unclamped)."""
        if indices.dim() == 2:
            side = math.isqrt(indices.shape[1])
            indices = indices.reshape(indices.shape[0], side, side)
        z = self.quantize.get_codebook_entry(indices)               # (B, h, w, K)
        return self.decoder(z.permute(0, 3, 1, 2).contiguous())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        z_q, out = self.quantize_latents(images)
        return self.decoder(z_q), out


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoder output [B,3,H,W] -> uint8 [B,H,W,3]: clamp to [0,1], x255, round (the exported decoder does the same).
    The cast comes last, so in the exported graph uint8 exists only as the graph's output (TensorRT's ONNX parser
    refuses uint8 tensors inside a network)."""
    return torch.round(images.clamp(0.0, 1.0) * 255.0).permute(0, 2, 3, 1).to(torch.uint8)
