"""Shared helpers of the training tests: a small photo dataset and a fast run configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")

# fast settings for CI: no perceptual network (ResNet-50 at 224 is too slow on 2 cores), short warmup
FAST = ("losses.perceptual_weight=0", "lr_scheduler.params.warmup_steps=5", "discriminator.hidden_channels=32",
        "experiment.log_every=1", "experiment.eval_images=16")

torch.set_num_threads(1)


def make_photo_folder(root: Path, per_photo: int = 6, size: int = 48, seed: int = 0) -> Path:
    """Crops of scikit-image's colour sample photos; one class folder per photo, PNG files."""
    import skimage.data
    rng = np.random.default_rng(seed)
    for label, name in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()
        folder = root / f"{label}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = photo.shape[:2]
        for i in range(per_photo):
            crop = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
            top, left = int(rng.integers(0, h - crop)), int(rng.integers(0, w - crop))
            tile = Image.fromarray(photo[top:top + crop, left:left + crop, :3]).resize((size, size), Image.BICUBIC)
            tile.save(folder / f"{i:03d}.png")
    return root


def env(threads: int = 1) -> dict:
    out = dict(os.environ)
    out.update(PYTHONPATH=str(REPO) + os.pathsep + out.get("PYTHONPATH", ""), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    return out


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "maskbit.train.cli", *args], capture_output=True, text=True,
                          check=False, env=env(), cwd=REPO, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"maskbit-train {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc
