"""Execution backends of the runtime: ONNX Runtime ("ort") and TensorRT ("tensorrt").

Each backend provides only device primitives (`base.Primitives`); `base.Executor` composes them into
generation, so every backend runs the same stepper and the same combine-then-decode.
"""

from __future__ import annotations

from .base import BackendError, Executor, Primitives

BACKENDS = ("ort", "tensorrt")


def open_backend(name: str, manifest, **options) -> Executor:
    """Open a backend by name for a loaded manifest (heavy imports happen here, not at import time)."""
    if name == "ort":
        from .ort import OrtPrimitives
        return Executor(OrtPrimitives(manifest, **options), manifest)
    if name == "tensorrt":
        from .tensorrt import TensorRTPrimitives
        return Executor(TensorRTPrimitives(manifest, **options), manifest)
    raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "BackendError", "Executor", "Primitives", "open_backend"]
