"""ONNX Runtime primitives: sessions on the CPU or CUDA provider, OrtValue buffers bound with IOBinding.

Each session is checked after it loads: its inputs and outputs must be the bundle contract's (a component file
that belongs to another model is refused), and it must run on the provider that was asked for.

A range of rows (`rows`) is bound by address (`IOBinding.bind_input` with the OrtValue's data pointer plus the
rows' offset), so a step over the first n slots reads the slot table in place. Uploads are
`OrtValue.update_inplace` from ordinary numpy arrays: on CUDA, ONNX Runtime copies them itself with a blocking
copy from pageable memory, and downloads are `OrtValue.numpy()`, a synchronous copy; `transfers` counts each of
them as a host sync (`describe()["host_syncs"]`). Device-to-device copies (admitted, moved and retired rows) are a
memmove on the CPU and, on CUDA, cudaMemcpyAsync (cuda-python) on a stream this backend creates and hands to ONNX
Runtime as its compute stream ("user_compute_stream"), so copies and runs are ordered without a wait. Without
CUDA graphs the CUDA provider synchronizes its stream at the end of every run, which `transfers` counts too.

CUDA graphs (on CUDA, by default as on every backend: `base.CUDA_GRAPHS`; `cuda_graphs=False` to turn off): ONNX
Runtime's own capture ("enable_cuda_graph") replays the input and output addresses and shapes it captured per graph
id ("gpu_graph_id" run option); every step binding (one per number of occupied slots and ping-pong parity) binds
fixed addresses, so each gets its own id, keyed by every tensor's address and shape (row ranges of one buffer share
their start address), and nothing is copied before a replay. Runs then do not synchronize
("disable_synchronize_execution_providers"). When ONNX Runtime refuses capture for a graph (for example, nodes
placed on the CPU), that component runs without graphs and `describe` says why. """

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MissingDependencyError
from ..manifest import Manifest
from .base import CUDA_GRAPHS, BackendError, Transfers, check_component_io
from .probe import probe
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool", "tensor(float16)": "float16", "tensor(int32)": "int32"}


@dataclass(frozen=True, eq=False)
class Row:
    """A range of rows of an OrtValue: its address, shape and dtype (the OrtValue owns the memory)."""

    base: Any
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


CPU_SYNCS = "none: on the CPU nothing runs asynchronously"
CUDA_SYNCS = ("the host's waits per generation, each counted once: every upload (OrtValue.update_inplace copies "
              "from pageable memory with a blocking copy), the download's synchronization of this backend's stream "
              "and each downloaded buffer (OrtValue.numpy() copies synchronously), and without CUDA graphs every run "
              "(the CUDA provider synchronizes its stream at the end of each run)")
ORT_BUILDS = ("onnxruntime", "onnxruntime-gpu")     # distributions that install the same `onnxruntime` package


