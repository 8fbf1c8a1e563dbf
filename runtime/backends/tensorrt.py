"""TensorRT primitives: one engine and execution context per component, cuda-python device buffers.

The slot scheduler (`maskbit_runtime.scheduler`) drives these: its step bindings differ in how many slot rows
they cover and in which token buffer is `tokens` and which `next_tokens`; running a binding sets the input shapes
when they changed and points the context's tensor addresses at its buffers (`set_tensor_address`, only those that
changed), so the state never leaves the device. Uploads from the staging arrays (page-locked) and downloads are
asynchronous on the backend's one stream; rows are moved with device-to-device copies on the same stream.

CUDA graphs (on by default, as on every backend: `base.CUDA_GRAPHS`; `cuda_graphs=False` to turn off): every step
binding reads and writes fixed addresses, so a step is captured once per (rows, parity) and replayed with nothing
copied first. The context holds one set of input shapes, so a change in the number of occupied rows drops the
captured graphs and the next steps capture again (a generation whose rows all start and end together captures two
graphs). If a capture fails, the step runs without graphs and `describe()` says why.

Engines are tied to the TensorRT version and the GPU they were built on; before any engine is deserialized the
manifest's record of both is compared with this machine's. TensorRT and cuda-python are imported only when the
backend is opened: pip install 'maskbit[tensorrt]' and 'maskbit[gpu]'.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..manifest import Manifest
from ..specs import ComponentSpec
from .base import CUDA_GRAPHS, BackendError, Transfers, check_built
from .cuda import Device, GraphCache, Pinned, Slice, Stream, gpu_info

BUILD = "maskbit-export build-engines --backend tensorrt"
REBUILD = f"rebuild with {BUILD}"
HOST_SYNCS = ("the host's waits per generation: the download's stream synchronization (one per download, for all "
              "its buffers), a page-locked staging array whose last upload was still in flight when it was about to "
              "be rewritten (counted only when the host really waited), and an upload from pageable memory (not "
              "the staging array: the driver may wait); runs and device-to-device copies never wait")


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
    def mismatch(entry) -> str | None:
        built = entry.gpu or {}
        if entry.tensorrt_version == tensorrt_version and \
                (built.get("name"), built.get("compute_capability")) == (gpu["name"], gpu["compute_capability"]):
            return None
        return (f"engine {entry.engine} was built for GPU {describe_gpu(built)} (TensorRT {entry.tensorrt_version}) "
                f"but this is GPU {describe_gpu(gpu)} (TensorRT {tensorrt_version})")

    check_built(manifest, "engine", "TensorRT engine", BUILD, mismatch)


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

    def __init__(self, manifest: Manifest, device: int = 0, cuda_graphs: bool = CUDA_GRAPHS):
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

    def engine(self, component: str) -> Engine:
        if component not in self._engines:
            spec = self.manifest.spec(component)
            engine = Engine(self.trt, self.runtime, self.manifest, spec, self.logger)
            if self.cuda_graphs and spec.graphed:
                engine.graphs = GraphCache(self.stream)
            self._engines[component] = engine
        return self._engines[component]

    def allocate(self, shape: tuple[int, ...], dtype: str) -> Device:
        buffer = Device(shape, dtype, self.stream)
        self._buffers.append(buffer)
        return buffer

    def rows(self, buffer: Device | Slice, start: int, count: int) -> Slice:
        return buffer.rows(start, count)

    def copy(self, target: Device | Slice, source: Device | Slice) -> None:
        if target.shape != source.shape or target.dtype != source.dtype:
            raise ValueError(f"cannot copy {source.dtype} {source.shape} into {target.dtype} {target.shape}")
        self.stream.copy_device_to_device(target.ptr, source.ptr, target.nbytes)
        self.transfers.device_to_device += 1

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
            buffer.upload(array)             # from pageable memory: staged by the driver, which may wait
            self.transfers.host_syncs += 1
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
        engine.bind(binding.buffers)
        if engine.graphs is None or engine.graphs.off:
            engine.run(self.stream)
            return
        key = tuple(sorted((name, buffer.ptr, buffer.shape) for name, buffer in binding.buffers.items()))
        engine.graphs.run(key, lambda: engine.run(self.stream))

    def describe(self) -> dict:
        off = [f"{name}: {e.graphs.off}" for name, e in self._engines.items() if e.graphs is not None and e.graphs.off]
        graphs = "off (cuda_graphs=False)" if not self.cuda_graphs else f"off ({'; '.join(off)})" if off else "on"
        return {"backend": self.name, "tensorrt": self.trt.__version__, "device": self.device,
                "gpu": self.gpu["name"], "compute_capability": self.gpu["compute_capability"], "cuda_graphs": graphs,
                "host_syncs": HOST_SYNCS, "engines": {k: v.engine for k, v in self.manifest.components.items()
                                                      if v.engine}}

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
