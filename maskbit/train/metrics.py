"""Training metrics (MASKBIT_SPEC 7.1) and the JSON-lines metrics log.

PSNR and SSIM are `maskbit.image_quality`'s, the same functions `maskbit-eval reconstruction` reports.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from maskbit_runtime.files import atomic_write_text


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
