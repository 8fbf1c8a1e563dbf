"""Generation, encoding and decoding from a bundle, on any backend, without torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .backends import Backend, open_backend
from .loop import GenerationOutput, check_labels, run_loop
from .manifest import BundleError, Manifest
from .noise import StepNoise
from .schedules import plan_steps

SAMPLING_FIELDS = ("num_steps", "guidance_scale", "guidance_annealing", "scale_pow", "softmax_temperature",
                   "randomize_temperature", "mask_schedule", "use_sampling_annealing")


class Pipeline:
    """`Pipeline.load(bundle).generate(labels=[1, 7], seed=0)` -> GenerationOutput (.images uint8, .tokens int64)."""

    def __init__(self, manifest: Manifest, backend: Backend):
        self.manifest = manifest
        self.backend = backend

    @classmethod
    def load(cls, path: str | Path, backend: str = "ort", check_hashes: bool = True, **options) -> Pipeline:
        manifest = Manifest.load(path, check_hashes=check_hashes)
        return cls(manifest, open_backend(backend, manifest, **options))

    @property
    def num_classes(self) -> int | None:
        return self.manifest.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.data.get("class_names")

    def sampling_defaults(self) -> dict:
        return dict(self.manifest.sampling or {})

    def generate(self, labels: Sequence[int], num_steps: int | None = None, guidance_scale: float | None = None,
                 seed: int = 0, batch_size: int | None = None, on_step: Callable[[int], None] | None = None,
                 first_index: int = 0, **sampling) -> GenerationOutput:
        """Generate one image per label; unset sampling settings come from the bundle's manifest.

        Image j's noise stream is seeded by (seed, first_index + j), so a request split into parts with the
        matching `first_index` gives the same images as one request."""
        if not self.manifest.has_generator:
            raise BundleError(f"bundle {self.manifest.root} has no generator (it was built from a tokenizer alone)")
        unknown = set(sampling) - set(SAMPLING_FIELDS)
        if unknown:
            raise TypeError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
        labels = check_labels(labels, self.num_classes)
        settings = {**self.sampling_defaults(), **{k: v for k, v in sampling.items() if v is not None}}
        if num_steps is not None:
            settings["num_steps"] = num_steps
        if guidance_scale is not None:
            settings["guidance_scale"] = guidance_scale
        dims = self.manifest.dims
        steps = settings.pop("num_steps")
        plan = plan_steps(steps, dims.num_tokens * dims.num_groups, **settings)
        chunk = self._batch_size(batch_size, "step")
        images, tokens = [], []
        for start in range(0, len(labels), chunk):
            part = labels[start:start + chunk]
            noise = StepNoise(seed, len(part), dims.num_tokens, dims.num_groups, first_index=first_index + start)
            sampled = run_loop(self.backend.stepper(len(part)), part, plan, noise, on_step)
            part_images, part_tokens = self.backend.finish(sampled, len(part))
            images.append(part_images)
            tokens.append(part_tokens)
        return GenerationOutput(images=np.concatenate(images), tokens=np.concatenate(tokens))

    def encode(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """uint8 [B,H,W,3] (or float [B,3,H,W] in [0,1]) -> int64 token indices [B,h,w]."""
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
        size = self.manifest.dims.image_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"images must be [B,{size},{size},3] uint8 or [B,3,{size},{size}] float, "
                             f"got {list(images.shape)}")
        return self._chunked(self.backend.encode, images.astype(np.float32), batch_size, "encoder")

    def decode(self, indices: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """int64 token indices [B,h,w] -> uint8 images [B,H,W,3]."""
        indices = np.asarray(indices)
        side = self.manifest.dims.latent_size
        if indices.ndim != 3 or indices.shape[1:] != (side, side):
            raise ValueError(f"indices must be [B,{side},{side}], got {list(indices.shape)}")
        limit = 2 ** self.manifest.num_bits if self.manifest.data["tokenizer_lookup_free"] else \
            self.manifest.data["codebook_size"]
        if indices.min() < 0 or indices.max() >= limit:
            raise ValueError(f"token indices must be in [0, {limit}), got {indices.min()}..{indices.max()}")
        return self._chunked(self.backend.decode, indices.astype(np.int64), batch_size, "decoder")

    def reconstruct(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        return self.decode(self.encode(images, batch_size), batch_size)

    def bitflip(self, image: np.ndarray, bits: Sequence[int] | None = None) -> np.ndarray:
        """The paper's bit-flip experiment for one uint8 image [H,W,3]: [original, reconstruction, then the
        reconstruction with bit i of every token flipped, for each i in `bits` (default: all)] as uint8 [2+n,H,W,3]."""
        if not self.manifest.data["tokenizer_lookup_free"]:
            raise ValueError(f"bundle {self.manifest.root} has a VQ (lookup) tokenizer; bit flips need bit tokens")
        num_bits = self.manifest.num_bits
        bits = list(range(num_bits)) if bits is None else list(bits)
        bad = [b for b in bits if not 0 <= b < num_bits]
        if bad:
            raise ValueError(f"bit {bad[0]} does not exist: tokens have bits 0..{num_bits - 1}")
        indices = self.encode(image[None])                                        # (1, h, w)
        variants = np.concatenate([indices] + [indices ^ (1 << b) for b in bits])  # (1 + n, h, w)
        return np.concatenate([image[None], self.decode(variants)])

    def info(self) -> dict:
        data = self.manifest.data
        return {"bundle": str(self.manifest.root), "format_version": data["format_version"],
                "components": {k: {f: v[f] for f in ("file", "precision", "batch_profile") if f in v}
                               for k, v in self.manifest.components.items()},
                "num_classes": self.num_classes, "sampling": self.manifest.sampling,
                "provenance": data.get("provenance"), "runtime": self.backend.describe()}

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _batch_size(self, requested: int | None, component: str) -> int:
        limit = self.manifest.max_batch(component)
        if requested is not None and requested < 1:
            raise ValueError(f"batch size must be >= 1, got {requested}")
        return min(requested or limit, limit)

    def _chunked(self, fn, array: np.ndarray, batch_size: int | None, component: str) -> np.ndarray:
        chunk = self._batch_size(batch_size, component)
        return np.concatenate([fn(array[i:i + chunk]) for i in range(0, len(array), chunk)])