def import_ort():
    clash = installed_builds()
    if len(clash) > 1:
        raise BackendError(f"both {' and '.join(clash)} are installed; they write the same files, so neither is "
                           f"intact: pip uninstall -y {' '.join(clash)} && pip install onnxruntime-gpu (CUDA) or "
                           f"onnxruntime (CPU)")
    # No telemetry: ONNX Runtime 1.32 creates ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,
    # onnxruntime.db} when its environment starts (the first session) unless ORT_DISABLE_TELEMETRY is set then
    # (found in its binary; "0" leaves it on); ORT_TELEMETRY_DISABLED is the name of later versions (PR #29843).
    # disable_telemetry_events() alone comes too late for the device id, so both.
    import os
    os.environ["ORT_DISABLE_TELEMETRY"] = os.environ["ORT_TELEMETRY_DISABLED"] = "1"
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("the ONNX Runtime backend needs onnxruntime: pip install onnxruntime "
                                     "(or onnxruntime-gpu instead of it, for CUDA)") from None
    if hasattr(onnxruntime, "disable_telemetry_events"):
        onnxruntime.disable_telemetry_events()
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
                 provider_options: dict[str, dict[str, str]] | None = None, cuda_graphs: bool = CUDA_GRAPHS):
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
        self._graph_ids: dict[tuple, int] = {}       # graph_key -> graph id (from 1: ORT reserves 0; -1 is "none")
        self.stream = None                            # on CUDA: made with the first session (`_open_stream`)
        self._stream_error: Exception | None = None

    def _open_stream(self) -> None:
        """The cuda-python stream the row copies run on, handed to ONNX Runtime as its compute stream. If it cannot
        be made, sessions are still created, so a CUDA provider that does not load is reported as such first."""
        if self.device != "cuda" or self.stream is not None or self._stream_error is not None:
            return
        try:
            from .cuda import Stream
            self.stream = Stream(0)
        except (BackendError, MissingDependencyError) as exc:
            self._stream_error = exc
            return
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
            self._open_stream()
            session = None
            if self.cuda_graphs and self.manifest.spec(component).graphed:
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
            if self.device == "cuda" and self.stream is None:
                raise BackendError(f"ONNX Runtime runs on CUDA here, but the row copies between its buffers need "
                                   f"cuda-python with a working driver: {self._stream_error}")
            tensors = session.get_inputs() + session.get_outputs()
            declared = {t.name: (_ORT_TYPES.get(t.type, t.type), len(t.shape)) for t in tensors}
            shapes = {t.name: tuple(s if isinstance(s, int) else None for s in t.shape) for t in tensors}
            check_component_io(self.manifest.spec(component), declared, str(path), shapes, self.manifest.dims)
            if self.device == "cpu":      # what the graph computes (CUDA sessions may capture graphs: not probed)
                names = [t.name for t in session.get_outputs()]
                probe(self.manifest, component, lambda feeds: dict(zip(names, session.run(names, feeds))), str(path),
                      self.session)
            self._sessions[component] = session
        return self._sessions[component]

    def allocate(self, shape: tuple[int, ...], dtype: str):
        try:
            return self.ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(dtype), self.device, 0)
        except Exception as exc:  # ORT raises its own exception types
            raise BackendError(f"ONNX Runtime cannot allocate {self.device} memory ({str(exc).splitlines()[0]}); "
                               f"is its {self.device} provider usable here?") from None

    def rows(self, buffer, start: int, count: int) -> Row:
        base = buffer.base if isinstance(buffer, Row) else buffer
        shape = buffer.shape if isinstance(buffer, Row) else tuple(buffer.shape())
        ptr = buffer.ptr if isinstance(buffer, Row) else buffer.data_ptr()
        dtype = np.dtype(_ORT_TYPES[base.data_type()])
        if not shape or not (start >= 0 and count >= 1 and start + count <= shape[0]):
            raise ValueError(f"rows {start}..{start + count - 1} do not exist in a buffer of shape {list(shape)}")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        return Row(base, ptr + start * row_bytes, (count, *shape[1:]), dtype)

    def copy(self, target, source) -> None:
        target, source = (self.rows(b, 0, b.shape[0] if isinstance(b, Row) else b.shape()[0])
                          for b in (target, source))
        if target.shape != source.shape or target.dtype != source.dtype:
            raise ValueError(f"cannot copy {source.dtype} {list(source.shape)} into {target.dtype} "
                             f"{list(target.shape)}")
        if self.device == "cuda":
            self._open_stream()
            if self.stream is None:
                raise BackendError(f"copies between ONNX Runtime's CUDA buffers need cuda-python with a working "
                                   f"driver: {self._stream_error}")
            self.stream.copy_device_to_device(target.ptr, source.ptr, target.nbytes)
        else:
            ctypes.memmove(target.ptr, source.ptr, target.nbytes)
        self.transfers.device_to_device += 1

    def staging(self, buffer) -> np.ndarray:
        if id(buffer) not in self._staging:
            self._staging[id(buffer)] = buffer, np.empty(buffer.shape(), np.dtype(_ORT_TYPES[buffer.data_type()]))
        return self._staging[id(buffer)][1]

    def upload(self, buffer, array: np.ndarray) -> None:
        buffer.update_inplace(np.ascontiguousarray(array))
        self.transfers.host_to_device += 1
        if self.device == "cuda":
            self.transfers.host_syncs += 1      # a blocking copy from pageable memory: the host waits for it

    def download(self, *buffers) -> list[np.ndarray]:
        if self.stream is not None:             # wait once for the work queued on this backend's stream
            self.stream.synchronize()
            self.transfers.host_syncs += 1
        self.transfers.device_to_host += len(buffers)
        if self.device == "cuda":
            self.transfers.host_syncs += len(buffers)       # OrtValue.numpy() copies synchronously
        return [buffer.numpy().copy() for buffer in buffers]          # numpy() may alias the reused buffer

    def bind(self, component: str, buffers: Mapping[str, Any]) -> Binding:
        session = self.session(component)
        spec = self.manifest.spec(component)
        graphed = self.cuda_graphs and spec.graphed and component not in self.graphs_off
        binding = Binding(session, session.io_binding(), dict(buffers), self.ort.RunOptions())
        tensors = []
        for t, output in [(t, False) for t in spec.inputs] + [(t, True) for t in spec.outputs]:
            buffer = buffers[t.name]
            if isinstance(buffer, Row):
                bind = binding.io.bind_output if output else binding.io.bind_input
                bind(t.name, self.device, 0, buffer.dtype.type, list(buffer.shape), buffer.ptr)
                tensors.append((buffer.ptr, buffer.shape))
            else:
                (binding.io.bind_ortvalue_output if output else binding.io.bind_ortvalue_input)(t.name, buffer)
                tensors.append((buffer.data_ptr(), tuple(buffer.shape())))
        if self.cuda_graphs:
            binding.options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        if graphed:
            graph = self._graph_ids.setdefault(graph_key(component, tensors), len(self._graph_ids) + 1)
            binding.options.add_run_config_entry("gpu_graph_id", str(graph))
        return binding

    def run(self, binding: Binding) -> None:
        binding.session.run_with_iobinding(binding.io, binding.options)
        if self.device == "cuda" and not self.cuda_graphs:
            self.transfers.host_syncs += 1      # the CUDA provider synchronizes its stream at the end of each run

    def describe(self) -> dict:
        off = "; ".join(f"{name}: {why}" for name, why in self.graphs_off.items())
        graphs = ("off (on the CPU)" if self.device != "cuda" else "off (cuda_graphs=False)" if not self.cuda_graphs
                  else f"off for {off}" if off else "on")
        return {"backend": self.name, "onnxruntime": self.ort.__version__, "providers": self.providers,
                "available_providers": self.ort.get_available_providers(), "device": self.device,
                "cuda_graphs": graphs, "host_syncs": CUDA_SYNCS if self.device == "cuda" else CPU_SYNCS}

    def close(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self._sessions.clear()
        self._staging.clear()
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def graph_key(component: str, tensors: list[tuple[int, tuple[int, ...]]]) -> tuple:
    """What tells two graphed bindings apart: each tensor's (address, shape). A graph replays the addresses and
    shapes it captured, and a step over the first n rows starts at the same address whatever n is."""
    return (component, *tensors)


@dataclass(eq=False)
class Binding:
    """A session's IOBinding with its buffers (kept alive with it) and run options."""

    session: Any
    io: Any
    buffers: dict
    options: Any
