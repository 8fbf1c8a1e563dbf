"""PSNR and SSIM of image pairs, defined once: training logs them and `maskbit-eval reconstruction` reports them.

Both follow the official evaluation (MASKBIT_SPEC 7.1), so figures compare with the paper's tables:
- PSNR: per image in float64, 10 log10(1 / (MSE + 1e-10)) on [0, 1] images.
- SSIM: Wang et al. (2004) with their constants: an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data
  range 1, population (co)variances, per channel (depthwise); reflect padding 5 so the map covers the whole
  image; per image the mean of the map over channels and pixels. Inside the border this is scikit-image's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`; scikit-image's default
  (a 7x7 uniform window with sample covariance) is another, non-standard SSIM and gives other numbers.

Tensors are float [B,C,H,W] in [0, 1] (clamped here), on any device; values are float64 [B]. The Gaussian is
applied as two 1-D passes (it is separable), 11+11 instead of 121 multiply-adds per pixel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def psnr(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image 10*log10(1 / (MSE + 1e-10)) in float64, shape [B]."""
    x, y = images.double().clamp(0, 1), recon.double().clamp(0, 1)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / (mse + 1e-10))


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> torch.Tensor:
    """The normalized 1-D Gaussian (float64, [size]); the 2-D window is its outer product."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_map(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """SSIM map [B,C,H,W] (float64) of images in [0, 1]."""
    x, y = images.double().clamp(0, 1), recon.double().clamp(0, 1)
    channels, pad = x.shape[1], WINDOW // 2
    g = gaussian_window().to(x.device)
    rows = g.view(1, 1, 1, WINDOW).expand(channels, 1, 1, WINDOW)
    cols = g.view(1, 1, WINDOW, 1).expand(channels, 1, WINDOW, 1)

    def blur(t):                                                     # (B, C, H, W) -> (B, C, H, W)
        t = F.pad(t, [pad, pad, pad, pad], mode="reflect")            # (B, C, H+10, W+10)
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = K1 ** 2, K2 ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image mean SSIM, float64 [B]."""
    return ssim_map(images, recon).flatten(1).mean(1)


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 images [B,H,W,C] (what the runtime decodes) as float64 [B,C,H,W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double() / 255.0
