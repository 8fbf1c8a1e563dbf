"""TensorRT primitives: one engine and execution context per component, cuda-python device buffers.

The shared executor (`base.Executor`) drives these: its step bindings differ in which token buffer is `tokens`
and which is `next_tokens` and, for a staged generation, in which row of the stacked noise and scalars they read;
running a binding points the context's tensor addresses at its buffers (`set_tensor_address`, only those that
changed), so the state never leaves the device and is never copied. Uploads from the staging arrays (page-locked)
and downloads are asynchronous on the backend's one stream; the host waits once, after the downloads.

CUDA graphs (on by default, `cuda_graphs=False` to turn off): the step is captured once per ping-pong parity and
replayed. A graph replays the addresses it was captured with, but staged steps read a different row each step,
so each of the step's five per-step inputs is first copied device-to-device (asynchronously, on the stream) from
its row into one fixed buffer per input; the graph reads those. That keeps two graphs per batch size whatever
the number of steps (one graph per step would mean a capture and an instantiation per step), at the price of
five tiny device copies per step. A change of batch size re-captures; if a capture fails, the step runs without
graphs and `describe()` says why.

Engines are tied to the TensorRT version and the GPU they were built on; before any engine is deserialized the
manifest's record of both is compared with this machine's. TensorRT and cuda-python are imported only when the
backend is opened: pip install 'maskbit[tensorrt]' and 'maskbit[gpu]'.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..manifest import Manifest
from ..specs import COMPONENTS, DEFAULT_COMPONENTS, STEP, STEP_UNGUIDED, ComponentSpec
from .base import BackendError, Transfers
from .cuda import Device, GraphCache, Pinned, Slice, Stream, gpu_info

REBUILD = "rebuild with maskbit-export build-engines --backend tensorrt"
# components the runtime executes; the raw transformer's engine serves verification and benchmarks only
RUNTIME_COMPONENTS = DEFAULT_COMPONENTS
GRAPHED = (STEP.name, STEP_UNGUIDED.name)       # the components replayed as CUDA graphs


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise BackendError("TensorRT is not installed: pip install 'maskbit[tensorrt]' "
                           "(its libraries come from NVIDIA's package index)") from None
    return tensorrt


def collecting_logger(trt):
    """A TensorRT logger that keeps messages instead of printing them (library code never prints)."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(msg)

    return CollectingLogger()


def describe_gpu(gpu: dict) -> str:
    return f"{gpu.get('name', '?')} (compute capability {gpu.get('compute_capability', '?')})"


def check_engines(manifest: Manifest, tensorrt_version: str, gpu: dict) -> None:
    """Raise BackendError unless every component the runtime needs has an engine built for this TensorRT and GPU."""
    components = manifest.components
    missing = [name for name in RUNTIME_COMPONENTS if name in components and components[name].engine is None]
    if missing:
        raise BackendError(f"bundle {manifest.root} has no TensorRT engine for {', '.join(missing)}; build them "
                           f"with maskbit-export build-engines --backend tensorrt "
                           f"(or maskbit_export.tensorrt.build_engines)")
    for entry in components.values():
        if entry.engine is None:
            continue
        built_version, built_gpu = entry.tensorrt_version, entry.gpu or {}
        same_gpu = (built_gpu.get("name"), built_gpu.get("compute_capability")) == \
            (gpu["name"], gpu["compute_capability"])
        if built_version != tensorrt_version or not same_gpu:
            raise BackendError(f"engine {entry.engine} was built for GPU {describe_gpu(built_gpu)} (TensorRT "
                               f"{built_version}) but this is GPU {describe_gpu(gpu)} (TensorRT {tensorrt_version}); "
                               f"{REBUILD}")


