"""Image files for the command line: reading (resize + centre crop) and atomic PNG writing, with Pillow."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def _pil():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImportError("image files need Pillow: pip install pillow") from None
    return Image, UnidentifiedImageError


def load_image(path: str | Path, size: int) -> np.ndarray:
    """An image file -> uint8 [size, size, 3]: shorter side resized to `size` (bicubic), then centre-cropped."""
    Image, UnidentifiedImageError = _pil()
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = size / min(img.size)
            w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
            img = img.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except FileNotFoundError:
        raise ValueError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "corrupt file"
        raise ValueError(f"cannot read image {path}: {reason}") from None


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 [B,H,W,3] -> one uint8 image with the batch laid out in rows."""
    count, height, width, _ = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        y, x = padding + r * (height + padding), padding + c * (width + padding)
        grid[y:y + height, x:x + width] = image
    return grid


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a PNG through a temporary file, so an interrupted write leaves no half-written image."""
    Image, _ = _pil()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_images(images: np.ndarray, out: str | Path, names: list[str] | None = None,
                columns: int | None = None) -> list[Path]:
    """A `.png` path gets one grid; any other path is a directory that gets one PNG per image."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        return [save_png(make_grid(images, columns), out)]
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; give a directory or a .png file")
    names = names or [f"{i:04d}" for i in range(len(images))]
    return [save_png(image, out / f"{name}.png") for image, name in zip(images, names)]
