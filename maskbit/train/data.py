"""Training data: an image folder (one subfolder per class) or webdataset-style tar shards, and a resumable,
rank-sharded batch stream.

Determinism: each epoch is a permutation drawn from (seed, epoch); rank r of W reads positions r, r+W, ... of it,
so W ranks with batch b see the same images as one process with batch W*b. The crop and flip of a sample are drawn
from a generator seeded by (seed, epoch, index), so they do not depend on the rank, on workers or on resumption.
A corrupt image is skipped (the next sample takes its place) and counted, and so is one that cannot be used: more
than `maskbit_runtime.images.MAX_PIXELS` pixels (a decompression bomb), or a mode refused by `to_rgb`, the one rule
that turns every Pillow mode into RGB for the runtime and for training alike.
"""

from __future__ import annotations

import glob
import io
import math
import re
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from maskbit_runtime.errors import MaskbitError
from maskbit_runtime.images import center_crop_resize, open_image, to_rgb

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class DataError(MaskbitError, ValueError):
    """A dataset path or layout that cannot be used."""


@dataclass(frozen=True)
class Record:
    key: str             # file path, or "shard.tar:key"
    label: int
    shard: str = ""      # tar file ("" for a plain file)
    member: str = ""     # tar member name


# ----------------------------------------------------------------------------------------------------------
# Scanning


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo)
    out = []
    for i in range(int(lo), int(hi) + 1):
        out += _expand_braces(pattern[:match.start()] + str(i).zfill(width) + pattern[match.end():])
    return out


def scan_folder(root: Path) -> tuple[list[Record], list[str]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"dataset folder {root} has no class subfolders (expected {root}/<class>/<image>)")
    records = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not files:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTS)})")
        records += [Record(str(p), label) for p in files]
    return records, classes


def scan_shards(shards: list[str]) -> list[Record]:
    records = []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                names = [m.name for m in tar.getmembers() if m.isfile()]
                samples: dict[str, dict[str, str]] = {}
                for name in names:
                    key, _, ext = name.rpartition(".")
                    samples.setdefault(key, {})[ext.lower()] = name
                for key in sorted(samples):
                    parts = samples[key]
                    image = next((parts[e] for e in SHARD_IMAGE_EXTS if e in parts), None)
                    if image is None:
                        continue
                    if "cls" not in parts:
                        raise DataError(f"shard {shard}: sample {key!r} has no .cls label")
                    text = tar.extractfile(parts["cls"]).read().decode().strip()
                    try:
                        label = int(text)
                    except ValueError:
                        raise DataError(f"shard {shard}: sample {key!r} has a non-integer .cls {text!r}") from None
                    records.append(Record(f"{shard}:{key}", label, shard, image))
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"cannot read tar shard {shard}: {exc}") from None
    if not records:
        raise DataError(f"the tar shards {', '.join(shards)} hold no samples (key.jpg/png/webp + key.cls)")
    return records


def scan(path: str | Path) -> tuple[list[Record], int]:
    """(records, number of classes) of an image folder, a folder of .tar shards, a shard file or a pattern."""
    text = str(path)
    shards = sorted(f for pat in _expand_braces(text) for f in glob.glob(pat)) if any(c in text for c in "*?{") \
        else []
    root = Path(text)
    if not shards and root.is_dir():
        shards = sorted(str(p) for p in root.glob("*.tar"))
        if not shards:
            records, classes = scan_folder(root)
            return records, len(classes)
    elif not shards and root.is_file() and root.suffix == ".tar":
        shards = [text]
    if not shards:
        raise DataError(f"dataset path {text} does not exist (expected an image folder with one subfolder per "
                        f"class, a folder of .tar shards, or a shard pattern)")
    records = scan_shards(shards)
    return records, max(r.label for r in records) + 1


# ----------------------------------------------------------------------------------------------------------
# Transforms


