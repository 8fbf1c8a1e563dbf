"""The bundle manifest: the only contract between export and runtime, as one typed schema.

manifest.json is written from a `Manifest` and read back into one (`Manifest.load`); nothing else spells its
keys. Reading validates every field (type, range, cross-checks between dims, bits and tensors) before any
file is opened, so a hand-edited or hostile manifest fails with one line naming the field. Component files
are plain names inside the bundle directory (no separators, no links out of it), and each file's sha256 is
checked the first time the runtime opens it, so loading hashes only the files it will use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, MaskbitError
from .files import atomic_write_json
from .sampling import SamplingError, SamplingSettings
from .specs import BATCH, STEP, ComponentSpec, Dims, components_for

FORMAT = "maskbit-bundle"
FORMAT_VERSION = 3
# version 1 lacks `complete` and the unguided step; versions 1-2 take the step settings as scalars (one value per
# batch, not per row); the runtime copes with all three
READABLE_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
MAX_BITS = 24                   # released models use 10-18 bits
MAX_BATCH = 4096
MAX_IMAGE_SIZE = 4096
MAX_CLASSES = 100_000
MAX_CLASS_NAME = 200
FILE_KINDS = ("file", "data_file", "engine", "package")
PACKAGE_RECORD = ("package_precision", "package_device", "torch_version")   # required with an AOTInductor package
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PLAN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
MAX_PLANS = 64


class BundleError(MaskbitError, ValueError):
    """A bundle that is missing, incomplete, tampered with or of an unknown format."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int | str, ...]        # ints and the dynamic "batch" axis


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class ComponentEntry:
    """One exported component: its ONNX file (and optional external weights / engine) and its contract."""

    file: str
    file_sha256: str
    precision: str
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    batch_profile: BatchProfile
    backend: str = "onnx"
    data_file: str | None = None              # external weights, possibly shared between components
    data_file_sha256: str | None = None
    engine: str | None = None                 # TensorRT plan, when built
    engine_sha256: str | None = None
    engine_precision: str | None = None
    tensorrt_version: str | None = None
    gpu: Mapping[str, str] | None = None      # {"name", "compute_capability"} the engine was built for
    package: str | None = None                # AOTInductor package (.pt2), when built
    package_sha256: str | None = None
    package_precision: str | None = None
    package_device: str | None = None         # "cpu" or "cuda": the device the package was compiled for
    torch_version: str | None = None          # the PyTorch that compiled it (packages load only in the same one)


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest; `root` is where it was read from (not stored)."""

    name: str
    created: str
    config: Mapping[str, Any]                 # the model config (typed by `maskbit.ModelConfig` on the torch side)
    dims: Dims
    num_bits: int
    codebook_size: int
    tokenizer_lookup_free: bool
    components: Mapping[str, ComponentEntry]
    opset: int
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    sampling: SamplingSettings | None = None
    plans: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # named overrides of `sampling`
    provenance: Mapping[str, Any] = field(default_factory=dict)
    verification: Mapping[str, Any] = field(default_factory=lambda: {"performed": False})
    complete: bool = True                     # False while a build is still writing and verifying it
    format_version: int = FORMAT_VERSION
    root: Path = field(default=Path("."), compare=False)

    # -- derived ---------------------------------------------------------------------------------------------
    @property
    def has_generator(self) -> bool:
        return STEP.name in self.components

    def component(self, name: str) -> ComponentEntry:
        if name not in self.components:
            raise BundleError(f"bundle {self.root} has no {name} component "
                              f"(it has: {', '.join(sorted(self.components))})")
        return self.components[name]

    def spec(self, component: str) -> ComponentSpec:
        """The tensors of a component as this bundle's format declares them."""
        self.component(component)
        return components_for(self.format_version)[component]

    def plan(self, name: str | None = None) -> SamplingSettings:
        """The sampling settings of a named plan (its overrides applied to the defaults); None: the defaults."""
        if self.sampling is None:
            raise BundleError(f"bundle {self.root} has no generator (it was built from a tokenizer alone)")
        if name is None:
            return self.sampling
        if name not in self.plans:
            raise InputError(f"bundle {self.root} has no plan {name!r:.80}; its plans: "
                             f"{', '.join(sorted(self.plans)) or 'none'}")
        return self.sampling.with_overrides(**self.plans[name])

    def with_plan(self, name: str, overrides: Mapping[str, Any]) -> Manifest:
        """A copy that records (or replaces) the named plan, checked as `load` checks it; `write` stores it."""
        plans = check_plans({**self.plans, name: dict(overrides)}, self.sampling, str(self.root / MANIFEST))
        return self.replace(plans=plans)

    def max_batch(self, component: str) -> int:
        return self.component(component).batch_profile.max

    def file(self, component: str, kind: str = "file") -> Path:
        """The verified path of a component's file: inside the bundle, present, and matching its sha256."""
        entry = self.component(component)
        name = getattr(entry, kind)
        if name is None:
            raise BundleError(f"bundle {self.root}: component {component} has no {kind.replace('_', ' ')}")
        path = confined(self.root, name)
        _verify_hash(path, getattr(entry, f"{kind}_sha256"))
        return path

    # -- reading and writing ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path, allow_incomplete: bool = False) -> Manifest:
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"bundle {root} does not exist or is not a directory")
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(f"{root} is not a complete bundle: {MANIFEST} is missing (was the build interrupted?)")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a bundle manifest")
        try:
            data = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as exc:       # ValueError: bad JSON, bad UTF-8, a 5000-digit number
            raise BundleError(f"{path} is not valid JSON: {exc}") from None
        manifest = parse(data, root)
        if not manifest.complete and not allow_incomplete:
            raise BundleError(f"bundle {root} is incomplete: its build did not finish (rebuild it)")
        for entry in manifest.components.values():          # every file present and inside; hashed when used
            for kind in FILE_KINDS:
                if getattr(entry, kind) is not None:
                    confined(root, getattr(entry, kind))
        return manifest

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["root"]
        data["sampling"] = self.sampling.to_dict() if self.sampling else None
        data["class_names"] = list(self.class_names) if self.class_names else None
        if not self.plans:
            del data["plans"]
        for entry in data["components"].values():
            for key in [k for k, v in entry.items() if v is None]:
                del entry[key]
            for tensor in entry["inputs"] + entry["outputs"]:
                tensor["shape"] = list(tensor["shape"])
        return {"format": FORMAT, **data}

    def write(self, root: str | Path | None = None) -> Path:
        """Write manifest.json (strict JSON) through a unique temporary file, so a reader never sees half of it."""
        return atomic_write_json(Path(root or self.root) / MANIFEST, self.to_json(), indent=2)

    def replace(self, **changes) -> Manifest:
        return dataclasses.replace(self, **changes)


