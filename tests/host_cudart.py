"""Stand-ins for cudart and TensorRT whose "device" is host memory, for the CPU tier of the GPU backends.

`HostCudart` replaces cuda-python's runtime module (`maskbit_runtime.backends.cuda._CUDART`): device and
page-locked buffers are ctypes blocks, copies are memmoves, and work queued on a stream runs at once, except while
the stream is being captured: captured work runs when its graph is launched. `FakeTensorRT` replaces the
`tensorrt` module: its engines run the bundle's ONNX files with ONNX Runtime on the memory at the context's tensor
addresses. Like a real kernel, a queued run uses the addresses and shapes set when it was queued (or captured),
not those set later, so a graph replayed after its inputs moved reads the old addresses, as on a GPU.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import types
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
from maskbit_runtime.specs import COMPONENTS, Dims

GPU = {"name": "NVIDIA H200", "compute_capability": "9.0"}
TENSORRT_VERSION = "10.3.0"


class HostCudart:
    """cudart stand-in whose "device" memory is host memory, with counters for the tests."""

    class cudaError_t(enum.Enum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2
        cudaErrorNotReady = 600
        cudaErrorStreamCaptureUnsupported = 900
        cudaErrorStreamCaptureInvalidated = 901

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                           cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1)
    cudaEventDisableTiming = 2
    OK = (cudaError_t.cudaSuccess,)

    def __init__(self):
        self.blocks, self.freed = {}, []
        self.pinned, self.freed_pinned = {}, []
        self.copies = Counter()          # cudaMemcpyKind value -> copies queued
        self.syncs = 0                   # cudaStreamSynchronize calls
        self.event_waits = 0             # cudaEventSynchronize calls that found the event pending
        self.captures = self.launches = self.destroyed = 0
        self.capturing: dict[int, list] = {}
        self.pending_events: set[int] = set()
        self.events_stay_pending = False     # make recorded events "not ready" until waited for
        self.refuse_capture = False          # cudaStreamBeginCapture fails
        self._ids = itertools.count(7)

    # -- streams and work -----------------------------------------------------------------------------------
    def cudaSetDevice(self, device):
        return self.OK

    def cudaStreamCreate(self):
        return self.cudaError_t.cudaSuccess, next(self._ids)

    def cudaStreamDestroy(self, stream):
        return self.OK

    def cudaStreamSynchronize(self, stream):
        self.syncs += 1
        self.pending_events.clear()
        return self.OK

    def enqueue(self, stream, work) -> None:
        """Queue `work` on `stream`: run it now, or record it while the stream is captured."""
        if stream in self.capturing:
            self.capturing[stream].append(work)
        else:
            work()

    # -- memory ---------------------------------------------------------------------------------------------
    def cudaMalloc(self, nbytes):
        block = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(block)] = block
        return self.cudaError_t.cudaSuccess, ctypes.addressof(block)

    def cudaFree(self, ptr):
        self.freed.append(ptr)
        return self.OK

    def cudaMallocHost(self, nbytes):
        block = ctypes.create_string_buffer(nbytes)
        self.pinned[ctypes.addressof(block)] = block
        return self.cudaError_t.cudaSuccess, ctypes.addressof(block)

    def cudaFreeHost(self, ptr):
        self.freed_pinned.append(ptr)
        return self.OK

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self.copies[kind] += 1
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, nbytes))
        return self.OK

    # -- events ---------------------------------------------------------------------------------------------
    def cudaEventCreateWithFlags(self, flags):
        return self.cudaError_t.cudaSuccess, next(self._ids)

    def cudaEventRecord(self, event, stream):
        if self.events_stay_pending:
            self.pending_events.add(event)
        return self.OK

    def cudaEventQuery(self, event):
        return (self.cudaError_t.cudaErrorNotReady,) if event in self.pending_events else self.OK

    def cudaEventSynchronize(self, event):
        self.event_waits += event in self.pending_events
        self.pending_events.discard(event)
        return self.OK

    def cudaEventDestroy(self, event):
        return self.OK

    # -- graphs ---------------------------------------------------------------------------------------------
    def cudaStreamBeginCapture(self, stream, mode):
        if self.refuse_capture:
            return (self.cudaError_t.cudaErrorStreamCaptureUnsupported,)
        self.capturing[stream] = []
        return self.OK

    def cudaStreamEndCapture(self, stream):
        return self.cudaError_t.cudaSuccess, tuple(self.capturing.pop(stream))

    def cudaGraphInstantiate(self, graph, flags):
        self.captures += 1
        return self.cudaError_t.cudaSuccess, graph

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for work in graph_exec:
            self.enqueue(stream, work)
        return self.OK

    def cudaGraphExecDestroy(self, graph_exec):
        self.destroyed += 1
        return self.OK

    def cudaGraphDestroy(self, graph):
        return self.OK

    # -- errors ---------------------------------------------------------------------------------------------
    def cudaGetErrorName(self, err):
        return self.cudaError_t.cudaSuccess, err.name.encode()

    def cudaGetErrorString(self, err):
        return self.cudaError_t.cudaSuccess, b"stand-in error"


def read(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A copy of the host-"device" memory at `ptr`."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()


def write(ptr: int, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    ctypes.memmove(ptr, array.ctypes.data, array.nbytes)


class FakeTensorRT:
    """A `tensorrt` module stand-in: engines whose execution contexts run the component's ONNX file with ONNX
    Runtime on the stand-in's memory. An engine file holds just its component's name."""

    __version__ = TENSORRT_VERSION

    class ILogger:
        class Severity(enum.Enum):
            INTERNAL_ERROR = 0
            ERROR = 1
            WARNING = 2
            INFO = 3

        def __init__(self):
            pass

    def __init__(self, cudart: HostCudart, bundle: Path, dims: Dims):
        self.cudart, self.bundle, self.dims = cudart, Path(bundle), dims
        self.runs = 0                        # executions that really ran (not counting captured ones)
        self.fail_enqueue_in_capture = False

    @staticmethod
    def nptype(dtype):
        return dtype

    def Runtime(self, logger):
        return types.SimpleNamespace(deserialize_cuda_engine=lambda data: FakeEngine(self, data.decode()))


class FakeEngine:
    def __init__(self, trt: FakeTensorRT, component: str):
        self.trt = trt
        self.spec = COMPONENTS[component]
        self.tensors = self.spec.inputs + self.spec.outputs
        self.num_io_tensors = len(self.tensors)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(trt.bundle / self.spec.file), options,
                                            providers=["CPUExecutionProvider"])

    def get_tensor_name(self, i):
        return self.tensors[i].name

    def get_tensor_dtype(self, name):
        return np.dtype(next(t.dtype for t in self.tensors if t.name == name)).type

    def is_shape_inference_io(self, name):
        return False

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.trt = engine, engine.trt
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def _shape(self, tensor, shapes) -> tuple[int, ...]:
        batch = next((s[0] for n, s in shapes.items()), 1)
        return shapes.get(tensor.name, self.trt.dims.resolve(tensor.shape, batch))

    def get_tensor_shape(self, name):
        return self._shape(next(t for t in self.engine.tensors if t.name == name), self.shapes)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        if self.trt.fail_enqueue_in_capture and stream in self.trt.cudart.capturing:
            return False
        addresses, shapes = dict(self.addresses), dict(self.shapes)      # what a real kernel launch captures
        self.trt.cudart.enqueue(stream, lambda: self._execute(addresses, shapes))
        return True

    def _execute(self, addresses, shapes) -> None:
        spec = self.engine.spec
        feeds = {t.name: read(addresses[t.name], self._shape(t, shapes), t.dtype) for t in spec.inputs}
        outputs = self.engine.session.run([t.name for t in spec.outputs], feeds)
        for t, value in zip(spec.outputs, outputs):
            write(addresses[t.name], value.astype(t.dtype))
        self.trt.runs += 1

