"""Generation, encoding and decoding from a bundle, on any backend, without torch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .backends import Executor, open_backend
from .backends.base import Transfers
from .errors import InputError
from .generation import GenerationOutput, check_labels
from .machine import cpu_info
from .manifest import BundleError, Manifest
from .noise import check_seed
from .sampling import SamplingSettings
from .scheduler import ImageJob, Scheduler
from .specs import DECODER, ENCODER, STEP


class Pipeline:
    """`Pipeline.load(bundle).generate(labels=[1, 7], seed=0)` -> GenerationOutput (.images uint8, .tokens int64)."""

    def __init__(self, manifest: Manifest, backend: Executor, plan: str | None = None):
        self.manifest = manifest
        self.backend = backend
        self.last_transfers: Transfers | None = None      # copies and host syncs of the last `generate` call
        self.plan: str | None = None
        self.use_plan(plan)

    @classmethod
    def load(cls, path: str | Path, backend: str = "ort", allow_incomplete: bool = False, plan: str | None = None,
             **options) -> Pipeline:
        """Open a bundle; each component file is hash-checked when the backend first opens it. `plan` names one
        of the bundle's sampling plans to use as the defaults (None: the bundle's own defaults)."""
        manifest = Manifest.load(path, allow_incomplete=allow_incomplete)
        if plan is not None:
            manifest.plan(plan)               # an unknown plan fails before the backend opens
        return cls(manifest, open_backend(backend, manifest, **options), plan)

    def use_plan(self, name: str | None) -> Pipeline:
        """Make the bundle's named sampling plan the defaults of `generate` (and of a server over this pipeline);
        None: the bundle's own defaults. An unknown name fails with the names the bundle has."""
        if name is not None:
            self.manifest.plan(name)
        self.plan = name
        return self

    @property
    def num_classes(self) -> int | None:
        return self.manifest.num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.manifest.class_names

    @property
    def sampling(self) -> SamplingSettings:
        """The bundle's sampling defaults, or those of the plan in use (`use_plan`)."""
        return self.manifest.plan(self.plan)

    def generate(self, labels: Sequence[int], num_steps: int | None = None, guidance_scale: float | None = None,
                 seed: int = 0, batch_size: int | None = None, on_step: Callable[[int], None] | None = None,
                 first_index: int = 0, **sampling) -> GenerationOutput:
        """Generate one image per label; unset sampling settings (None) come from the bundle's manifest.

        Image j's noise stream is seeded by (seed, first_index + j), so a request split into parts with the
        matching `first_index` gives the same images as one request. The images run through the slot scheduler
        (`maskbit_runtime.scheduler`), at most `batch_size` (default: the engine's max batch) at a time; with a
        guidance scale of 0 only the conditional half of the transformer runs (when the bundle has the unguided
        step). `on_step(i)` is called after each scheduler iteration; `last_transfers` counts the call's copies."""
        if not self.manifest.has_generator:
            raise BundleError(f"bundle {self.manifest.root} has no generator (it was built from a tokenizer alone)")
        if isinstance(first_index, bool) or not isinstance(first_index, int) or first_index < 0:
            raise InputError(f"first_index must be an integer >= 0, got {first_index!r}")
        labels = check_labels(labels, self.num_classes)
        seed = check_seed(seed)
        settings = self.sampling.with_overrides(num_steps=num_steps, guidance_scale=guidance_scale, **sampling)
        jobs = [ImageJob(int(label), seed, first_index + j, settings) for j, label in enumerate(labels)]
        before = self.backend.transfers.copy()
        with self.backend.lock:          # one generation at a time per pipeline: they share its slot lanes
            Scheduler(self.backend, self._batch_size(batch_size, STEP.name)).run(jobs, on_step)
        self.last_transfers = self.backend.transfers - before
        return GenerationOutput(images=np.stack([job.image for job in jobs]),
                                tokens=np.stack([job.tokens for job in jobs]))

    def encode(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """uint8 [B,H,W,3] (or float [B,3,H,W] in [0,1]) -> int64 token indices [B,h,w]."""
        images = np.asarray(images)
        size = self.manifest.dims.image_size
        if images.dtype == np.uint8:
            if images.ndim != 4 or images.shape[1:] != (size, size, 3):
                raise InputError(f"uint8 images must be [B,{size},{size},3], got {list(images.shape)}")
            images = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
        elif images.dtype in (np.float16, np.float32, np.float64):
            if images.ndim != 4 or images.shape[1:] != (3, size, size):
                raise InputError(f"float images must be [B,3,{size},{size}], got {list(images.shape)}")
            if not np.all(np.isfinite(images)) or images.min(initial=0) < 0 or images.max(initial=0) > 1:
                raise InputError("float images must be finite and in [0, 1]")
        else:
            raise InputError(f"images must be uint8 [B,H,W,3] or float [B,3,H,W] in [0,1], got dtype {images.dtype}")
        if len(images) == 0:
            raise InputError("no images to encode")
        return self._chunked(self.backend.encode, images.astype(np.float32), batch_size, ENCODER.name)

    def decode(self, indices: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """int64 token indices [B,h,w] -> uint8 images [B,H,W,3]."""
        indices = np.asarray(indices)
        side = self.manifest.dims.latent_size
        if indices.dtype == np.bool_ or not np.issubdtype(indices.dtype, np.integer):
            raise InputError(f"token indices must be integers, got dtype {indices.dtype}")
        if indices.ndim != 3 or indices.shape[1:] != (side, side) or len(indices) == 0:
            raise InputError(f"indices must be [B,{side},{side}] with B >= 1, got {list(indices.shape)}")
        limit = self.manifest.codebook_size
        if indices.min() < 0 or indices.max() >= limit:
            raise InputError(f"token indices must be in [0, {limit}), got {indices.min()}..{indices.max()}")
        return self._chunked(self.backend.decode, indices.astype(np.int64), batch_size, DECODER.name)

    def reconstruct(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        return self.decode(self.encode(images, batch_size), batch_size)

    def bitflip(self, image: np.ndarray, bits: Sequence[int] | None = None) -> np.ndarray:
        """The paper's bit-flip experiment for one uint8 image [H,W,3]: [original, reconstruction, then the
        reconstruction with bit i of every token flipped, for each i in `bits` (default: all)] as uint8 [2+n,H,W,3]."""
        if not self.manifest.tokenizer_lookup_free:
            raise InputError(f"bundle {self.manifest.root} has a VQ (lookup) tokenizer; bit flips need bit tokens")
        num_bits = self.manifest.num_bits
        bits = list(range(num_bits)) if bits is None else list(bits)
        bad = [b for b in bits if not 0 <= b < num_bits]
        if bad:
            raise InputError(f"bit {bad[0]} does not exist: tokens have bits 0..{num_bits - 1}")
        indices = self.encode(image[None])                                        # (1, h, w)
        variants = np.concatenate([indices] + [indices ^ (1 << b) for b in bits])  # (1 + n, h, w)
        return np.concatenate([image[None], self.decode(variants)])

    def info(self, count_transfers: bool = False) -> dict:
        """The bundle, the backend and the machine; with `count_transfers` (and a generator) also the copies and
        host syncs of a generation on this backend, as its primitives count them (see `transfer_counts`)."""
        m = self.manifest
        info = {"bundle": str(m.root), "name": m.name,
                "components": {k: {"file": v.file, "precision": v.precision, "batch_profile": vars(v.batch_profile),
                                   **({"engine": v.engine} if v.engine else {})} for k, v in m.components.items()},
                "num_classes": self.num_classes, "sampling": m.sampling.to_dict() if m.sampling else None,
                "plans": dict(m.plans), "plan": self.plan,
                "provenance": dict(m.provenance), "runtime": self.backend.describe(), "machine": cpu_info()}
        if count_transfers and m.has_generator:
            info["per_generation"] = self.transfer_counts()
        return info

    def transfer_counts(self, steps: tuple[int, int] = (2, 3)) -> dict:
        """Host<->device copies and host syncs of one generation on this backend, counted by its primitives for one
        image at two step counts: `fixed` is what a generation costs whatever its length, `per_step` what each
        step adds. How each backend counts host syncs is in `describe()["host_syncs"]`."""
        self._counted(steps[0])       # makes the buffers: a lane's first generation also uploads its masked tokens
        short, long = (self._counted(n) for n in steps)
        per_step = Transfers(*(d // (steps[1] - steps[0]) for d in dataclasses.astuple(long - short)))
        fixed = short - Transfers(*(c * steps[0] for c in dataclasses.astuple(per_step)))
        text = f"per generation: {fixed.summary()}"
        if any(dataclasses.astuple(per_step)):
            text += f"; plus per step: {per_step.summary()}"
        return {"fixed": dataclasses.asdict(fixed), "per_step": dataclasses.asdict(per_step), "summary": text,
                "counted": f"by the backend's primitives, for one image at {steps[0]} and {steps[1]} steps"}

    def _counted(self, num_steps: int) -> Transfers:
        self.generate([0], num_steps=num_steps, seed=0)
        return self.last_transfers

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _batch_size(self, requested: int | None, component: str) -> int:
        limit = self.manifest.max_batch(component)
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
            raise InputError(f"batch size must be an integer >= 1, got {requested!r}")
        return min(requested or limit, limit)

    def _chunked(self, fn, array: np.ndarray, batch_size: int | None, component: str) -> np.ndarray:
        chunk = self._batch_size(batch_size, component)
        return np.concatenate([fn(array[i:i + chunk]) for i in range(0, len(array), chunk)])