class Engine:
    """A deserialized engine with one execution context; `bind` points its tensors at device buffers."""

    def __init__(self, trt, runtime, manifest: Manifest, spec: ComponentSpec, logger):
        path = manifest.file(spec.name, "engine")
        self.spec = spec
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT cannot deserialize {path.name}: {_last(logger)}; {REBUILD}")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        expected = {t.name for t in spec.inputs + spec.outputs}
        if names != expected:
            raise BackendError(f"{path.name} has tensors {sorted(names)}, expected {sorted(expected)}; {REBUILD}")
        for t in spec.inputs + spec.outputs:
            dtype = _numpy_dtype(trt, self.engine.get_tensor_dtype(t.name))
            if dtype != np.dtype(t.dtype):
                raise BackendError(f"{path.name}: tensor {t.name} is {dtype} in the engine but {t.dtype} in the "
                                   f"bundle contract; {REBUILD}")
            if t in spec.inputs and self.engine.is_shape_inference_io(t.name):
                raise BackendError(f"{path.name}: input {t.name} became a shape tensor (read on the host); "
                                   f"this runtime passes every input in device memory")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT cannot create an execution context for {path.name}: {_last(logger)}")
        self.shapes: dict[str, tuple[int, ...]] | None = None        # input shapes set on the context
        self.output_shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.graphs: GraphCache | None = None

    def bind(self, buffers: Mapping[str, Device | Slice]) -> None:
        """Point the context at `buffers`: the input shapes when they changed (then the outputs' shapes TensorRT
        infers are checked and captured graphs dropped) and every tensor address that changed."""
        shapes = {t.name: buffers[t.name].shape for t in self.spec.inputs if t.dynamic_axes}
        if shapes != self.shapes:
            self.shapes = None
            for name, shape in shapes.items():
                if not self.context.set_input_shape(name, shape):
                    raise BackendError(f"{self.spec.name}: input shape {shape} of {name} is outside the engine's "
                                       f"optimization profile")
            self.shapes = shapes
            self.output_shapes = {t.name: tuple(self.context.get_tensor_shape(t.name)) for t in self.spec.outputs}
            if self.graphs is not None:
                self.graphs.clear()
        for t in self.spec.outputs:
            if self.output_shapes[t.name] != buffers[t.name].shape:
                raise BackendError(f"{self.spec.name}: TensorRT infers {t.name} of shape {self.output_shapes[t.name]}, "
                                   f"the buffer is {buffers[t.name].shape}")
        for name, buffer in buffers.items():
            if self.addresses.get(name) != buffer.ptr:
                self.point(name, buffer)

    def point(self, name: str, buffer: Device | Slice) -> None:
        self.addresses.pop(name, None)
        if not self.context.set_tensor_address(name, buffer.ptr):
            raise BackendError(f"{self.spec.name}: TensorRT refused the address of {name}")
        self.addresses[name] = buffer.ptr

    def run(self, stream: Stream) -> None:
        if not self.context.execute_async_v3(stream.handle):
            raise BackendError(f"TensorRT failed to enqueue {self.spec.name}")

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()      # graphs go before the context whose memory they use
        self.context = None      # the context must go before its engine
        self.engine = None


