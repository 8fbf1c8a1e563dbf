"""The demo dataset: random resized square crops of scikit-image's colour sample photos, one class per photo.

Deterministic for a seed; written as an image folder (one subfolder per class, in class order) that
`maskbit-train` reads like any user's data. Needs the `train` extra (scikit-image, Pillow).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

DEMO_CLASSES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                "stereo_motorcycle")


def demo_photo(name: str) -> np.ndarray:
    """One of the scikit-image sample photos as uint8 [H, W, 3] (the left view for the stereo pair)."""
    try:
        from skimage import data
    except ImportError:
        raise ImportError("the demo dataset needs scikit-image: pip install 'maskbit[train]'") from None
    if name not in DEMO_CLASSES:
        raise ValueError(f"unknown demo class {name!r}; expected one of {', '.join(DEMO_CLASSES)}")
    photo = getattr(data, name)()
    return np.ascontiguousarray(photo[0] if isinstance(photo, tuple) else photo)


def random_crop(photo: np.ndarray, rng: np.random.Generator, size: int, min_area: float = 0.25,
                max_area: float = 1.0) -> np.ndarray:
    """A square crop covering a random fraction of the photo's area (capped by its shorter side), resized to
    `size` with bicubic filtering and flipped horizontally with probability 0.5."""
    from PIL import Image
    height, width = photo.shape[:2]
    fraction = rng.uniform(min_area, max_area)
    side = min(int(round(math.sqrt(fraction * height * width))), height, width)
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.Resampling.BICUBIC)
    crop = np.asarray(crop)
    return crop[:, ::-1].copy() if rng.random() < 0.5 else crop


def demo_crops(name: str, count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """`count` crops of one class as uint8 [count, size, size, 3]; the stream depends on (seed, class)."""
    rng = np.random.default_rng([seed, DEMO_CLASSES.index(name)])
    photo = demo_photo(name)
    return np.stack([random_crop(photo, rng, size) for _ in range(count)])


def build_demo_dataset(out: str | Path, images_per_class: int = 256, size: int = 64, seed: int = 0) -> Path:
    """Write `images_per_class` crops per class as PNGs under out/<index>_<class>/ and return `out`."""
    from PIL import Image
    out = Path(out)
    for index, name in enumerate(DEMO_CLASSES):
        folder = out / f"{index}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, crop in enumerate(demo_crops(name, images_per_class, size, seed)):
            Image.fromarray(crop).save(folder / f"{i:05d}.png")
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m maskbit.demo_data OUT [--images-per-class N] [--seed S]`: write the demo image folder."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path, help="output image folder (one subfolder per class)")
    parser.add_argument("--images-per-class", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_demo_dataset(args.out, args.images_per_class, args.size, args.seed)
    print(f"wrote {args.images_per_class} crops x {len(DEMO_CLASSES)} classes to {args.out}")


if __name__ == "__main__":
    main()
