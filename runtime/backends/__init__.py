"""Execution backends of the runtime: ONNX Runtime ("ort"), TensorRT ("tensorrt") and AOTInductor ("aoti").

Each backend provides only device primitives (`base.Primitives`); the slot scheduler and `base.Executor` compose
them into generation, so every backend runs the same algorithm. Backends outside this package register their
primitives under the entry-point group `maskbit_runtime.backends` (AOTInductor, which is torch-based, lives in
maskbit_export and is found that way), so this package never imports another of this project's packages.
"""

from __future__ import annotations

from importlib import metadata

from ..errors import MissingDependencyError
from ..trust import check_native_code
from .base import BackendError, Executor, Primitives

ENTRY_POINTS = "maskbit_runtime.backends"

BACKENDS = ("ort", "tensorrt", "aoti")


def open_backend(name: str, manifest, trust_native_code: bool = False, trusted_hashes=None, **options) -> Executor:
    """Open a backend by name for a loaded manifest (heavy imports happen here, not at import time). Backends that
    load native code (aoti, tensorrt) need the user's trust first (`maskbit_runtime.trust`)."""
    check_native_code(name, manifest, trust_native_code, trusted_hashes)
    if name == "ort":
        from .ort import OrtPrimitives
        return Executor(OrtPrimitives(manifest, **options), manifest)
    if name == "tensorrt":
        from .tensorrt import TensorRTPrimitives
        return Executor(TensorRTPrimitives(manifest, **options), manifest)
    if name == "aoti":             # torch-based, so it lives with the exporter: this package never imports torch
        return Executor(_registered(name)(manifest, **options), manifest)
    raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def _registered(name: str):
    """The primitives class registered for backend `name` under the entry-point group."""
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINTS) if ep.name == name]
    if not found:
        raise MissingDependencyError(f"no {name!r} backend is installed: the AOTInductor backend needs the full "
                                     f"maskbit package with PyTorch: pip install 'maskbit[torch]'")
    try:
        return found[0].load()
    except ImportError as exc:
        raise MissingDependencyError(f"the {name!r} backend cannot load: pip install 'maskbit[torch]' "
                                     f"({exc.name} missing)") from None


__all__ = ["BACKENDS", "BackendError", "Executor", "Primitives", "open_backend"]