class TensorRTPrimitives:
    name = "tensorrt"

    def __init__(self, manifest: Manifest, device: int = 0, cuda_graphs: bool = True):
        self.trt = import_tensorrt()
        self.gpu = gpu_info(device)              # imports cuda-python; fails clearly without a GPU
        check_engines(manifest, self.trt.__version__, self.gpu)
        self.manifest = manifest
        self.device = device
        self.cuda_graphs = bool(cuda_graphs)
        self.stream = Stream(device)
        self.logger = collecting_logger(self.trt)
        self.runtime = self.trt.Runtime(self.logger)
        self.transfers = Transfers()
        self._engines: dict[str, Engine] = {}
        self._buffers: list[Device] = []
        self._pinned: dict[int, tuple[Device, Pinned]] = {}          # staging (uploads) per device buffer
        self._readback: dict[int, tuple[Device, Pinned]] = {}        # downloads per device buffer
        self._fixed: dict[tuple, Device] = {}                         # where graphed steps read their rows

    def engine(self, component: str) -> Engine:
        if component not in self._engines:
            engine = Engine(self.trt, self.runtime, self.manifest, COMPONENTS[component], self.logger)
            if self.cuda_graphs and component in GRAPHED:
                engine.graphs = GraphCache(self.stream)
            self._engines[component] = engine
        return self._engines[component]

    def allocate(self, shape: tuple[int, ...], dtype: str) -> Device:
        buffer = Device(shape, dtype, self.stream)
        self._buffers.append(buffer)
        return buffer

    def view(self, buffer: Device, row: int, shape: tuple[int, ...]) -> Slice:
        return buffer.row(row, shape)

    def staging(self, buffer: Device) -> np.ndarray:
        pinned = self._pinned_for(self._pinned, buffer)
        if pinned.wait():                    # the last upload from it is still in flight (not in a normal loop)
            self.transfers.host_syncs += 1
        return pinned.array

    def upload(self, buffer: Device, array: np.ndarray) -> None:
        entry = self._pinned.get(id(buffer))
        if entry is not None and array is entry[1].array:
            entry[1].upload(buffer)          # asynchronous: page-locked memory
        else:
            buffer.upload(array)             # from pageable memory: staged by the driver
        self.transfers.host_to_device += 1

    def download(self, *buffers: Device) -> list[np.ndarray]:
        hosts = [self._pinned_for(self._readback, buffer) for buffer in buffers]
        for buffer, host in zip(buffers, hosts):
            host.download(buffer)
        self.stream.synchronize()
        self.transfers.device_to_host += len(buffers)
        self.transfers.host_syncs += 1
        return [host.array.copy() for host in hosts]

    def _pinned_for(self, table: dict[int, tuple[Device, Pinned]], buffer: Device) -> Pinned:
        if id(buffer) not in table:
            table[id(buffer)] = buffer, Pinned(buffer.shape, buffer.dtype, self.stream)
        return table[id(buffer)][1]

    def bind(self, component: str, buffers: Mapping[str, Device | Slice]) -> Binding:
        return Binding(self.engine(component), dict(buffers))

    def run(self, binding: Binding) -> None:
        engine = binding.engine
        if engine.graphs is None or engine.graphs.off:
            engine.bind(binding.buffers)
            engine.run(self.stream)
            return
        buffers = {name: self._fixed_copy(engine, name, buffer) for name, buffer in binding.buffers.items()}
        engine.bind(buffers)
        key = tuple(sorted((name, buffer.ptr) for name, buffer in buffers.items()))
        engine.graphs.run(key, lambda: engine.run(self.stream))

    def _fixed_copy(self, engine: Engine, name: str, buffer: Device | Slice) -> Device:
        """A row's data, copied on the device into the fixed buffer a graph reads; other buffers as they are."""
        if not isinstance(buffer, Slice):
            return buffer
        key = (engine.spec.name, name, buffer.shape)
        if key not in self._fixed:
            self._fixed[key] = self.allocate(buffer.shape, buffer.dtype)
        fixed = self._fixed[key]
        fixed.copy_from(buffer)
        self.transfers.device_to_device += 1
        return fixed

    def describe(self) -> dict:
        off = [f"{name}: {e.graphs.off}" for name, e in self._engines.items() if e.graphs is not None and e.graphs.off]
        graphs = "off (cuda_graphs=False)" if not self.cuda_graphs else f"off ({'; '.join(off)})" if off else "on"
        return {"backend": self.name, "tensorrt": self.trt.__version__, "device": self.device,
                "gpu": self.gpu["name"], "compute_capability": self.gpu["compute_capability"], "cuda_graphs": graphs,
                "engines": {k: v.engine for k, v in self.manifest.components.items() if v.engine}}

    def close(self) -> None:
        if getattr(self, "stream", None) is None:
            return
        self.stream.synchronize()
        for engine in self._engines.values():
            engine.close()
        for buffer in self._buffers:
            buffer.free()
        for _, pinned in [*self._pinned.values(), *self._readback.values()]:
            pinned.free()
        self._buffers.clear()
        self._engines.clear()
        self._pinned.clear()
        self._readback.clear()
        self._fixed.clear()
        self.stream.close()
        self.stream = None


class Binding:
    """A component's tensors bound to buffers or rows; `TensorRTPrimitives.run` points the context at them."""

    def __init__(self, engine: Engine, buffers: dict[str, Device | Slice]):
        self.engine = engine
        self.buffers = buffers


def _numpy_dtype(trt, dtype) -> np.dtype | str:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        return str(dtype)


def _last(logger) -> str:
    return logger.errors[-1] if logger.errors else "no error message from TensorRT"
