"""Many images, sharded and resumable, in the ADM evaluator's format. No Ray here (see `distributed.py`).

Image i's label and noise depend only on (seed, i): the label is `labels[i]` of the run's plan and the noise
stream is seeded by (seed, i) (`Pipeline.generate(first_index=...)`), so the output does not depend on the
sharding, the number of workers, the batch size or restarts. The run is cut into chunks of `chunk_size` images.
The output folder holds:

    run.json                    the run: bundle identity, seed, labels, sampling settings, chunk size, shapes
    chunks/chunk_000012.npz     chunk 12: indices, labels, tokens, images, the run id and a sha256 checksum
    chunks/chunk_000012.lock    flock held by the process producing chunk 12 (two processes never both write it)
    samples.npz                 when every chunk exists: arr_0 uint8 [N,H,W,3] in image order, arr_1 labels
    png/000012_coffee.png       one file per image, on request

Every file is written to a unique temporary name and renamed into place. The npz files are written with fixed
zip timestamps, so equal runs give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .chunks import CHUNK_DIR, atomic_write, chunk_path, chunk_problem, claims, flock, mkstemp, read_chunk, zip_info
from .chunks import ChunkError, Claim, try_claim, write_chunk  # noqa: F401  (the chunk API, importable from here too)
from .errors import InputError

RUN_FILE = "run.json"
SAMPLES = "samples.npz"
PNG_DIR = "png"
DEFAULT_CHUNK_SIZE = 64
FORMAT = "maskbit-samples"
FORMAT_VERSION = 1
GENERATION_COMPONENTS = ("step", "combine", "decoder")    # what the images depend on


class RunMismatchError(InputError):
    """The output folder holds another run (different bundle, seed, labels or settings)."""


# -- the run ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """Everything that decides the images of a run. `identity()` is what two runs must share to share a folder."""

    bundle: dict            # {"name", "components": {name: sha256}} of the components generation uses
    seed: int
    plan: dict              # {"per_class": K, "classes": [...]} or {"labels": [...]}
    sampling: dict          # resolved settings, num_steps included
    chunk_size: int
    image_shape: tuple      # (H, W, 3)
    token_shape: tuple      # (h, w)
    bundle_path: str = ""   # where the bundle was read (informational, not identity)
    class_names: tuple = ()  # informational: file names of --png
    num_images: int = field(init=False)

    def __post_init__(self):
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
        return {"bundle": self.bundle, "seed": self.seed, "plan": self.plan, "num_images": self.num_images,
                "sampling": self.sampling, "chunk_size": self.chunk_size, "image_shape": list(self.image_shape),
                "token_shape": list(self.token_shape)}

    @cached_property
    def run_id(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **self.identity(),
                "bundle_path": self.bundle_path, "class_names": list(self.class_names), "run_id": self.run_id}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> RunSpec:
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{where} is not a {FORMAT} v{FORMAT_VERSION} run manifest")
        try:
            return cls(bundle=data["bundle"], seed=int(data["seed"]), plan=data["plan"], sampling=data["sampling"],
                       chunk_size=int(data["chunk_size"]), image_shape=tuple(data["image_shape"]),
                       token_shape=tuple(data["token_shape"]), bundle_path=str(data.get("bundle_path", "")),
                       class_names=tuple(data.get("class_names") or ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where} is damaged: {type(exc).__name__} {exc}") from None


def plan_labels(plan: Mapping) -> np.ndarray:
    """Label of every image: `--per-class K` cycles through the classes (image i gets classes[i % C], so every
    prefix is balanced), `--labels` gives them one by one."""
    if "labels" in plan:
        return np.asarray(plan["labels"], dtype=np.int64)
    classes = np.asarray(plan["classes"], dtype=np.int64)
    return np.tile(classes, int(plan["per_class"]))


def bundle_facts(manifest) -> dict:
    """Identity, shapes, class names and sampling defaults of a bundle's manifest (dict- or dataclass-style)."""
    def get(obj, key):
        return obj[key] if isinstance(obj, Mapping) else getattr(obj, key)
    data = getattr(manifest, "data", None) or manifest
    missing = [c for c in GENERATION_COMPONENTS if c not in manifest.components]
    if missing:
        raise InputError(f"bundle {manifest.root} cannot generate images: it lacks {', '.join(missing)}")
    sampling = get(data, "sampling")
    dims = manifest.dims
    return {"identity": {"name": get(data, "name"),
                         "components": {c: get(manifest.components[c], "file_sha256") for c in GENERATION_COMPONENTS}},
            "num_classes": get(data, "num_classes"), "class_names": tuple(get(data, "class_names") or ()),
            "sampling": dict(sampling.to_dict() if hasattr(sampling, "to_dict") else sampling),
            "image_shape": (dims.image_size, dims.image_size, 3), "token_shape": (dims.latent_size, dims.latent_size)}


