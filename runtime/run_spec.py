"""The description of a sample run (`maskbit-run sample`): which bundle, labels, seed, sampling settings and chunk
size decide its images. A leaf: the chunk files (`chunks.py`), the run itself (`runs.py`) and its Ray engine
(`runs_ray.py`) import it, and it imports none of them.

Image i's label and noise depend only on (seed, i): the label is `labels[i]` of the run's plan and the noise
stream is seeded by (seed, i) (`Pipeline.generate(first_index=...)`), so the images do not depend on the
sharding, the number of workers, the batch size or restarts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .errors import InputError
from .sampling import SamplingSettings

FORMAT = "maskbit-samples"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 64
MAX_IMAGES = 10_000_000         # a run's labels are one int64 array in memory (80 MB at this size)
MAX_SEED = 2 ** 63 - 1
GENERATION_COMPONENTS = ("step", "combine", "decoder")    # what the images depend on


class RunMismatchError(InputError):
    """The output folder or bundle belongs to another run (different bundle, seed, labels or settings)."""


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides the images of a run. `identity()` is what two runs must share to share a folder."""

    bundle: dict                # {"name", "components": {name: sha256}} of the components generation uses
    seed: int
    plan: dict                  # {"per_class": K, "classes": [...]} or {"labels": [...]}
    sampling: SamplingSettings  # resolved: the bundle's defaults with the run's overrides
    chunk_size: int
    image_shape: tuple          # (H, W, 3)
    token_shape: tuple          # (h, w)
    bundle_path: str = ""       # where the bundle was read (informational, not identity)
    class_names: tuple = ()     # informational: file names of --png
    backend: str = "ort"        # the backend that makes the images (identity, except the default: see identity())
    num_images: int = field(init=False)

    def __post_init__(self):
        if not isinstance(self.sampling, SamplingSettings):
            raise TypeError(f"a run's sampling settings are SamplingSettings, got {type(self.sampling).__name__}")
        for name, high in (("seed", MAX_SEED), ("chunk_size", MAX_IMAGES)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not (name == "seed" or value >= 1) \
                    or not 0 <= value <= high:
                raise InputError(f"a run's {name} must be an integer in {0 if name == 'seed' else 1}..{high}, "
                                 f"got {value!r}")
        if not isinstance(self.backend, str) or not self.backend:
            raise InputError(f"a run's backend must be a backend name, got {self.backend!r}")
        object.__setattr__(self, "num_images", len(self.labels))

    @cached_property
    def labels(self) -> np.ndarray:
        return plan_labels(self.plan)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_images // self.chunk_size)

    def chunk_range(self, chunk: int) -> range:
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.num_images))

    def identity(self) -> dict:
        """What decides the images. The backend is part of it unless it is the default "ort", so runs made before
        the backend was recorded keep their run id (and resume)."""
        backend = {} if self.backend == "ort" else {"backend": self.backend}
        return {"bundle": self.bundle, "seed": self.seed, "plan": self.plan, "num_images": self.num_images,
                "sampling": self.sampling.identity(), "chunk_size": self.chunk_size,
                "image_shape": list(self.image_shape), "token_shape": list(self.token_shape), **backend}

    @cached_property
    def run_id(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **self.identity(), "backend": self.backend,
                "bundle_path": self.bundle_path, "class_names": list(self.class_names), "run_id": self.run_id}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> RunSpec:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT or \
                data.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{where} is not a {FORMAT} v{FORMAT_VERSION} run manifest")
        try:
            spec = cls(bundle=data["bundle"], seed=data["seed"], plan=data["plan"],
                       sampling=SamplingSettings.from_dict(data["sampling"], f"{where}: sampling"),
                       chunk_size=data["chunk_size"], image_shape=tuple(data["image_shape"]),
                       token_shape=tuple(data["token_shape"]), bundle_path=str(data.get("bundle_path", "")),
                       class_names=tuple(data.get("class_names") or ()), backend=data.get("backend", "ort"))
            spec.bundle["components"].items()
            if "run_id" in data and data["run_id"] != spec.run_id:
                raise InputError(f"{where} is damaged: its run_id does not match its contents")
            return spec
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, InputError):
                raise InputError(f"{where}: {exc}") from None
            raise InputError(f"{where} is damaged: {type(exc).__name__} {exc}") from None

    def check_bundle(self, facts: Mapping, where: str) -> None:
        """Refuse a bundle (its `bundle_facts`) whose generation components are not this run's."""
        for name, sha in self.bundle["components"].items():
            found = facts["identity"]["components"].get(name)
            if found != sha:
                raise RunMismatchError(f"bundle {where} is not this run's bundle: {name} sha256 "
                                       f"{str(found)[:12]} here, {sha[:12]} in the run")


