"""Image files for the command line and the training data: reading (centre crop, then resize), one rule that turns
every Pillow mode into 8-bit RGB, and PNG writing through a unique temporary file.

The mode rule (`to_rgb`), used by `load_image` and by `maskbit.train.data` alike:
- 8-bit modes without alpha (1, L, P, RGB, CMYK, YCbCr, ...): Pillow's own conversion to RGB.
- Alpha (LA, La, PA, RGBA, RGBa, and P/L/RGB with a transparent colour): composited on white (`BACKGROUND`).
- 16-bit integers (I;16, I;16B, I;16L, ... and I, which Pillow uses for 16-bit data from several formats):
  values must lie in 0..65535 and are scaled by 1/257 (65535 -> 255), rounded.
- Float (F): values must be finite and lie in [0, 1]; they are scaled by 255, rounded. Anything else is refused.
- A mode Pillow cannot convert to RGB is refused. Refusals are one line (`InputError`).
"""

from __future__ import annotations

import contextlib
import math
import re
import unicodedata
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError, MissingDependencyError
from .files import atomic_file

MAX_PIXELS = 8192 * 8192      # width x height of one input image; larger files are refused before decoding
BACKGROUND = (255, 255, 255)  # what transparent pixels become
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
MAX_FILENAME_BYTES = 200     # UTF-8 bytes kept by safe_filename (file systems allow 255)


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError("image files need Pillow: pip install pillow") from None
    return Image


def check_pixels(width: int, height: int, source: str) -> None:
    """Refuse an image whose header declares more than MAX_PIXELS (a decompression bomb or a mistake)."""
    if width * height > MAX_PIXELS:
        raise InputError(f"image {source} is {width}x{height} = {width * height:,} pixels, above the limit of "
                         f"{MAX_PIXELS:,}; downscale it first")


def open_image(path_or_file, source: str):
    """Image.open with our pixel limit checked from the header, before any pixel is decoded."""
    Image = _pil()
    with warnings.catch_warnings():           # our own limit is lower than Pillow's warning threshold
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path_or_file)
        except Image.DecompressionBombError as exc:
            raise InputError(f"image {source} is a decompression bomb: {exc}") from None
    try:
        check_pixels(img.width, img.height, source)
    except InputError:
        img.close()
        raise
    return img


def to_rgb(img, source: str = "image"):
    """A Pillow image of any mode -> an RGB Pillow image, by the rule in this module's docstring."""
    Image = _pil()
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise InputError(f"image {source}: mode {mode} values {values.min()}..{values.max()} are outside "
                             f"0..65535; save it as 8-bit or 16-bit RGB/grey")
        gray = np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float32)
        finite = values[np.isfinite(values)]
        if finite.size < values.size or (finite.size and (finite.min() < 0.0 or finite.max() > 1.0)):
            found = f"{finite.min():g}..{finite.max():g}" if finite.size else "no finite value"
            found += " and NaN/inf" if finite.size < values.size else ""
            raise InputError(f"image {source}: float (mode F) values must lie in [0, 1], found {found}; "
                             f"save it as 8-bit RGB")
        gray = np.round(values * 255.0).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")
    try:
        if mode in ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputError(f"image {source}: mode {mode} cannot be converted to RGB ({exc})") from None


def center_crop_resize(img, size: int, resample=None, source: str = "image"):
    """The centre square of side min(W, H), converted by `to_rgb` and resized to size x size: what resizing the
    shorter side to `size` and centre-cropping gives, but only the square (plus the filter's margin) is converted
    or resampled, so a 1 x 400000 image costs no more than a 1 x 1 one."""
    Image = _pil()
    resample = Image.Resampling.BICUBIC if resample is None else resample
    side = min(img.size)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    margin = math.ceil(2 * max(1.0, side / size)) + 1           # bicubic support: 2 pixels of the coarser grid
    x0, y0 = max(0, math.floor(left) - margin), max(0, math.floor(top) - margin)
    x1, y1 = min(img.width, math.ceil(left + side) + margin), min(img.height, math.ceil(top + side) + margin)
    region = to_rgb(img.crop((x0, y0, x1, y1)), source)
    box = (left - x0, top - y0, left - x0 + side, top - y0 + side)
    return region.resize((size, size), resample, box=box)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """An image file -> uint8 [size, size, 3]: the centre square, resized to `size` (bicubic), modes by `to_rgb`;
    files above MAX_PIXELS are refused before decoding."""
    Image = _pil()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {path} does not exist" if not path.exists() else f"image {path} is not a file")
    try:
        with open_image(path, str(path)) as img:
            img.draft(None, (size, size))          # JPEG: decode at a reduced scale, never below `size`
            return np.asarray(center_crop_resize(img, size, source=str(path)), dtype=np.uint8)
    except (Image.UnidentifiedImageError, OSError, SyntaxError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "corrupt file"
        raise InputError(f"cannot read image {path}: {reason}") from None


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
    """Write a PNG atomically (`files.atomic_file`: a unique temporary file, then a rename)."""
    Image = _pil()
    with atomic_file(path) as f:
        Image.fromarray(image).save(f, format="PNG")
    return Path(path)


def _image_suffixes() -> set[str]:
    suffixes = {".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".ico", ".avif"}
    with contextlib.suppress(ImportError):
        suffixes |= set(_pil().registered_extensions())
    return {s.lower() for s in suffixes}


def save_images(images: np.ndarray, out: str | Path, names: list[str] | None = None,
                columns: int | None = None) -> list[Path]:
    """A `.png` path gets one grid; a path without an image suffix is a directory that gets one PNG per image
    (file names pass through `safe_filename`); another image suffix (.jpg, ...) is refused."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".png":
        return [save_png(make_grid(images, columns), out)]
    if suffix in _image_suffixes():
        raise InputError(f"--out {out}: only PNG is written; give a .png file for one grid or a directory "
                         f"for one PNG per image")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory; give a directory or a .png file")
    names = [safe_filename(n) for n in names] if names else [f"{i:04d}" for i in range(len(images))]
    return [save_png(image, out / f"{name}.png") for image, name in zip(images, names)]


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")


def safe_filename(text: str) -> str:
    """Text (a class name, a label) -> one harmless file name component: no path separators, no '..', no control
    characters, no leading dots, whitespace runs as '_', at most MAX_FILENAME_BYTES bytes, never empty ('_' instead)."""
    text = re.sub(r"\s+", "_", unicodedata.normalize("NFC", str(text)).strip())   # "tiger cat" -> "tiger_cat"
    text = "".join("_" if unicodedata.category(ch).startswith("C") else ch for ch in text)
    text = _UNSAFE.sub("_", text).lstrip(".").replace("..", "_")
    while len(text.encode("utf-8")) > MAX_FILENAME_BYTES:
        text = text[:-1]
    return text.rstrip(" .") or "_"