def make_spec(manifest, plan: dict, seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE, **sampling) -> RunSpec:
    """The run of `plan` on this bundle; unset (None) sampling settings take the bundle's defaults."""
    facts = bundle_facts(manifest)
    num_classes = facts["num_classes"]
    labels = plan_labels(plan)
    if len(labels) == 0:
        raise InputError("no images asked for")
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"labels must be in 0..{num_classes - 1}")
    unknown = set(sampling) - set(facts["sampling"])
    if unknown:
        raise InputError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
    settings = {**facts["sampling"], **{k: v for k, v in sampling.items() if v is not None}}
    return RunSpec(bundle=facts["identity"], seed=int(seed), plan=plan, sampling=settings, chunk_size=int(chunk_size),
                   image_shape=facts["image_shape"], token_shape=facts["token_shape"], bundle_path=str(manifest.root),
                   class_names=facts["class_names"])


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
    for key in ("seed", "chunk_size", "image_shape", "token_shape", "plan", "bundle"):
        if a[key] != b[key]:
            return f"{key} differs: {a[key]} there, {b[key]} here"
    return None


def open_run(out: str | Path, spec: RunSpec) -> RunSpec:
    """Record `spec` in `out`, or check that `out` holds the same run; another run is refused, naming the
    difference."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with flock(out / ".run.lock"):
        if (out / RUN_FILE).exists():
            there = load_run(out)
            diff = difference(there, spec)
            if diff:
                raise RunMismatchError(f"{out} holds another run's chunks ({diff}); use another --out, "
                                       f"or remove {out} to start over")
            return there
        if (out / CHUNK_DIR).is_dir() and any((out / CHUNK_DIR).glob("chunk_*.npz")):
            raise RunMismatchError(f"{out} holds chunk files but no {RUN_FILE}; use another --out")
        atomic_write(out / RUN_FILE, json.dumps(spec.to_json(), indent=1, sort_keys=True).encode())
        return spec


def load_run(out: str | Path) -> RunSpec:
    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise InputError(f"{out} holds no run ({RUN_FILE} is missing): give --per-class K or --labels to start one")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is damaged: {exc}") from None
    return RunSpec.from_json(data, str(path))


def shard_chunks(spec: RunSpec, shard: tuple[int, int] | None = None) -> list[int]:
    """Shard (i, n) of a run, 0 <= i < n, takes chunks i, i+n, i+2n, ..."""
    index, count = shard or (0, 1)
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {index}/{count}: the shard index must be in 0..n-1 and n >= 1")
    return list(range(index, spec.num_chunks, count))


# -- generating, running and merging ---------------------------------------------------------------------------
def generate_chunk(pipe, spec: RunSpec, chunk: int, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens int64 [n,h,w] and images uint8 [n,H,W,3] of one chunk, with the run's settings (not the bundle's)."""
    span = spec.chunk_range(chunk)
    out = pipe.generate([int(x) for x in spec.labels[span.start:span.stop]], seed=spec.seed, first_index=span.start,
                        batch_size=batch_size, **spec.sampling)
    return out.tokens, out.images



@dataclass
class Stats:
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


