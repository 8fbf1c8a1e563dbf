"""ONNX Runtime primitives: sessions on the CPU or CUDA provider, OrtValue buffers bound with IOBinding.

Each session is checked after it loads: its inputs and outputs must be the bundle contract's (a component file
that belongs to another model is refused), and it must run on the provider that was asked for.

A row of a stacked buffer (`view`) is bound by address (`IOBinding.bind_input` with the OrtValue's data pointer
plus the row's offset), so a staged step reads its noise and scalars where the one upload put them. Uploads are
`OrtValue.update_inplace` from ordinary numpy arrays: on CUDA, ONNX Runtime copies them itself (a blocking copy
from pageable memory). Page-locked staging would need cuda-python here only to speed up the few copies a
generation makes, and binding page-locked *host* memory as a step input would make ONNX Runtime copy it to the
GPU on every run. Without CUDA graphs the CUDA provider synchronizes its stream at the end of every run, which
`transfers` counts.

CUDA graphs (`cuda_graphs=True`, on CUDA; needs cuda-python): ONNX Runtime's own capture ("enable_cuda_graph")
replays fixed input and output addresses per graph id ("gpu_graph_id" run option; it does not check them), so each
step binding (one per batch size and ping-pong parity) gets its own id and binds fixed buffers; before each run
the step's rows are copied device-to-device into them, on a stream this backend creates and hands to ONNX Runtime
as its compute stream ("user_compute_stream"), so the copies and the replay are ordered without waiting on the
host. Runs do not synchronize ("disable_synchronize_execution_providers"); the download at the end waits once.
When ONNX Runtime refuses capture for a graph (for example, nodes placed on the CPU), that component runs without
graphs and `describe` says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MissingDependencyError
from ..manifest import Manifest
from ..specs import COMPONENTS
from .base import BackendError, Transfers, check_component_io

GRAPHED = ("step", "step_unguided")        # the components replayed as CUDA graphs
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

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


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
                 provider_options: dict[str, dict[str, str]] | None = None, cuda_graphs: bool = False):
        """`provider_options`: per provider name, e.g. {"CUDAExecutionProvider": {"use_tf32": "0"}} for exact
        float32 parity on GPUs (ONNX Runtime's CUDA provider uses TF32 by default). `cuda_graphs`: replay the step
        as CUDA graphs on CUDA (see the module notes; ignored on the CPU)."""
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
        self.cuda_graphs = bool(cuda_graphs) and self.device == "cuda"
        self.graphs_off: dict[str, str] = {}          # component -> why ONNX Runtime would not capture it
        self._fixed: dict[tuple, Any] = {}            # where graphed steps read their rows
        self._graph_ids: dict[tuple, int] = {}       # addresses -> graph id (from 1: ORT reserves 0; -1 is "none")
        self.stream = None
        if self.cuda_graphs:
            from .cuda import Stream                  # cuda-python: the row copies run on ONNX Runtime's stream
            self.stream = Stream(0)
            self.provider_options[self.providers.index(CUDA)]["user_compute_stream"] = str(self.stream.handle)

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
            session = None
            if self.cuda_graphs and component in GRAPHED:
                cuda = self.providers.index(CUDA)
                options = [dict(o) for o in self.provider_options]
                options[cuda]["enable_cuda_graph"] = "1"
                try:
                    session = self.ort.InferenceSession(str(path), self.options, providers=self.providers,
                                                        provider_options=options)
                except Exception as exc:  # ORT raises its own exception types; try again without graphs
                    self.graphs_off[component] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            try:
                session = session or self.ort.InferenceSession(str(path), self.options, providers=self.providers,
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
        if self.stream is not None:             # runs did not wait: wait once for all queued work
            self.stream.synchronize()
            self.transfers.host_syncs += 1
        self.transfers.device_to_host += len(buffers)
        return [buffer.numpy().copy() for buffer in buffers]          # numpy() may alias the reused buffer

    def bind(self, component: str, buffers: Mapping[str, Any]) -> Binding:
        session = self.session(component)
        spec = COMPONENTS[component]
        graphed = self.cuda_graphs and component in GRAPHED and component not in self.graphs_off
        binding = Binding(session, session.io_binding(), dict(buffers), self.ort.RunOptions())
        addresses = [component]
        for t in spec.inputs:
            buffer = buffers[t.name]
            if isinstance(buffer, Row) and graphed:          # a graph reads fixed addresses: copy the row there
                fixed = self._fixed_for(component, t.name, buffer)
                binding.copies.append((fixed, buffer))
                buffer = fixed
            if isinstance(buffer, Row):
                binding.io.bind_input(t.name, self.device, 0, buffer.dtype.type, list(buffer.shape), buffer.ptr)
                addresses.append(buffer.ptr)
            else:
                binding.io.bind_ortvalue_input(t.name, buffer)
                addresses.append(buffer.data_ptr())
        for t in spec.outputs:
            binding.io.bind_ortvalue_output(t.name, buffers[t.name])
            addresses.append(buffers[t.name].data_ptr())
        if self.cuda_graphs:
            binding.options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        if graphed:        # one graph per set of addresses: the steps of one parity share theirs
            graph = self._graph_ids.setdefault(tuple(addresses), len(self._graph_ids) + 1)
            binding.options.add_run_config_entry("gpu_graph_id", str(graph))
        return binding

    def _fixed_for(self, component: str, name: str, row: Row):
        key = (component, name, row.shape)
        if key not in self._fixed:
            self._fixed[key] = self.allocate(row.shape, row.dtype.name)
        return self._fixed[key]

    def run(self, binding: Binding) -> None:
        for fixed, row in binding.copies:
            self.stream.copy_device_to_device(fixed.data_ptr(), row.ptr, row.nbytes)
            self.transfers.device_to_device += 1
        binding.session.run_with_iobinding(binding.io, binding.options)
        if self.device == "cuda" and not self.cuda_graphs:
            self.transfers.host_syncs += 1      # the CUDA provider synchronizes its stream at the end of each run

    def describe(self) -> dict:
        off = "; ".join(f"{name}: {why}" for name, why in self.graphs_off.items())
        graphs = ("off (on the CPU)" if self.device != "cuda" else "off (cuda_graphs=False)" if not self.cuda_graphs
                  else f"off for {off}" if off else "on")
        return {"backend": self.name, "onnxruntime": self.ort.__version__, "providers": self.providers,
                "available_providers": self.ort.get_available_providers(), "device": self.device,
                "cuda_graphs": graphs}

    def close(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self._sessions.clear()
        self._staging.clear()
        self._fixed.clear()
        if self.stream is not None:
            self.stream.close()
            self.stream = None


@dataclass(eq=False)
class Binding:
    """A session's IOBinding with its buffers (kept alive with it), run options, and the rows a graphed step copies
    into its fixed inputs before each run."""

    session: Any
    io: Any
    buffers: dict
    options: Any
    copies: list = field(default_factory=list)
