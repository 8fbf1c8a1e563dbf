"""Image sets to evaluate: an image folder or an ADM-style `.npz` (`arr_0` uint8 [N,H,W,3]), read in batches.

Rules (checked before any feature is computed, so bad input fails fast and nothing is written):
- a folder is searched recursively for .png/.jpg/.jpeg/.webp/.bmp files, in sorted path order; an empty folder
  is refused;
- every image follows the runtime's one image rule (`maskbit_runtime.images`: `open_image` refuses more than
  MAX_PIXELS pixels from the header, before decoding; `to_rgb` converts every mode, 16-bit and float included, and
  composites alpha on white), as the training data reader does; an `.npz` image larger than MAX_PIXELS is refused;
- all images of one set must have the same size; mixed sizes are refused, not resized (resizing changes FID, so
  the user chooses the rule: the ADM protocol uses 256x256 center crops). Two sets may differ in size: the
  feature networks resize internally (Inception to 299x299, bilinear; the demo network pools to 32x32);
- an `.npz` holding `arr_0` is an image set even when it also holds statistics (ADM reference batches hold both:
  their `mu`/`sigma` come from TensorFlow's Inception, so both sides are recomputed with the same network).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskbit_runtime.errors import InputError, MaskbitError
from maskbit_runtime.images import check_pixels, open_image, to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageSet:
    """A folder or an npz of same-size RGB images; `batches()` reads them without holding all in memory."""

    path: Path
    count: int
    height: int
    width: int
    files: tuple[Path, ...] = ()       # folder sets only

    @property
    def is_npz(self) -> bool:
        return not self.files

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 [b,H,W,3] batches of at most `batch_size` images, in order."""
        if self.is_npz:
            yield from _npz_batches(self.path, batch_size)
            return
        for start in range(0, self.count, batch_size):
            yield np.stack([_read_rgb(f) for f in self.files[start:start + batch_size]])

    def load(self) -> np.ndarray:
        """All images as uint8 [N,H,W,3]."""
        return np.concatenate(list(self.batches(256)))


def is_npz_with(path: Path, key: str) -> bool:
    if path.suffix != ".npz" or not path.is_file():
        return False
    with zipfile.ZipFile(path) as archive:
        return f"{key}.npy" in archive.namelist()


def open_images(path: str | Path) -> ImageSet:
    """Check an image folder or an `.npz` with `arr_0` and describe it (count, size); reads headers only."""
    path = Path(path)
    if path.is_dir():
        return _open_folder(path)
    if not path.exists():
        raise InputError(f"no such image folder or .npz file: {path}")
    if path.suffix != ".npz":
        raise InputError(f"{path} is neither an image folder nor an .npz file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InputError(f"{path} is not a readable .npz file") from None
    with archive:
        if "arr_0.npy" not in archive.namelist():
            raise InputError(f"{path} holds no images: expected `arr_0` uint8 [N,H,W,3] "
                             f"(found {', '.join(n.removesuffix('.npy') for n in archive.namelist()) or 'nothing'})")
        with archive.open("arr_0.npy") as stream:
            shape, dtype = _npy_header(stream, path)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise InputError(f"{path}: arr_0 must be uint8 [N,H,W,3], found {dtype} {list(shape)}")
    if shape[0] == 0:
        raise InputError(f"{path}: arr_0 holds no images")
    check_pixels(int(shape[2]), int(shape[1]), f"{path} arr_0")
    return ImageSet(path, int(shape[0]), int(shape[1]), int(shape[2]))


def _open_folder(folder: Path) -> ImageSet:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)} files, recursively)")
    sizes = {}
    for file in files:
        try:
            with open_image(file, str(file)) as image:        # the pixel limit, from the header
                sizes.setdefault(image.size, file)
        except MaskbitError:
            raise
        except (OSError, ValueError, SyntaxError):            # PIL.UnidentifiedImageError is an OSError
            raise InputError(f"cannot read image {file}") from None
        if len(sizes) > 1:
            (w0, h0), first = next(iter(sizes.items()))
            raise InputError(f"images of mixed sizes in {folder}: {first.name} is {w0}x{h0}, {file.name} is "
                             f"{image.size[0]}x{image.size[1]}; resize them to one size first (the ADM protocol "
                             f"uses 256x256 center crops)")
    (width, height), _ = next(iter(sizes.items()))
    return ImageSet(folder, len(files), height, width, tuple(files))


def _read_rgb(file: Path) -> np.ndarray:
    try:
        with open_image(file, str(file)) as image:
            image.load()
            return np.asarray(to_rgb(image, str(file)))
    except MaskbitError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:     # a file that changed or is truncated
        raise InputError(f"cannot read image {file}: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def _npy_header(stream, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran_order, dtype = reader(stream)
    except ValueError as exc:
        raise InputError(f"{path}: arr_0 is not a readable array ({exc})") from None
    if fortran_order:
        raise InputError(f"{path}: arr_0 is stored in Fortran order; save it C-contiguous (np.savez)")
    return tuple(shape), np.dtype(dtype)


def _npz_batches(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    """Stream arr_0 from the zip member (compressed or not) without loading the whole array."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as stream:
        shape, dtype = _npy_header(stream, path)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = stream.read(n * row)
            if len(data) != n * row:
                raise InputError(f"{path}: arr_0 is truncated (image {start + len(data) // row} of {shape[0]})")
            yield np.frombuffer(bytearray(data), dtype).reshape(n, *shape[1:])     # writable