def random_resized_crop_params(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                               gen: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params drawn from `gen`: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=gen).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=gen).item())
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class Preprocess:
    """Train: RandomResizedCrop + flip (6.5); eval: resize shorter side + centre crop. Output [3,R,R] in [0,1]."""

    resolution: int
    interpolation: str = "bilinear"
    min_scale: float = 0.8
    aspect_ratio_aug: bool = True
    random_crop: bool = True
    train: bool = True

    def __call__(self, image: Image.Image, gen: torch.Generator) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode
        bicubic = self.interpolation == "bicubic"
        mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
        size = [self.resolution, self.resolution]
        if not self.train or not self.random_crop:   # crop, then resize: a 1 x 400000 image stays cheap
            resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
            image = center_crop_resize(image, self.resolution, resample)
        else:
            ratio = (3 / 4, 4 / 3) if self.aspect_ratio_aug else (1.0, 1.0)
            top, left, h, w = random_resized_crop_params(image.width, image.height, (self.min_scale, 1.0), ratio, gen)
            image = TF.resized_crop(image, top, left, h, w, size, interpolation=mode)
        if self.train and torch.rand(1, generator=gen).item() < 0.5:
            image = TF.hflip(image)
        return TF.to_tensor(image)


# ----------------------------------------------------------------------------------------------------------
# Reading and batching


class ImageSource:
    """Random access to decoded RGB images of the records; corrupt ones are counted in `corrupt`."""

    def __init__(self, records: list[Record]):
        self.records = records
        self.corrupt: dict[str, str] = {}
        self._tars: dict[str, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Image.Image | None:
        """The RGB image of record `index`, or None (and an entry in `corrupt`) when it cannot be used."""
        record = self.records[index]
        try:
            if record.shard:
                if record.shard not in self._tars:
                    self._tars[record.shard] = tarfile.open(record.shard)  # noqa: SIM115 (closed in close())
                tar = self._tars[record.shard]
                with open_image(io.BytesIO(tar.extractfile(record.member).read()), record.key) as image:
                    image.load()
                    return to_rgb(image, record.key)
            with open_image(record.key, record.key) as image:
                image.load()
                return to_rgb(image, record.key)
        except (OSError, ValueError, SyntaxError, EOFError, struct.error, tarfile.TarError, MaskbitError) as exc:
            self.corrupt[record.key] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return None

    def close(self) -> None:
        for tar in self._tars.values():
            tar.close()
        self._tars.clear()


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 12_345) % (2 ** 62)


class BatchStream:
    """Endless per-rank batches of (images [B,3,R,R], labels [B]); `state()` / `load_state()` resume exactly."""

    def __init__(self, source: ImageSource, preprocess: Preprocess, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if len(source) < world_size:
            raise DataError(f"{len(source)} images cannot be shared by {world_size} processes")
        self.source, self.preprocess, self.batch_size = source, preprocess, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.offset = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 9_973 + self.epoch)
        return torch.randperm(len(self.source), generator=gen)[self.rank::self.world_size].tolist()

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._epoch_order()

    def _next_index(self) -> tuple[int, int]:
        if self.offset >= len(self._order):
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._epoch_order()
        index = self._order[self.offset]
        self.offset += 1
        return self.epoch, index

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        misses = 0
        while len(images) < self.batch_size:
            epoch, index = self._next_index()
            image = self.source.load(index)
            if image is None:
                misses += 1
                if misses > max(len(self.source), self.batch_size):
                    raise DataError("every image read in a row was corrupt; check the dataset")
                continue
            gen = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, index))
            images.append(self.preprocess(image, gen))
            labels.append(self.source.records[index].label)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def eval_batches(source: ImageSource, preprocess: Preprocess, batch_size: int, limit: int):
    """Deterministic eval batches over `limit` images of a fixed permutation (rank-independent)."""
    images, labels = [], []
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(0)).tolist()
    gen = torch.Generator().manual_seed(0)
    for index in order[:limit] if limit else order:
        image = source.load(index)
        if image is None:
            continue
        images.append(preprocess(image, gen))
        labels.append(source.records[index].label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)
