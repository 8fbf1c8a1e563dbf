"""Build a bundle: export every component, verify it, write the manifest, and only then make it visible.

Everything is written into a hidden temporary directory next to the target; the manifest goes in last and
the directory is renamed into place at the end, so an interrupted build never leaves a bundle that looks
complete (`Manifest.load` refuses a directory without manifest.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
from maskbit_runtime.manifest import FORMAT, FORMAT_VERSION, Manifest, sha256_file, write_manifest
from maskbit_runtime.pipeline import Pipeline
from maskbit_runtime.specs import COMPONENTS, ComponentSpec
from maskbit_runtime.tokens import combine_groups

from maskbit.config import ModelConfig
from maskbit.generator import Generator
from maskbit.sampling import generate_groups
from maskbit.step import GenerationStep
from maskbit.tokenizer import Tokenizer

from .graphs import dims_of, graph_module, sample_inputs
from .onnx_export import DEFAULT_OPSET, export_onnx
from .quantize import quantize_int8
from .tolerances import AGREEMENT_STEPS, MIN_AGREEMENT, tolerance
from .verify import VerificationError, compare, failure_message, teacher_forced_agreement, verify_component

PRECISIONS = ("fp32", "int8")
QUANTIZED_COMPONENTS = ("step", "transformer")    # the tokenizer's convolutions stay float32 in every bundle
GENERATION_CHECK_STEPS = 8


def _versions() -> dict[str, str]:
    versions = {}
    for dist in ("maskbit", "torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def _component_entry(spec: ComponentSpec, path: Path, dims, precision: str, max_batch: int) -> dict:
    entry = {"file": path.name, "file_sha256": sha256_file(path), "backend": "onnx", "precision": precision,
             "inputs": [t.to_dict(dims) for t in spec.inputs], "outputs": [t.to_dict(dims) for t in spec.outputs],
             "batch_profile": {"min": 1, "opt": max(1, max_batch // 2), "max": max_batch}}
    data = path.with_name(path.name + ".data")
    if data.exists():
        entry.update(data_file=data.name, data_file_sha256=sha256_file(data))
    return entry


def _verify_generation(tmp: Path, generator: Generator, sampling, labels: list[int], seed: int,
                       precision: str) -> dict:
    """A whole seeded generation through the exported step against the eager sampler's tokens: identical at
    fp32; at reduced precision recorded only (it diverges after its first different draw; the agreement gates)."""
    num_steps = min(GENERATION_CHECK_STEPS, sampling.num_steps)
    sampling = dataclasses.replace(sampling, num_steps=num_steps)
    eager = generate_groups(generator, labels, sampling, seed).cpu().numpy()
    with Pipeline.load(tmp, backend="ort", providers=["CPUExecutionProvider"]) as pipe:
        exported = pipe.generate(labels, seed=seed, **dataclasses.asdict(sampling)).tokens
    expected = combine_groups(eager, generator.config.num_bits).reshape(exported.shape)
    result = compare(expected, exported, tolerance(precision, "generation"))
    result.update({"labels": labels, "seed": seed, "num_steps": num_steps})
    return result


def build_bundle(out: str | Path, tokenizer: Tokenizer, generator: Generator | None, config: ModelConfig, *,
                 max_batch: int = 8, opset: int = DEFAULT_OPSET, precision: str = "fp32", verify: bool = True,
                 force: bool = False, provenance: dict | None = None, class_names: list[str] | None = None,
                 on_progress: Callable[[str], None] | None = None) -> Manifest:
    """Export `tokenizer` (+ `generator`) into a verified bundle directory `out`."""
    out = Path(out)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported; expected one of {', '.join(PRECISIONS)}")
    if max_batch < 1:
        raise ValueError(f"max batch must be >= 1, got {max_batch}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to replace it")
    if generator is not None and (generator.config.num_bits != tokenizer.config.num_bits
                                  or not tokenizer.config.is_lookup_free):
        raise ValueError(f"the generator predicts {generator.config.num_bits}-bit tokens but the tokenizer is a "
                         f"{tokenizer.config.num_bits}-bit {tokenizer.config.quantizer_type} tokenizer")
    progress = on_progress or (lambda message: None)
    tokenizer.eval()
    if generator is not None:
        generator.eval()
    dims = dims_of(tokenizer, generator)
    codebook = tokenizer.config.codebook_size
    num_classes = generator.config.num_classes if generator is not None else None
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for a {num_classes}-class generator")
    names = [n for n, spec in COMPONENTS.items() if generator is not None or not spec.needs_generator]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        components = {}
        for name in names:
            progress(f"exporting {name}")
            spec = COMPONENTS[name]
            sample = sample_inputs(spec, dims, 2, seed=0, codebook_size=codebook, num_classes=num_classes or 1000)
            path = export_onnx(graph_module(name, tokenizer, generator), spec, sample, tmp / spec.file, opset,
                               max_batch)
            component_precision = precision if name in QUANTIZED_COMPONENTS else "fp32"
            if component_precision == "int8":
                progress(f"quantizing {name} to int8")
                quantize_int8(path)
            components[name] = _component_entry(spec, path, dims, component_precision, max_batch)
        data = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": config.name,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_dict(), "dims": dataclasses.asdict(dims), "num_bits": tokenizer.config.num_bits,
            "codebook_size": codebook, "tokenizer_lookup_free": tokenizer.config.is_lookup_free,
            "num_classes": num_classes, "class_names": list(class_names) if class_names else None,
            "sampling": dataclasses.asdict(generator.sampling_config) if generator is not None else None,
            "components": components, "opset": opset,
            "provenance": {**(provenance or {}), "tools": _versions()},
            "verification": {"performed": False},
        }
        write_manifest(tmp, data)
        if verify:
            data["verification"] = _verify_all(tmp, names, tokenizer, generator, dims, codebook, num_classes,
                                               precision, max_batch, progress)
            write_manifest(tmp, data)
        if out.exists():          # --force: swap the old bundle out only once the new one is complete
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Manifest.load(out)


def _verify_all(tmp: Path, names: list[str], tokenizer: Tokenizer, generator: Generator | None, dims, codebook: int,
                num_classes: int | None, precision: str, max_batch: int, progress) -> dict:
    from maskbit_runtime.backends.ort import import_ort
    ort = import_ort()
    report = {"performed": True, "components": {}}
    for name in names:
        progress(f"verifying {name}")
        spec = COMPONENTS[name]
        session = ort.InferenceSession(str(tmp / spec.file), providers=["CPUExecutionProvider"])
        batches = [sample_inputs(spec, dims, b, seed=100 + b, codebook_size=codebook, num_classes=num_classes or 1000)
                   for b in sorted({1, min(3, max_batch)})]
        result = verify_component(graph_module(name, tokenizer, generator), spec, session, batches, precision)
        report["components"][name] = result
        if not result["passed"]:
            raise VerificationError(failure_message(name, result))
    if generator is not None:
        progress("verifying a seeded generation")
        labels = list(np.random.default_rng(7).integers(0, num_classes, min(3, max(2, max_batch))).tolist())
        result = _verify_generation(tmp, generator, generator.sampling_config, labels, seed=1234, precision=precision)
        report["generation"] = result
        if not result["passed"]:
            raise VerificationError(f"a seeded generation through the exported step differs from the eager sampler "
                                    f"on {result.get('mismatch_fraction', 1.0):.2%} of tokens")
    if generator is not None and precision in MIN_AGREEMENT:
        progress(f"teacher-forced agreement of the {precision} step with float32 ({AGREEMENT_STEPS} steps)")
        report["agreement"] = _verify_agreement(tmp, generator, labels, precision)
        if not report["agreement"]["passed"]:
            raise VerificationError(
                f"the {precision} step draws the float32 group for only {report['agreement']['agreement']:.2%} of "
                f"groups along a {AGREEMENT_STEPS}-step float32 trajectory (needs >= {MIN_AGREEMENT[precision]:.0%}); "
                f"build --precision fp32 instead")
    return report


def _verify_agreement(tmp: Path, generator: Generator, labels: list[int], precision: str) -> dict:
    """The reduced-precision quality gate: teacher-forced agreement of sampled groups with the float32 step."""
    from maskbit_runtime.backends.ort import import_ort
    from maskbit_runtime.schedules import plan_steps
    settings = dataclasses.asdict(generator.sampling_config)
    settings.pop("num_steps")
    plan = plan_steps(AGREEMENT_STEPS, generator.config.num_tokens * generator.config.codebook_splits, **settings)
    session = import_ort().InferenceSession(str(tmp / COMPONENTS["step"].file), providers=["CPUExecutionProvider"])
    step = GenerationStep(generator).eval()
    result = teacher_forced_agreement(step, session, labels, plan, seed=4321)
    result.update(minimum=MIN_AGREEMENT[precision], passed=result["agreement"] >= MIN_AGREEMENT[precision])
    return result