def run(out: str | Path, spec: RunSpec, bundle: str | Path, *, shard: tuple[int, int] | None = None,
        batch_size: int | None = None, backend: str = "ort", ray_address: str | None = None,
        workers: int | None = None, gpus_per_worker: float = 0, png: bool = False,
        on_chunk: Callable[[int], None] | None = None, on_plan: Callable[[int], None] | None = None,
        on_workers: Callable[[list[int]], None] | None = None) -> Stats:
    """Make this shard's missing or broken chunks (locally or on Ray), then merge if the whole run exists.
    `on_plan(images to make)` is called once, `on_chunk(images)` after every chunk written."""
    if ray_address is None and workers not in (None, 1):
        raise InputError("--workers needs --ray; without Ray run one process per --shard i/n instead")
    if ray_address is not None:                 # fail fast: Ray missing or the address unreachable
        from .distributed import check_address
        check_address(ray_address)
    spec = open_run(out, spec)
    chunks = shard_chunks(spec, shard)
    stats = Stats(chunks=len(chunks))
    for chunk in chunks:
        problem = chunk_problem(out, spec, chunk)
        if problem is None:
            stats.kept += 1
        elif problem != "missing":
            stats.redone[chunk] = problem
    todo = [c for c in chunks if c in stats.redone or not chunk_path(out, c).is_file()]
    if on_plan:
        on_plan(sum(len(spec.chunk_range(c)) for c in todo))
    if todo and ray_address is not None:
        from .distributed import run_ray
        run_ray(out, spec, todo, bundle, stats, backend=backend, batch_size=batch_size, address=ray_address,
                workers=workers, gpus_per_worker=gpus_per_worker, on_chunk=on_chunk, on_workers=on_workers)
    elif todo:
        _run_local(out, spec, todo, bundle, stats, backend, batch_size, on_chunk)
    stats.missing = sum(not chunk_path(out, c).is_file() for c in range(spec.num_chunks))
    if stats.missing == 0:
        stats.samples = str(merge(out, spec, png=png))
    return stats


def load_pipeline(bundle: str | Path, spec: RunSpec, backend: str = "ort", **options):
    """The Pipeline of `bundle`, refused unless it is the bundle the run was started with."""
    from .manifest import Manifest
    from .pipeline import Pipeline
    found = bundle_facts(Manifest.load(bundle))["identity"]
    for name, sha in spec.bundle["components"].items():
        if found["components"].get(name) != sha:
            raise RunMismatchError(f"bundle {bundle} is not this run's bundle: {name} sha256 "
                                   f"{str(found['components'].get(name))[:12]} here, {sha[:12]} in the run")
    return Pipeline.load(bundle, backend=backend, **options)


def _run_local(out, spec, todo, bundle, stats, backend, batch_size, on_chunk) -> None:
    with load_pipeline(bundle, spec, backend) as pipe:
        start = time.perf_counter()
        for chunk, claim in claims(out, spec, todo):
            try:
                t0 = time.perf_counter()
                tokens, images = generate_chunk(pipe, spec, chunk, batch_size)
                stats.compute_s += time.perf_counter() - t0
                write_chunk(out, spec, chunk, tokens, images)
            finally:
                claim.release()
            stats.generated.append(chunk)
            if on_chunk:
                on_chunk(len(tokens))
        stats.wall_s = time.perf_counter() - start


def merge(out: str | Path, spec: RunSpec, png: bool = False) -> Path:
    """samples.npz from every chunk (each verified): arr_0 uint8 [N,H,W,3] in image order, arr_1 int64 labels.
    Streamed chunk by chunk, so memory holds one chunk, not the whole array."""
    out = Path(out)
    target = out / SAMPLES
    with flock(out / ".run.lock"):
        fd, tmp = mkstemp(target)
        try:
            with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open(zip_info("arr_0"), "w", force_zip64=True) as f:
                    header = {"descr": "|u1", "fortran_order": False, "shape": (spec.num_images, *spec.image_shape)}
                    np.lib.format.write_array_header_1_0(f, header)
                    for chunk in range(spec.num_chunks):
                        arrays = read_chunk(out, spec, chunk)
                        f.write(arrays["images"].tobytes())
                        if png:
                            _write_pngs(out / PNG_DIR, spec, arrays)
                with zf.open(zip_info("arr_1"), "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, spec.labels, allow_pickle=False)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def _write_pngs(folder: Path, spec: RunSpec, arrays: dict) -> None:
    from .images import safe_filename, save_png
    for index, label, image in zip(arrays["indices"], arrays["labels"], arrays["images"]):
        name = spec.class_names[label] if label < len(spec.class_names) else str(label)
        path = folder / f"{index:06d}_{safe_filename(name)}.png"
        if not path.exists():
            save_png(image, path)
