"""VQGAN+ discriminator (official NLayerDiscriminatorv2, MASKBIT_SPEC 6.2); state-dict keys as Appendix B.

Legend: B batch, C channels, H/W image size. Output: patch logits [B,1,16,16].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..tokenizer import Conv2dSame

BLUR_TAPS = {3: (1.0, 2.0, 1.0), 4: (1.0, 3.0, 3.0, 1.0), 5: (1.0, 4.0, 6.0, 4.0, 1.0)}
CHANNEL_MULT = (1, 1, 2, 4, 8)


class BlurBlock(nn.Module):
    """Fixed depthwise blur with stride 2 and TF "same" padding (buffer `kernel` [1,1,k,k])."""

    def __init__(self, kernel_size: int = 4):
        super().__init__()
        if kernel_size not in BLUR_TAPS:
            raise ValueError(f"blur_kernel_size must be one of {sorted(BLUR_TAPS)}, got {kernel_size}")
        taps = torch.tensor(BLUR_TAPS[kernel_size])
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("kernel", (kernel / kernel.sum())[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel.shape[-1]
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((-(-size // 2) - 1) * 2 + k - size, 0)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
        weight = self.kernel.expand(x.shape[1], 1, k, k)
        return F.conv2d(x, weight, stride=2, groups=x.shape[1])                       # (B, C, H/2, W/2)


class Discriminator(nn.Module):
    def __init__(self, num_channels: int = 3, hidden_channels: int = 128, num_stages: int = 4,
                 blur_resample: bool = True, blur_kernel_size: int = 4):
        super().__init__()
        if num_stages > len(CHANNEL_MULT) - 1:
            raise ValueError(f"num_stages must be <= {len(CHANNEL_MULT) - 1}, got {num_stages}")
        self.block_in = nn.Sequential(Conv2dSame(num_channels, hidden_channels, 5), nn.LeakyReLU(0.1))
        blocks = []
        for s in range(num_stages):
            c_in, c_out = hidden_channels * CHANNEL_MULT[s], hidden_channels * CHANNEL_MULT[s + 1]
            down = BlurBlock(blur_kernel_size) if blur_resample else nn.AvgPool2d(2, 2)
            blocks.append(nn.Sequential(Conv2dSame(c_in, c_out, 3), down,
                                        nn.GroupNorm(32, c_out, eps=1e-5, affine=True), nn.LeakyReLU(0.1)))
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveMaxPool2d((16, 16))
        width = hidden_channels * CHANNEL_MULT[num_stages]
        self.to_logits = nn.Sequential(Conv2dSame(width, width, 1), nn.LeakyReLU(0.1), Conv2dSame(width, 1, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_in(x)                                                         # (B, hidden, H, W)
        for block in self.blocks:
            x = block(x)                                                             # (B, C_s, H/2^s, W/2^s)
        return self.to_logits(self.pool(x))                                          # (B, 1, 16, 16)
