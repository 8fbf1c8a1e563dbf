"""Evaluation metrics (MASKBIT_SPEC 7.1) and the JSON-lines metrics log.

PSNR and SSIM take images in [0, 1] (clamped here), [B,3,H,W], and average per-image values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from maskbit_runtime.files import atomic_write_text


def psnr(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image 10*log10(1 / (MSE + 1e-10)) in float64, shape [B]."""
    x, y = images.double().clamp(0, 1), recon.double().clamp(0, 1)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / (mse + 1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]                                                   # (11, 11)


def ssim_map(images: torch.Tensor, recon: torch.Tensor, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM map [B,C,H,W]: 11x11 Gaussian (sigma 1.5), reflect padding 5, depthwise, data range 1."""
    x, y = images.double().clamp(0, 1), recon.double().clamp(0, 1)
    channels = x.shape[1]
    window = _gaussian_window().to(x.device).expand(channels, 1, 11, 11)

    def blur(t):
        return F.conv2d(F.pad(t, [5, 5, 5, 5], mode="reflect"), window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = k1 ** 2, k2 ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image mean SSIM, shape [B]."""
    return ssim_map(images, recon).flatten(1).mean(1)


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage = |unique| / codebook size; entropy = -sum p log2(p + 1e-8) of the index histogram (bits)."""
    counts = torch.bincount(indices.flatten().long(), minlength=codebook_size).double()
    p = counts / counts.sum()
    return {"codebook_usage": float((counts > 0).sum() / codebook_size),
            "codebook_entropy": float(-(p * torch.log2(p + 1e-8)).sum())}


def masked_group_stats(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Accuracy and plain cross-entropy (nats) over masked groups only; logits [B,N,M,C]."""
    sel = mask.reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1]).float()[sel]
    tgt = targets.reshape(-1)[sel]
    if tgt.numel() == 0:
        return {"masked_accuracy": float("nan"), "masked_ce": float("nan"), "masked_count": 0}
    return {"masked_accuracy": float((flat.argmax(-1) == tgt).double().mean()),
            "masked_ce": float(F.cross_entropy(flat, tgt)), "masked_count": int(tgt.numel())}


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` (and TensorBoard scalars when it is installed).

    On resume from step s, lines with a step > s (written after the checkpoint) are dropped first.
    """

    def __init__(self, output_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:
                self._writer = None

    def write(self, record: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (torch.Tensor, float)) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=True) + "\n")
        if self._writer is not None:
            step = int(record.get("step", 0))
            for k, v in clean.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