def confined(root: Path, name: str) -> Path:
    """`root / name` for a plain file name whose real path (links resolved) stays inside `root`."""
    if not isinstance(name, str) or not _FILE_NAME.match(name) or name in (".", ".."):
        raise BundleError(f"bundle {root}: file name {name!r} is not a plain file name inside the bundle")
    path = root / name
    real_root, real = root.resolve(), path.resolve()
    if real.parent != real_root:
        raise BundleError(f"bundle {root}: {name} points outside the bundle (to {real})")
    if not real.is_file():
        raise BundleError(f"bundle {root} is incomplete: {name} is missing")
    return path


_HASHED: dict[tuple[str, int, int, int], str] = {}


def _verify_hash(path: Path, expected: str | None) -> None:
    """Compare a file's sha256 with the manifest's; hashed once per (file, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    if _HASHED[key] != expected:
        raise BundleError(f"{path} does not match its sha256 in {MANIFEST}: the file was modified or truncated; "
                          f"rebuild the bundle")


# ----------------------------------------------------------------------------------------------------------
# Parsing: every field typed and range-checked, with the path of the offending key in the message

class _Reader:
    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise BundleError(f"{where} must be an object, got {type(data).__name__}")
        self.data, self.where = data, where

    def get(self, key: str, kind, default: Any = ..., low: float | None = None, high: float | None = None):
        if key not in self.data or (self.data[key] is None and default is not ...):
            if default is ...:
                raise BundleError(f"{self.where}: {key} is missing")
            return default
        value = self.data[key]
        ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
        if not ok:
            expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise BundleError(f"{self.where}: {key} must be {expected}, got {value!r:.80}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise BundleError(f"{self.where}: {key} = {value} is outside [{low}, {high}]")
        return value

    def sub(self, key: str) -> _Reader:
        return _Reader(self.get(key, dict), f"{self.where}.{key}")


def parse(data: Any, root: Path) -> Manifest:
    where = str(root / MANIFEST)
    top = _Reader(data, where)
    if data.get("format") != FORMAT:
        raise BundleError(f"{where} is not a maskbit bundle manifest")
    version = data.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise BundleError(f"{where} has format version {version!r}; this runtime reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))} "
                          f"(rebuild the bundle with a matching maskbit-export)")
    dims_reader = top.sub("dims")
    dims = Dims(**{f.name: dims_reader.get(f.name, int, low=1, high=MAX_IMAGE_SIZE ** 2)
                   for f in dataclasses.fields(Dims)})
    num_bits = top.get("num_bits", int, low=1, high=MAX_BITS)
    lookup_free = top.get("tokenizer_lookup_free", bool)
    codebook = top.get("codebook_size", int, low=2, high=1 << MAX_BITS)
    num_classes = top.get("num_classes", int, None, low=1, high=MAX_CLASSES)
    specs = components_for(version)
    components = {name: _component(top.sub("components").sub(name), name, dims, specs)
                  for name in top.get("components", dict)}
    try:
        sampling = SamplingSettings.from_dict(data["sampling"], f"{where}: sampling") if data.get("sampling") else None
    except SamplingError as exc:
        raise BundleError(str(exc)) from None
    manifest = Manifest(
        name=top.get("name", str), created=top.get("created", str), config=top.get("config", dict),
        dims=dims, num_bits=num_bits, codebook_size=codebook, tokenizer_lookup_free=lookup_free,
        components=components, opset=top.get("opset", int, low=7, high=100), num_classes=num_classes,
        class_names=check_class_names(top.get("class_names", list, None), num_classes, where), sampling=sampling,
        plans=check_plans(top.get("plans", dict, {}), sampling, where),
        provenance=top.get("provenance", dict, {}), verification=top.get("verification", dict, {}),
        complete=top.get("complete", bool, True), format_version=version, root=root)
    _cross_check(manifest, where)
    return manifest


def _component(reader: _Reader, name: str, dims: Dims, specs: Mapping[str, ComponentSpec]) -> ComponentEntry:
    spec = specs.get(name)
    if spec is None:
        raise BundleError(f"{reader.where}: unknown component {name!r}")
    tensors = {}
    for side in ("inputs", "outputs"):
        declared = reader.get(side, list)
        expected = spec.inputs if side == "inputs" else spec.outputs
        entries = tuple(_tensor(_Reader(t, f"{reader.where}.{side}")) for t in declared)
        if [(t.name, t.dtype) for t in entries] != [(t.name, t.dtype) for t in expected]:
            raise BundleError(f"{name}: {side} {[(t.name, t.dtype) for t in entries]} differ from this runtime's "
                              f"{[(t.name, t.dtype) for t in expected]}")
        for entry, want in zip(entries, expected):
            if list(entry.shape) != [s if s == BATCH else d for s, d in zip(want.shape, dims.resolve(want.shape, 1))]:
                raise BundleError(f"{name}: tensor {entry.name} has shape {list(entry.shape)}, but the bundle's dims "
                                  f"give {want.to_dict(dims)['shape']}")
        tensors[side] = entries
    profile = reader.sub("batch_profile")
    low = profile.get("min", int, low=1, high=MAX_BATCH)
    high = profile.get("max", int, low=low, high=MAX_BATCH)
    opt = profile.get("opt", int, low=low, high=high)
    files = {}
    for kind in FILE_KINDS:
        value = reader.get(kind, str, None)
        digest = reader.get(f"{kind}_sha256", str, None)
        if (value is None) != (digest is None) or (digest is not None and not _SHA256.match(digest)):
            raise BundleError(f"{reader.where}: {kind} needs a file name and a sha256 (64 hex digits)")
        if value is not None and (not _FILE_NAME.match(value) or value in (".", "..")):
            raise BundleError(f"{reader.where}: {kind} {value!r} is not a plain file name inside the bundle")
        files[kind], files[f"{kind}_sha256"] = value, digest
    if files["file"] is None:
        raise BundleError(f"{reader.where}: file is missing")
    if files["package"] is not None and None in (reader.get(k, str, None) for k in PACKAGE_RECORD):
        raise BundleError(f"{reader.where}: a package needs {', '.join(PACKAGE_RECORD)}")
    gpu = reader.get("gpu", dict, None)
    if gpu is not None and not all(isinstance(gpu.get(k), str) for k in ("name", "compute_capability")):
        raise BundleError(f"{reader.where}: gpu must record name and compute_capability as strings")
    return ComponentEntry(
        precision=reader.get("precision", str), backend=reader.get("backend", str, "onnx"),
        inputs=tensors["inputs"], outputs=tensors["outputs"], batch_profile=BatchProfile(low, opt, high),
        engine_precision=reader.get("engine_precision", str, None),
        tensorrt_version=reader.get("tensorrt_version", str, None), gpu=gpu,
        package_precision=reader.get("package_precision", str, None),
        package_device=reader.get("package_device", str, None), torch_version=reader.get("torch_version", str, None),
        **files)


def _tensor(reader: _Reader) -> TensorEntry:
    shape = reader.get("shape", list)
    if not all((isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_IMAGE_SIZE ** 2) or s == BATCH
               for s in shape):
        raise BundleError(f"{reader.where}: shape {shape!r:.80} must hold positive ints and {BATCH!r}")
    return TensorEntry(reader.get("name", str), reader.get("dtype", str), tuple(shape))


def check_class_names(names: list | None, num_classes: int | None, where: str) -> tuple[str, ...] | None:
    if names is None:
        return None
    if num_classes is None or len(names) != num_classes:
        raise BundleError(f"{where}: {len(names)} class names for {num_classes} classes")
    for name in names:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_CLASS_NAME or not name.isprintable() \
                or "/" in name or "\\" in name or not name.strip("."):
            raise BundleError(f"{where}: class name {name!r:.60} must be printable text of 1-{MAX_CLASS_NAME} "
                              f"characters, without / or \\ and not only dots")
    return tuple(names)


def check_plans(plans: dict, sampling: SamplingSettings | None, where: str) -> dict[str, dict[str, Any]]:
    """Named plans: each an object of sampling settings that, applied to the defaults, make valid settings."""
    if len(plans) > MAX_PLANS:
        raise BundleError(f"{where}: {len(plans)} plans; at most {MAX_PLANS}")
    if plans and sampling is None:
        raise BundleError(f"{where}: plans need sampling settings (a generator bundle)")
    for name, overrides in plans.items():
        if not isinstance(name, str) or not _PLAN_NAME.match(name):
            raise BundleError(f"{where}: plan name {name!r:.60} must be 1-64 letters, digits, '_', '.' or '-'")
        if not isinstance(overrides, dict):
            raise BundleError(f"{where}: plan {name} must be an object of sampling settings, got {overrides!r:.60}")
        unknown = sorted(set(overrides) - set(SamplingSettings.fields()))
        try:
            if unknown:
                raise SamplingError(f"unknown sampling setting(s) {', '.join(map(str, unknown))}")
            SamplingSettings(**{**sampling.to_dict(), **overrides})
        except SamplingError as exc:
            raise BundleError(f"{where}: plan {name}: {exc}"[:300]) from None
    return {name: dict(overrides) for name, overrides in plans.items()}


def _cross_check(m: Manifest, where: str) -> None:
    d = m.dims
    if m.tokenizer_lookup_free and m.codebook_size != 2 ** m.num_bits:
        raise BundleError(f"{where}: a {m.num_bits}-bit lookup-free tokenizer has 2**{m.num_bits} codes, "
                          f"not codebook_size {m.codebook_size}")
    if d.latent_size ** 2 != d.num_tokens or d.image_size % d.latent_size:
        raise BundleError(f"{where}: dims {dataclasses.asdict(d)} are inconsistent "
                          f"(num_tokens = latent_size**2, image_size a multiple of latent_size)")
    if m.has_generator:
        if not m.tokenizer_lookup_free or m.num_bits % d.num_groups or \
                d.group_classes != 2 ** (m.num_bits // d.num_groups):
            raise BundleError(f"{where}: {d.num_groups} groups of {d.group_classes} classes do not split "
                              f"{m.num_bits}-bit tokens")
        if m.num_classes is None or m.sampling is None:
            raise BundleError(f"{where}: a generator bundle needs num_classes and sampling settings")
