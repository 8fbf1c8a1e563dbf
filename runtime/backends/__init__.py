"""Execution backends of the runtime: ONNX Runtime ("ort") and TensorRT ("tensorrt")."""

from __future__ import annotations

from .base import Backend, BackendError

BACKENDS = ("ort", "tensorrt")


def open_backend(name: str, manifest, **options) -> Backend:
    """Instantiate a backend by name for a loaded manifest (heavy imports happen here, not at import time)."""
    if name == "ort":
        from .ort import OrtBackend
        return OrtBackend(manifest, **options)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend
        return TensorRTBackend(manifest, **options)
    raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "BackendError", "open_backend"]
