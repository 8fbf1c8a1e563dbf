"""ONNX Runtime primitives: sessions on the CPU or CUDA provider, OrtValue buffers bound with IOBinding.

Each session is checked after it loads: its inputs and outputs must be the bundle contract's (a component file
that belongs to another model is refused), and it must run on the provider that was asked for.

A row of a stacked buffer (`view`) is bound by address (`IOBinding.bind_input` with the OrtValue's data pointer
plus the row's offset), so a staged step reads its noise and scalars where the one upload put them. Uploads are
`OrtValue.update_inplace` from ordinary numpy arrays: on CUDA, ONNX Runtime copies them itself (a blocking copy
from pageable memory). Page-locked staging would need cuda-python here only to speed up the few copies a
generation makes, and binding page-locked *host* memory as a step input would make ONNX Runtime copy it to the
GPU on every run. ONNX Runtime's own CUDA graphs ("enable_cuda_graph") are not used: a captured session
replays fixed input addresses, but a staged step reads a different row each step, and moving the row into a
fixed buffer needs a device-to-device copy on ONNX Runtime's stream, which its Python API does not offer; and
its CUDA provider synchronizes its stream at the end of every run, which `transfers` counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MissingDependencyError
from ..manifest import Manifest
from ..specs import COMPONENTS
from .base import BackendError, Transfers, check_component_io

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool", "tensor(float16)": "float16", "tensor(int32)": "int32"}


@dataclass(frozen=True, eq=False)
class Row:
    """A tensor inside a stacked OrtValue [rows, n]: its address, shape and dtype (the OrtValue owns the memory)."""

    base: Any
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype


ORT_BUILDS = ("onnxruntime", "onnxruntime-gpu")     # distributions that install the same `onnxruntime` package


def import_ort():
    clash = installed_builds()
    if len(clash) > 1:
        raise BackendError(f"both {' and '.join(clash)} are installed; they write the same files, so neither is "
                           f"intact: pip uninstall -y {' '.join(clash)} && pip install onnxruntime-gpu (CUDA) or "
                           f"onnxruntime (CPU)")
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("the ONNX Runtime backend needs onnxruntime: pip install onnxruntime "
                                     "(or onnxruntime-gpu instead of it, for CUDA)") from None
    return onnxruntime


def installed_builds() -> list[str]:
    """Which of the ONNX Runtime distributions pip has installed."""
    from importlib import metadata
    found = []
    for name in ORT_BUILDS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


class OrtPrimitives:
    name = "ort"

    def __init__(self, manifest: Manifest, providers: list[str] | None = None, threads: int | None = None,
                 provider_options: dict[str, dict[str, str]] | None = None):
        """`provider_options`: per provider name, e.g. {"CUDAExecutionProvider": {"use_tf32": "0"}} for exact
        float32 parity on GPUs (ONNX Runtime's CUDA provider uses TF32 by default)."""
        self.ort = import_ort()
        available = self.ort.get_available_providers()
        if providers is None:
            providers = [CUDA, CPU] if CUDA in available else [CPU]
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendError(f"ONNX Runtime here lacks {', '.join(missing)} (available: {', '.join(available)})")
        self.manifest = manifest
        self.providers = providers
        self.device = "cuda" if providers[0] == CUDA else "cpu"
        unknown = set(provider_options or {}) - set(providers)
        if unknown:
            raise BackendError(f"provider options for {', '.join(sorted(unknown))}, which is not among the providers "
                               f"{', '.join(providers)}")
        self.provider_options = [dict((provider_options or {}).get(p, {})) for p in providers]
        self.options = self.ort.SessionOptions()
        if threads:
            self.options.intra_op_num_threads = threads
        self._sessions: dict[str, Any] = {}
        self._staging: dict[int, tuple[Any, np.ndarray]] = {}
        self.transfers = Transfers()

    def session(self, component: str):
        if component not in self._sessions:
            path = self.manifest.file(component)
            entry = self.manifest.component(component)
            if entry.data_file is not None:
                self.manifest.file(component, "data_file")      # confined and hash-checked before ORT reads it
            if entry.precision == "bf16" and self.device != "cuda":
                raise BackendError(f"{path.name} is a bfloat16 graph, which ONNX Runtime runs only with its CUDA "
                                   f"provider (its CPU provider has no bfloat16 MatMul); use a GPU (--backend tensorrt "
                                   f"or onnxruntime-gpu) or export --precision fp16, int8 or fp32 for the CPU")
            try:
                session = self.ort.InferenceSession(str(path), self.options, providers=self.providers,
                                                    provider_options=self.provider_options)
            except Exception as exc:  # ORT raises its own exception types
                raise BackendError(f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0]}") from None
            # get_available_providers() lists what the package was built with, not what loads: a CUDA provider
            # whose libraries are missing silently falls back to the CPU, so check what the session really uses
            if self.device == "cuda" and CUDA not in session.get_providers():
                raise BackendError(f"ONNX Runtime could not start its CUDA provider for {path.name} (it fell back "
                                   f"to {', '.join(session.get_providers())}); check that the CUDA and cuDNN "
                                   f"libraries onnxruntime-gpu {self.ort.__version__} needs are installed")
            tensors = session.get_inputs() + session.get_outputs()
            declared = {t.name: (_ORT_TYPES.get(t.type, t.type), len(t.shape)) for t in tensors}
            shapes = {t.name: tuple(s if isinstance(s, int) else None for s in t.shape) for t in tensors}
            check_component_io(component, declared, str(path), shapes, self.manifest.dims)
            self._sessions[component] = session
        return self._sessions[component]

    def allocate(self, shape: tuple[int, ...], dtype: str):
        try:
            return self.ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(dtype), self.device, 0)
        except Exception as exc:  # ORT raises its own exception types
            raise BackendError(f"ONNX Runtime cannot allocate {self.device} memory ({str(exc).splitlines()[0]}); "
                               f"is its {self.device} provider usable here?") from None

    def view(self, buffer, row: int, shape: tuple[int, ...]) -> Row:
        rows, length = buffer.shape()
        dtype = np.dtype(_ORT_TYPES[buffer.data_type()])
        if not 0 <= row < rows or int(np.prod(shape)) > length:
            raise ValueError(f"row {row} of a buffer of shape {[rows, length]} cannot hold {list(shape)}")
        return Row(buffer, buffer.data_ptr() + row * length * dtype.itemsize, tuple(shape), dtype)

    def staging(self, buffer) -> np.ndarray:
        if id(buffer) not in self._staging:
            self._staging[id(buffer)] = buffer, np.empty(buffer.shape(), np.dtype(_ORT_TYPES[buffer.data_type()]))
        return self._staging[id(buffer)][1]

    def upload(self, buffer, array: np.ndarray) -> None:
        buffer.update_inplace(np.ascontiguousarray(array))
        self.transfers.host_to_device += 1

    def download(self, *buffers) -> list[np.ndarray]:
        self.transfers.device_to_host += len(buffers)
        return [buffer.numpy().copy() for buffer in buffers]          # numpy() may alias the reused buffer

    def bind(self, component: str, buffers: Mapping[str, Any]):
        session = self.session(component)
        spec = COMPONENTS[component]
        binding = session.io_binding()
        for t in spec.inputs:
            buffer = buffers[t.name]
            if isinstance(buffer, Row):
                binding.bind_input(t.name, self.device, 0, buffer.dtype.type, list(buffer.shape), buffer.ptr)
            else:
                binding.bind_ortvalue_input(t.name, buffer)
        for t in spec.outputs:
            binding.bind_ortvalue_output(t.name, buffers[t.name])
        return session, binding, dict(buffers)          # the buffers stay alive as long as the binding

    def run(self, binding) -> None:
        session, io_binding, _ = binding
        session.run_with_iobinding(io_binding)
        if self.device == "cuda":
            self.transfers.host_syncs += 1      # the CUDA provider synchronizes its stream at the end of each run

    def describe(self) -> dict:
        return {"backend": self.name, "onnxruntime": self.ort.__version__, "providers": self.providers,
                "available_providers": self.ort.get_available_providers(), "device": self.device,
                "cuda_graphs": "not used with ONNX Runtime (see maskbit_runtime/backends/ort.py)"}

    def close(self) -> None:
        self._sessions.clear()
        self._staging.clear()
