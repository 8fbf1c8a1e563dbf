"""One `maskbit-export build-engines` run as a typed value: `ExportJob(...)` checks every rule between its options
when it is made, before any checkpoint is read or any file or folder is written; `job.run()` then exports the
bundle and builds its TensorRT engines or AOTInductor packages.

Field names are the command line's flags (`max_batch` <-> `--max-batch`), so the messages name the flags. A rule
between options fails with `ExportRuleError`; an `--out` that exists (without `--force`, or that is not a bundle)
fails with bundle.py's InputError, the same check the build repeats under its lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from maskbit_runtime.errors import InputError, MaskbitError
from maskbit_runtime.manifest import Manifest

from .aoti import PRECISIONS as AOTI_PRECISIONS
from .aoti_backend import DEVICES as AOTI_DEVICES
from .bundle import PRECISIONS, ExportOptions, _check_target, build_bundle
from .onnx_export import DEFAULT_OPSET, ExportError
from .tensorrt import PRECISIONS as ENGINE_PRECISIONS
from .tensorrt import graph_precision

BACKENDS = ("onnx", "tensorrt", "aoti")
MIN_OPSET = 17


class ExportRuleError(InputError):
    """Options of an export that do not go together, or one out of its range; the message says which to change."""


@dataclass(frozen=True)
class ExportJob:
    """What to export and how; construction refuses any combination of options that cannot be built."""

    tokenizer: str                        # checkpoint: official .bin, our .safetensors or hf://owner/repo[/file]
    out: Path                             # the bundle directory to create
    generator: str | None = None          # without it the bundle only encodes and decodes
    config: str | None = None             # official YAML or preset name
    max_batch: int = 8
    opt_batch: int | None = None          # the batch TensorRT engines are tuned for; None: max_batch
    opset: int = DEFAULT_OPSET
    precision: str | None = None          # of the generator graphs; None: what the backend needs, else fp32
    backend: str = "onnx"                 # onnx, or also tensorrt engines / aoti packages
    engine_precision: str | None = None   # of the engines or packages; None: fp32
    aoti_device: str | None = None        # None: cpu
    with_transformer: bool = False
    verify: bool = True
    class_names: tuple[str, ...] | None = None
    force: bool = False

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        self._check_options()
        try:
            self.options                  # noqa: B018 (ExportOptions holds the batch and graph-precision ranges)
        except InputError as exc:
            raise ExportRuleError(str(exc)) from None
        _check_target(self.out, self.force)

    def _check_options(self) -> None:
        _one_of("--backend", self.backend, BACKENDS)
        _one_of("--precision", self.precision, PRECISIONS, optional=True)
        _one_of("--engine-precision", self.engine_precision, ENGINE_PRECISIONS, optional=True)
        _one_of("--aoti-device", self.aoti_device, AOTI_DEVICES, optional=True)
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise ExportRuleError(f"--opset must be an integer >= {MIN_OPSET}, got {self.opset!r}")
        if self.generator is None:
            given = [flag for flag, used in (("--precision", self.precision not in (None, "fp32")),
                                             ("--with-transformer", self.with_transformer),
                                             ("--class-names", self.class_names is not None)) if used]
            if given:
                flags, verb = " and ".join(given), "applies" if len(given) == 1 else "apply"
                raise ExportRuleError(f"{flags} {verb} to the generator, and this export has no --generator: add "
                                      f"one or drop {flags}")
        if self.engine_precision is not None and self.backend == "onnx":
            raise ExportRuleError("--engine-precision applies to engines: add --backend tensorrt or aoti")
        if self.aoti_device is not None and self.backend != "aoti":
            raise ExportRuleError("--aoti-device applies to AOTInductor packages: add --backend aoti")
        if self.backend == "aoti" and self.engine_precision not in (None, *AOTI_PRECISIONS):
            raise ExportRuleError(f"--backend aoti supports --engine-precision {' or '.join(AOTI_PRECISIONS)}, "
                                  f"not {self.engine_precision}")
        if self.backend == "tensorrt" and self.generator is not None:
            engine, needed = self.engine_precision or "fp32", graph_precision(self.engine_precision or "fp32")
            if self.precision not in (None, needed):
                raise ExportRuleError(f"--engine-precision {engine} builds from {needed} graphs; drop --precision "
                                      f"{self.precision} or pass --precision {needed}")

    @property
    def graph_precision(self) -> str:
        """The precision the generator graphs are exported in (fp32 when there is no generator)."""
        if self.generator is None:
            return "fp32"
        if self.backend == "tensorrt":
            return graph_precision(self.engine_precision or "fp32")
        return self.precision or "fp32"

    @property
    def options(self) -> ExportOptions:
        return ExportOptions(max_batch=self.max_batch, opt_batch=self.opt_batch, opset=self.opset,
                             precision=self.graph_precision, verify=self.verify,
                             with_transformer=self.with_transformer)

    def check_environment(self) -> None:
        """Fail before the long ONNX export when the engines or packages asked for cannot be built here."""
        if self.backend == "tensorrt":
            from maskbit_runtime.backends.tensorrt import import_tensorrt
            import_tensorrt()
        if self.backend == "aoti" and self.aoti_device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise InputError("--aoti-device cuda needs a CUDA GPU visible to PyTorch")

    def run(self, on_progress: Callable[[str], None] | None = None) -> Manifest:
        """Export the bundle (verified unless `verify` is off), then build its engines or packages; returns the
        final manifest. A failed engine build leaves the complete ONNX bundle and says so."""
        import maskbit
        progress = on_progress or (lambda message: None)
        self.check_environment()
        tokenizer = maskbit.load_tokenizer(self.tokenizer, self.config)
        generator = maskbit.load_generator(self.generator, self.config) if self.generator else None
        provenance = {"tokenizer": str(self.tokenizer), "generator": str(self.generator) if self.generator else None,
                      "config": str(self.config) if self.config else None}
        manifest = build_bundle(self.out, tokenizer, generator, options=self.options,
                                name=maskbit.resolve_config(self.config).name if self.config else "",
                                class_names=list(self.class_names) if self.class_names else None,
                                provenance=provenance, force=self.force, on_progress=progress)
        if self.backend == "onnx":
            return manifest
        try:
            if self.backend == "aoti":
                from .aoti import build_aoti
                return build_aoti(self.out, tokenizer, generator, device=self.aoti_device or "cpu",
                                  precision=self.engine_precision or "fp32", verify=self.verify, on_progress=progress)
            from .tensorrt import build_engines
            return build_engines(self.out, precision=self.engine_precision or "fp32", on_progress=progress)
        except (MaskbitError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ExportError(f"{reason} (the ONNX bundle {self.out} is complete and runs with the ort backend)") \
                from exc


def _one_of(flag: str, value, choices: tuple[str, ...], optional: bool = False) -> None:
    if not (optional and value is None) and value not in choices:
        raise ExportRuleError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