@dataclass
class RunStats:
    """What one invocation of a run did."""

    chunks: int = 0                 # chunks of this invocation (its shard)
    kept: int = 0                   # found complete and verified
    redone: dict = field(default_factory=dict)   # chunk -> what was wrong with the file found
    generated: list = field(default_factory=list)
    retried: int = 0                # chunks resubmitted after a worker died (Ray)
    workers: int = 1
    compute_s: float = 0.0          # time spent inside generation, summed over workers
    wall_s: float = 0.0             # from the first chunk handed out to the last one written
    missing: int = 0                # chunks of the run still absent (other shards)
    samples: str | None = None      # samples.npz, once every chunk exists


def plan_labels(plan: Mapping) -> np.ndarray:
    """Label of every image: `--per-class K` cycles through the classes (image i gets classes[i % C], so every
    prefix is balanced), `--labels` gives them one by one."""
    if not isinstance(plan, Mapping):
        raise InputError(f"a run's plan must be an object, got {type(plan).__name__}")
    if "labels" in plan:
        labels = plan["labels"]
        if not isinstance(labels, list) or len(labels) > MAX_IMAGES:
            raise InputError(f"a run's labels must be a list of at most {MAX_IMAGES} class indices")
        return _integers(labels, "labels")
    classes, per_class = plan["classes"], plan["per_class"]
    if not isinstance(classes, list) or isinstance(per_class, bool) or not isinstance(per_class, int) or \
            per_class < 1:
        raise InputError(f"a run's plan needs classes (a list) and per_class (an integer >= 1), got {per_class!r}")
    if per_class * len(classes) > MAX_IMAGES:
        raise InputError(f"{per_class} per class x {len(classes)} classes = {per_class * len(classes)} images; a run "
                         f"makes at most {MAX_IMAGES} (split it into several runs)")
    return np.tile(_integers(classes, "classes"), per_class)


def _integers(values: list, what: str) -> np.ndarray:
    if not all(isinstance(v, int) and not isinstance(v, bool) and -2 ** 63 <= v < 2 ** 63 for v in values):
        raise InputError(f"a run's {what} must be integers")
    return np.asarray(values, dtype=np.int64).reshape(-1)


def bundle_facts(manifest) -> dict:
    """Identity, shapes, class names and sampling defaults of a bundle's manifest."""
    missing = [c for c in GENERATION_COMPONENTS if c not in manifest.components]
    if missing:
        raise InputError(f"bundle {manifest.root} cannot generate images: it lacks {', '.join(missing)}")
    sampling = manifest.sampling
    if sampling is None:
        raise InputError(f"bundle {manifest.root} has no sampling settings (no generator)")
    dims = manifest.dims
    return {"identity": {"name": manifest.name,
                         "components": {c: manifest.components[c].file_sha256 for c in GENERATION_COMPONENTS}},
            "num_classes": manifest.num_classes, "class_names": tuple(manifest.class_names or ()),
            "sampling": sampling,
            "image_shape": (dims.image_size, dims.image_size, 3), "token_shape": (dims.latent_size, dims.latent_size)}


def make_spec(manifest, plan: dict, seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "ort",
              **sampling) -> RunSpec:
    """The run of `plan` on this bundle and backend; unset (None) sampling settings take the bundle's defaults."""
    facts = bundle_facts(manifest)
    num_classes = facts["num_classes"]
    labels = plan_labels(plan)
    if len(labels) == 0:
        raise InputError("no images asked for")
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"labels must be in 0..{num_classes - 1}")
    settings = facts["sampling"].with_overrides(**sampling)
    return RunSpec(bundle=facts["identity"], seed=seed, plan=plan, sampling=settings, chunk_size=chunk_size,
                   image_shape=facts["image_shape"], token_shape=facts["token_shape"], bundle_path=str(manifest.root),
                   class_names=facts["class_names"], backend=backend)


def difference(there: RunSpec, here: RunSpec) -> str | None:
    """The first thing that differs between two runs, in words; None when they are the same run."""
    a, b = there.identity(), here.identity()
    for name, sha in a["bundle"]["components"].items():
        if b["bundle"]["components"].get(name) != sha:
            return (f"bundle differs: {name} sha256 {sha[:12]} there, "
                    f"{str(b['bundle']['components'].get(name))[:12]} here ({there.bundle_path or '?'} there)")
    if a["num_images"] != b["num_images"]:
        return f"number of images differs: {a['num_images']} there, {b['num_images']} here"
    if not np.array_equal(there.labels, here.labels):
        i = int(np.flatnonzero(there.labels != here.labels)[0])
        return f"labels differ: image {i} has label {there.labels[i]} there, {here.labels[i]} here"
    for key in sorted(set(a["sampling"]) | set(b["sampling"])):
        if a["sampling"].get(key) != b["sampling"].get(key):
            return f"sampling setting {key} differs: {a['sampling'].get(key)} there, {b['sampling'].get(key)} here"
    if there.backend != here.backend:
        return f"backend differs: {there.backend} there, {here.backend} here"
    for key in ("seed", "chunk_size", "image_shape", "token_shape", "plan", "bundle"):
        if a[key] != b[key]:
            return f"{key} differs: {a[key]} there, {b[key]} here"
    return None
