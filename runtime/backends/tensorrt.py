"""TensorRT primitives: one engine and execution context per component, cuda-python device buffers.

The shared executor (`base.Executor`) drives these: its two step bindings differ only in which token buffer is
`tokens` and which is `next_tokens`, and running a binding points the context's tensor addresses at its
buffers (`set_tensor_address`), so the state never leaves the device and is never copied.

Engines are tied to the TensorRT version and the GPU they were built on; before any engine is deserialized the
manifest's record of both is compared with this machine's. TensorRT and cuda-python are imported only when the
backend is opened: pip install 'maskbit[tensorrt]' and 'maskbit[gpu]'.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..manifest import Manifest
from ..specs import COMPONENTS, DEFAULT_COMPONENTS, ComponentSpec
from .base import BackendError
from .cuda import Device, Stream, gpu_info

REBUILD = "rebuild with maskbit-export build-engines --backend tensorrt"
# components the runtime executes; the raw transformer's engine serves verification and benchmarks only
RUNTIME_COMPONENTS = DEFAULT_COMPONENTS


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
        self.owner = None

    def bind(self, buffers: dict[str, Device], owner=None) -> None:
        """Set the input shapes and every tensor address; check the output shapes TensorRT infers."""
        for t in self.spec.inputs:
            if t.dynamic_axes and not self.context.set_input_shape(t.name, buffers[t.name].shape):
                raise BackendError(f"{self.spec.name}: input shape {buffers[t.name].shape} of {t.name} is outside "
                                   f"the engine's optimization profile")
        for name, buffer in buffers.items():
            self.point(name, buffer)
        for t in self.spec.outputs:
            shape = tuple(self.context.get_tensor_shape(t.name))
            if shape != buffers[t.name].shape:
                raise BackendError(f"{self.spec.name}: TensorRT infers {t.name} of shape {shape}, the buffer is "
                                   f"{buffers[t.name].shape}")
        self.owner = owner

    def point(self, name: str, buffer: Device) -> None:
        if not self.context.set_tensor_address(name, buffer.ptr):
            raise BackendError(f"{self.spec.name}: TensorRT refused the address of {name}")

    def run(self, stream: Stream) -> None:
        if not self.context.execute_async_v3(stream.handle):
            raise BackendError(f"TensorRT failed to enqueue {self.spec.name}")

    def close(self) -> None:
        self.context = None      # the context must go before its engine
        self.engine = None


class TensorRTPrimitives:
    name = "tensorrt"

    def __init__(self, manifest: Manifest, device: int = 0):
        self.trt = import_tensorrt()
        self.gpu = gpu_info(device)              # imports cuda-python; fails clearly without a GPU
        check_engines(manifest, self.trt.__version__, self.gpu)
        self.manifest = manifest
        self.device = device
        self.stream = Stream(device)
        self.logger = collecting_logger(self.trt)
        self.runtime = self.trt.Runtime(self.logger)
        self._engines: dict[str, Engine] = {}
        self._buffers: list[Device] = []

    def engine(self, component: str) -> Engine:
        if component not in self._engines:
            self._engines[component] = Engine(self.trt, self.runtime, self.manifest, COMPONENTS[component],
                                              self.logger)
        return self._engines[component]

    def allocate(self, shape: tuple[int, ...], dtype: str) -> Device:
        buffer = Device(shape, dtype, self.stream)
        self._buffers.append(buffer)
        return buffer

    def upload(self, buffer: Device, array: np.ndarray) -> None:
        buffer.upload(array)

    def download(self, buffer: Device) -> np.ndarray:
        return buffer.download()

    def bind(self, component: str, buffers: Mapping[str, Device]) -> Binding:
        return Binding(self.engine(component), dict(buffers))

    def run(self, binding: Binding) -> None:
        if binding.engine.owner is not binding:          # another binding used this context since
            binding.engine.bind(binding.buffers, owner=binding)
        binding.engine.run(self.stream)

    def describe(self) -> dict:
        return {"backend": self.name, "tensorrt": self.trt.__version__, "device": self.device,
                "gpu": self.gpu["name"], "compute_capability": self.gpu["compute_capability"],
                "engines": {k: v.engine for k, v in self.manifest.components.items() if v.engine}}

    def close(self) -> None:
        if getattr(self, "stream", None) is None:
            return
        self.stream.synchronize()
        for buffer in self._buffers:
            buffer.free()
        for engine in self._engines.values():
            engine.close()
        self._buffers.clear()
        self._engines.clear()
        self.stream.close()
        self.stream = None


class Binding:
    """A component's tensors bound to buffers; `TensorRTPrimitives.run` points the context at them when needed."""

    def __init__(self, engine: Engine, buffers: dict[str, Device]):
        self.engine = engine
        self.buffers = buffers


def _numpy_dtype(trt, dtype) -> np.dtype | str:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        return str(dtype)


def _last(logger) -> str:
    return logger.errors[-1] if logger.errors else "no error message from TensorRT"
