"""AOTInductor packages for a bundle: each component exported with `torch.export` and compiled ahead of time.

`build_aoti(bundle, tokenizer, generator, device, precision)` compiles the torch module of every component the
bundle lists (`graphs.graph_module`, the modules the ONNX graphs come from) into `<component>.pt2`
(`torch._inductor.aoti_compile_and_package`) for one device, with the manifest's batch profile as the dynamic
batch range. The manifest entries gain `package`, `package_sha256`, `package_precision`, `package_device` and
`torch_version`; a package loads only in the PyTorch that compiled it, on that device, and the runtime checks both.

Precision: "fp32" compiles the modules as they are. "bf16" runs only the transformer under bfloat16 autocast (its
matmuls in bf16, as `verify.eager_logits(bf16=True)` does); its logits come back as float32, so guidance,
softmax, the draw, confidence and re-masking stay float32, and the tokenizer and combine stay float32.

Integer powers: `2 ** torch.arange(K)` (token <-> bits, `maskbit.bits`) is `aten.pow.Scalar`, which AOTInductor
(torch 2.14, CPU) runs as a fallback that returns wrong int64 values (decoders then divide by zero). Every export
is decomposed with `pow.Scalar(b, e)` -> `pow(full_like(e, b), e)`, which Inductor lowers correctly.

Failure leaves the bundle as it was: packages are compiled to temporary files, then the manifest is rewritten
without package entries, the files are renamed into place and the manifest naming them is written last.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from maskbit_runtime.errors import InputError, MaskbitError
from maskbit_runtime.files import StagedFiles, remove_temporaries, writer_lock
from maskbit_runtime.manifest import Manifest, sha256_file
from maskbit_runtime.specs import COMPONENTS, DEFAULT_COMPONENTS, TRANSFORMER, ComponentSpec, Dims
from torch import nn

from maskbit.generator import Generator
from maskbit.tokenizer import Tokenizer

from .aoti_backend import COMPONENT_KEY, DEVICES, PACKAGE_KEYS, REBUILD

from .graphs import graph_module, random_inputs
from .tolerances import tolerance
from .verify import VerificationError, compare

PRECISIONS = ("fp32", "bf16")


class AotiBuildError(MaskbitError, RuntimeError):
    """torch.export or AOTInductor could not export, compile or load a component."""


class AutocastLogits(nn.Module):
    """The generator under bfloat16 autocast, returning float32 logits (the sampler after it stays float32)."""

    def __init__(self, generator: Generator, device_type: str):
        super().__init__()
        self.generator = generator
        self.config = generator.config
        self.device_type = device_type

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, drop_label_mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            logits = self.generator(tokens, labels, drop_label_mask)                   # (B, N, M, C)
        return logits.float()


def aoti_module(name: str, tokenizer: Tokenizer, generator: Generator | None, device: str,
                precision: str) -> tuple[nn.Module, str]:
    """The module compiled for component `name` (on `device`, never moving the caller's models) and its precision."""
    module = graph_module(name, tokenizer, generator)
    if device != "cpu":
        module = copy.deepcopy(module)
    if precision == "bf16" and COMPONENTS[name].generator_precision:
        if name == TRANSFORMER.name:
            module = AutocastLogits(module, device)
        else:
            module.generator = AutocastLogits(module.generator, device)
        return module.to(device).eval(), "bf16"
    return module.to(device).eval(), "fp32"


def _pow_scalar(base, exponent: torch.Tensor) -> torch.Tensor:
    return torch.pow(torch.full_like(exponent, base), exponent)


def export_program(module: nn.Module, spec: ComponentSpec, inputs: dict[str, np.ndarray], max_batch: int,
                   device: str) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch of 1..max_batch (static when the profile allows only one size)."""
    args = tuple(torch.from_numpy(np.array(inputs[t.name])).to(device) for t in spec.inputs)
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    shapes = tuple({0: batch} if t.dynamic_axes and batch is not None else None for t in spec.inputs)
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    table = torch.export.default_decompositions()
    table[torch.ops.aten.pow.Scalar] = _pow_scalar
    return program.run_decompositions(table)


def compile_package(module: nn.Module, spec: ComponentSpec, dims: Dims, max_batch: int, device: str, path: Path,
                    codebook_size: int, num_classes: int) -> None:
    """Export and compile one component into the package file `path` (must end in .pt2)."""
    inputs = random_inputs(spec, dims, min(2, max_batch), 0, codebook_size, num_classes)
    try:
        program = export_program(module, spec, inputs, max_batch, device)
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path),
            inductor_configs={"aot_inductor.metadata": {COMPONENT_KEY: spec.name}})
    except MaskbitError:
        raise
    except Exception as exc:  # torch.export / Inductor raise many types; the first line says what failed
        raise AotiBuildError(f"AOTInductor could not compile {spec.name} for {device}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def check_package(path: Path, module: nn.Module, spec: ComponentSpec, dims: Dims, max_batch: int, device: str,
                  codebook_size: int, num_classes: int) -> dict:
    """Run the package on fresh sample inputs at batch 1 and max_batch and compare with the eager module."""
    runner = torch._inductor.aoti_load_package(str(path))
    report = {}
    for batch in sorted({1, max_batch}):
        inputs = random_inputs(spec, dims, batch, 100 + batch, codebook_size, num_classes)
        with torch.no_grad():
            outputs = runner(*(torch.from_numpy(np.array(inputs[t.name])).to(device) for t in spec.inputs))
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        eager = _run_on(module, spec, inputs, device)
        for t, out in zip(spec.outputs, outputs):
            result = compare(eager[t.name], out.cpu().numpy(), tolerance("fp32", spec.name))
            report[f"{t.name}@{batch}"] = result
            if not result["passed"]:
                raise VerificationError(f"AOTInductor package {path.name}: {t.name} at batch {batch} differs from "
                                        f"eager PyTorch: {result}")
    return report


def bf16_gate(path: Path, generator: Generator, device: str, max_batch: int) -> dict:
    """The distribution gate (quality.py) of a bf16 transformer package against eager float32."""
    from .verify import _gate_plan, distribution_report
    runner = torch._inductor.aoti_load_package(str(path))

    def logits(tokens, labels, drop):
        with torch.no_grad():
            return runner(*(torch.from_numpy(a).to(device) for a in (tokens, labels, drop))).float().cpu().numpy()
    labels = [1, 7][:max(1, max_batch // 2)]
    return distribution_report(generator, logits, labels, _gate_plan(generator), "bf16")


def _run_on(module: nn.Module, spec: ComponentSpec, inputs: dict[str, np.ndarray], device: str) -> dict:
    with torch.no_grad():
        out = module(*(torch.from_numpy(np.array(inputs[t.name])).to(device) for t in spec.inputs))
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o.cpu().numpy() for t, o in zip(spec.outputs, out)}


def build_aoti(bundle_dir: str | Path, tokenizer: Tokenizer, generator: Generator | None, device: str = "cpu",
               precision: str = "fp32", on_progress: Callable[[str], None] | None = None,
               components: tuple[str, ...] | None = None, verify: bool = True) -> Manifest:
    """Compile an AOTInductor package for every component of the bundle at `bundle_dir` (or those named in
    `components`); returns the updated manifest. `verify` compares each fp32 package with eager PyTorch on
    sample inputs and holds a bf16 transformer package (when the bundle has one) to the distribution gate.
    Holds the bundle's writer lock (the one `maskbit-export` takes), and removes what a killed build left."""
    with writer_lock(bundle_dir, f"another export is writing {bundle_dir} right now; wait for it"):
        for name in Manifest.load(bundle_dir).components:
            remove_temporaries(Path(bundle_dir) / f"{name}.pt2")
        return _build_aoti(bundle_dir, tokenizer, generator, device, precision, on_progress, components, verify)


def _build_aoti(bundle_dir: str | Path, tokenizer: Tokenizer, generator: Generator | None, device: str,
                precision: str, on_progress: Callable[[str], None] | None, components: tuple[str, ...] | None,
                verify: bool) -> Manifest:
    if precision not in PRECISIONS:
        raise InputError(f"AOTInductor precision {precision!r} is not supported; expected one of "
                         f"{', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise InputError(f"AOTInductor device {device!r} is not supported; expected one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--aoti-device cuda needs a CUDA GPU visible to PyTorch (torch.cuda.is_available() is "
                         "False here)")
    progress = on_progress or (lambda message: None)
    manifest = Manifest.load(bundle_dir)
    names = list(components or manifest.components)
    unknown = [n for n in names if n not in manifest.components]
    if unknown:
        raise InputError(f"bundle {manifest.root} has no component(s) {', '.join(unknown)}")
    root = manifest.root
    codebook, classes = manifest.codebook_size, manifest.num_classes or 1000
    built: dict[str, str] = {}
    with StagedFiles() as staged:
        for name in names:
            entry, spec = manifest.components[name], manifest.spec(name)
            module, effective = aoti_module(name, tokenizer, generator, device, precision)
            progress(f"compiling AOTInductor package {name} ({effective}, {device})")
            tmp = staged.path(root / f"{name}.pt2")
            built[name] = effective
            compile_package(module, spec, manifest.dims, entry.batch_profile.max, device, tmp, codebook, classes)
            if verify and effective == "fp32":
                check_package(tmp, module, spec, manifest.dims, entry.batch_profile.max, device, codebook, classes)
            elif verify and name == TRANSFORMER.name and entry.batch_profile.max >= 2:   # runs a doubled batch
                report = bf16_gate(tmp, generator, device, entry.batch_profile.max)
                if not report["passed"]:
                    raise VerificationError(f"the bf16 transformer package fails the distribution gate: {report}")
        components_ = {n: dataclasses.replace(e, **dict.fromkeys(PACKAGE_KEYS)) if n in built else e
                       for n, e in manifest.components.items()}
        if any(manifest.components[n].package for n in built):
            manifest.replace(components=components_).write(root)    # package-free while the files are swapped
        for name, effective in built.items():
            path = staged.commit(root / f"{name}.pt2")
            components_[name] = dataclasses.replace(
                components_[name], package=path.name, package_sha256=sha256_file(path), package_precision=effective,
                package_device=device, torch_version=torch.__version__)
        manifest.replace(components=components_).write(root)
    missing = [n for n in DEFAULT_COMPONENTS if n in manifest.components and n not in built
               and not manifest.components[n].package]
    progress(f"wrote {len(built)} AOTInductor packages for {device} (torch {torch.__version__})"
             + (f"; still without a package: {', '.join(missing)} ({REBUILD})" if missing else ""))
    return Manifest.load(root)
