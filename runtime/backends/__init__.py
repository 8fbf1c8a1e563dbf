"""Execution backends of the runtime: ONNX Runtime ("ort"), TensorRT ("tensorrt") and AOTInductor ("aoti").

Each backend provides only device primitives (`base.Primitives`); `base.Executor` composes them into
generation, so every backend runs the same stepper and the same combine-then-decode.
"""

from __future__ import annotations

from ..errors import MissingDependencyError
from .base import BackendError, Executor, Primitives

BACKENDS = ("ort", "tensorrt", "aoti")


def open_backend(name: str, manifest, **options) -> Executor:
    """Open a backend by name for a loaded manifest (heavy imports happen here, not at import time)."""
    if name == "ort":
        from .ort import OrtPrimitives
        return Executor(OrtPrimitives(manifest, **options), manifest)
    if name == "tensorrt":
        from .tensorrt import TensorRTPrimitives
        return Executor(TensorRTPrimitives(manifest, **options), manifest)
    if name == "aoti":             # torch-based, so it lives with the exporter: this package never imports torch
        try:
            from maskbit_export.aoti_backend import AotiPrimitives
        except ImportError as exc:
            raise MissingDependencyError(f"the AOTInductor backend needs the full maskbit package with PyTorch: "
                                         f"pip install 'maskbit[torch]' ({exc.name} missing)") from None
        return Executor(AotiPrimitives(manifest, **options), manifest)
    raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "BackendError", "Executor", "Primitives", "open_backend"]
