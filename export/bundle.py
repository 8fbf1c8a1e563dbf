"""Build a bundle: export every component, verify it, write the manifest, and only then make it visible.

Everything is written into a hidden temporary directory next to the target, whose manifest says
`complete: false` until verification has passed; the directory is renamed into place at the end
(`maskbit_runtime.files.atomic_directory`), so an interrupted build never leaves a bundle that loads. One export at
a time may write a given `--out` (a lock next to it), and `force` replaces only a bundle that holds nothing but what
this tool wrote (the files its manifest names, the manifest, the TensorRT timing cache and their temporaries).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from maskbit_runtime.errors import InputError
from maskbit_runtime.files import FileLock, atomic_directory, is_temporary_of, remove_temporaries
from maskbit_runtime.manifest import (FILE_KINDS, FORMAT, MANIFEST, BatchProfile, ComponentEntry, Manifest,
                                      TensorEntry, check_class_names, sha256_file)
from maskbit_runtime.specs import COMPONENTS, DEFAULT_COMPONENTS, OPTIONAL_COMPONENTS, ComponentSpec

from maskbit.config import ModelConfig
from maskbit.generator import Generator
from maskbit.tokenizer import Tokenizer

from .cast import CAST_PRECISIONS
from .graphs import GENERATOR_COMPONENTS, dims_of, graph_module, random_inputs
from .onnx_export import DEFAULT_OPSET, export_onnx
from .quantize import quantize_int8
from .tensorrt import TIMING_CACHE
from .verify import VerificationError, check_logits_finite, verify_bundle
from .weights import share_weights

PRECISIONS = ("fp32", "int8", "fp16", "bf16")       # of the ONNX graphs; engines have their own (--engine-precision)
GENERATOR_WEIGHTS = "generator.weights"             # one external-data file shared by the generator graphs


@dataclass(frozen=True)
class ExportOptions:
    """How to export: batch profile, opset, precision of the graphs, verification, optional components."""

    max_batch: int = 8
    opt_batch: int | None = None        # the batch engines are tuned for (TensorRT profile optimum); None: max_batch
    opset: int = DEFAULT_OPSET
    precision: str = "fp32"
    verify: bool = True
    with_transformer: bool = False      # the raw-logits graph, for benchmarks and studies (shares the weights)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InputError(f"precision {self.precision!r} is not supported; expected one of {', '.join(PRECISIONS)}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or not 1 <= self.max_batch <= 4096:
            raise InputError(f"max batch must be an integer in [1, 4096], got {self.max_batch!r}")
        if self.opt_batch is not None and (isinstance(self.opt_batch, bool) or not isinstance(self.opt_batch, int)
                                           or not 1 <= self.opt_batch <= self.max_batch):
            raise InputError(f"the optimum batch must be an integer in [1, max batch {self.max_batch}], "
                             f"got {self.opt_batch!r}")

    @property
    def profile(self) -> BatchProfile:
        """The batch profile every component is exported with: 1 .. max, tuned for opt (default max)."""
        return BatchProfile(1, self.opt_batch or self.max_batch, self.max_batch)


def _versions() -> dict[str, str]:
    versions = {}
    for dist in ("maskbit", "torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def _entry(spec: ComponentSpec, path: Path, dims, precision: str, profile: BatchProfile) -> ComponentEntry:
    tensors = lambda side: tuple(TensorEntry(**{**t.to_dict(dims), "shape": tuple(t.to_dict(dims)["shape"])})
                                 for t in side)
    return ComponentEntry(file=path.name, file_sha256=sha256_file(path), precision=precision,
                          inputs=tensors(spec.inputs), outputs=tensors(spec.outputs),
                          batch_profile=profile)


def build_bundle(out: str | Path, tokenizer: Tokenizer, generator: Generator | None, *,
                 options: ExportOptions | None = None, name: str = "", class_names: list[str] | None = None,
                 provenance: dict | None = None, force: bool = False,
                 on_progress: Callable[[str], None] | None = None) -> Manifest:
    """Export `tokenizer` (+ `generator`, with its own sampling settings as the bundle's defaults) into a
    verified bundle directory `out`."""
    out, options = Path(out), options or ExportOptions()
    progress = on_progress or (lambda message: None)
    if generator is not None and (generator.config.num_bits != tokenizer.config.num_bits
                                  or not tokenizer.config.is_lookup_free):
        raise InputError(f"the generator predicts {generator.config.num_bits}-bit tokens but the tokenizer is a "
                         f"{tokenizer.config.num_bits}-bit {tokenizer.config.quantizer_type} tokenizer")
    num_classes = generator.config.num_classes if generator is not None else None
    if class_names is not None:
        class_names = list(check_class_names(list(class_names), num_classes, "class names"))
    sampling = generator.sampling_config if generator is not None else None
    config = ModelConfig(tokenizer=tokenizer.config, generator=generator.config if generator else None,
                         sampling=sampling, name=name)
    # the distribution gate of reduced precision reads the transformer's logits: exported for it, then dropped
    gate_only = generator is not None and options.verify and options.precision != "fp32" \
        and not options.with_transformer
    wanted = DEFAULT_COMPONENTS + (OPTIONAL_COMPONENTS if options.with_transformer or gate_only else ())
    names = [n for n in wanted if generator is not None or not COMPONENTS[n].needs_generator]
    tokenizer.eval()
    if generator is not None:
        generator.eval()
    _check_finite(tokenizer, generator)
    dims = dims_of(tokenizer, generator)
    if generator is not None and options.precision in CAST_PRECISIONS:
        check_logits_finite(tokenizer, generator, dims, options.precision)

    with _exclusive(out):
        _check_target(out, force)
        with atomic_directory(out, replace=force) as tmp:
            components = {}
            for component in names:
                progress(f"exporting {component}")
                spec = COMPONENTS[component]
                sample = random_inputs(spec, dims, 2, seed=0, codebook_size=tokenizer.config.codebook_size,
                                       num_classes=num_classes or 1000)
                export_onnx(graph_module(component, tokenizer, generator, options.precision), spec, sample,
                            tmp / spec.file, options.opset, options.max_batch)
                if options.precision == "int8" and component in GENERATOR_COMPONENTS:
                    progress(f"quantizing {component} to int8")
                    quantize_int8(tmp / spec.file)
            shared = [n for n in names if n in GENERATOR_COMPONENTS]
            if shared:
                progress("storing the generator's weights once")
                weights = share_weights([tmp / COMPONENTS[n].file for n in shared], GENERATOR_WEIGHTS)
            for component in names:
                spec = COMPONENTS[component]
                precision = options.precision if component in GENERATOR_COMPONENTS else "fp32"
                entry = _entry(spec, tmp / spec.file, dims, precision, options.profile)
                if component in shared:
                    entry = dataclasses.replace(entry, data_file=weights.name, data_file_sha256=sha256_file(weights))
                components[component] = entry
            manifest = Manifest(
                name=name, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                config=config.to_dict(), dims=dims, num_bits=tokenizer.config.num_bits,
                codebook_size=tokenizer.config.codebook_size, tokenizer_lookup_free=tokenizer.config.is_lookup_free,
                components=components, opset=options.opset, num_classes=num_classes,
                class_names=tuple(class_names) if class_names else None, sampling=sampling,
                provenance={**(provenance or {}), "tools": _versions()}, complete=False, root=tmp)
            manifest.write()
            if options.verify:
                report = verify_bundle(tmp, names, tokenizer, generator, dims, options.precision, options.max_batch,
                                       progress)
                manifest = manifest.replace(verification=report)
            if gate_only:
                manifest = manifest.replace(components={k: v for k, v in manifest.components.items()
                                                        if COMPONENTS[k].run_by_runtime})
                for name in OPTIONAL_COMPONENTS:
                    (tmp / COMPONENTS[name].file).unlink(missing_ok=True)
            manifest.replace(complete=True).write()
            _check_target(out, force)            # again: files may have been put there while this export ran
    return Manifest.load(out)


def _check_finite(tokenizer: Tokenizer, generator: Generator | None) -> None:
    """Weights with NaN/inf would export and even match eager (both wrong alike): refuse them first."""
    for label, module in (("tokenizer", tokenizer), ("generator", generator)):
        if module is None:
            continue
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise VerificationError(f"the {label}'s weight {key} contains NaN or infinite values")


def _is_bundle(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise InputError(f"{out} already exists; choose another --out or pass --force to replace it")
    if out.is_symlink() or not out.is_dir() or not _is_bundle(out):
        raise InputError(f"--force replaces only a bundle directory, and {out} is not one (no maskbit manifest); "
                         f"nothing was changed")
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p, _written_by_us(out)))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(f"--force replaces only what maskbit-export wrote, and {out} also holds {shown}, which its "
                         f"manifest does not name; move them out first; nothing was changed")


def _written_by_us(out: Path) -> set[str]:
    """The names a bundle's own manifest gives its files, its manifest and the TensorRT timing cache."""
    names = {MANIFEST, TIMING_CACHE}
    components = json.loads((out / MANIFEST).read_text()).get("components")
    for entry in components.values() if isinstance(components, dict) else ():
        if isinstance(entry, dict):
            names.update(entry[kind] for kind in FILE_KINDS if isinstance(entry.get(kind), str))
    return names


def _ours(path: Path, names: set[str]) -> bool:
    """A plain file this tool wrote: named by the manifest, or a temporary of one (`.<name>.<random>.tmp[.ext]`)."""
    if path.is_symlink() or not path.is_file():
        return False
    return path.name in names or any(is_temporary_of(path.name, name) for name in names)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `.<name>.lock` next to `out` while building; a second writer fails at once. The
    lock file a killed export left is reused, and its half-built folder and temporary files (`files.py` names) are
    removed once the lock is held (no other export of `out` can be running then)."""
    lock = FileLock(out.parent / f".{out.name}.lock")
    if not lock.acquire(blocking=False):
        raise InputError(f"another export is writing {out} right now; wait for it or choose another --out")
    try:
        remove_temporaries(out)
        yield
    finally:
        lock.release()
