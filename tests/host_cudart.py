"""Stand-ins for cudart and TensorRT whose "device" is host memory, for the CPU tier of the GPU backends.

`HostCudart` replaces cuda-python's runtime module (`maskbit_runtime.backends.cuda._CUDART`): device and
page-locked buffers are ctypes blocks, copies are memmoves, and work queued on a stream runs at once, except while
the stream is being captured: captured work runs when its graph is launched. `FakeTensorRT` replaces the
`tensorrt` module: its engines run the bundle's ONNX files with ONNX Runtime on the memory at the context's tensor
addresses. Like a real kernel, a queued run uses the addresses and shapes set when it was queued (or captured),
not those set later, so a graph replayed after its inputs moved reads the old addresses, as on a GPU. `HostOrt`
replaces `onnxruntime` with a "CUDA" provider over the same memory. Both run a component the same way (`run_at`:
read the inputs at their addresses, run the real ONNX file on the CPU, write the outputs at theirs), and every
wait of the host (stream and event synchronizations, the blocking copies and runs of `HostOrt`) is counted, so
tests compare a backend's own count with what the stand-ins saw.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import types
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from maskbit_runtime.backends.base import Transfers
from maskbit_runtime.scheduler import ImageJob, Scheduler
from maskbit_runtime.specs import COMPONENTS, STEP_SETTINGS, Dims

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
        self.blocking = 0                # blocking copies and synchronized runs of the onnxruntime stand-in
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

    @property
    def host_waits(self) -> int:
        """Every time the host waited for the "device": what a backend's `transfers.host_syncs` must count."""
        return self.syncs + self.event_waits + self.blocking


def read(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A copy of the host-"device" memory at `ptr`."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()


def write(ptr: int, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    ctypes.memmove(ptr, array.ctypes.data, array.nbytes)


class Tensor(NamedTuple):
    """Where a bound tensor lives in the stand-in's memory."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype


def run_at(session: ort.InferenceSession, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
    """Run a real ONNX Runtime session on the tensors at these addresses, as a kernel on the device would."""
    feeds = {name: read(*t) for name, t in inputs.items()}
    for (name, t), value in zip(outputs.items(), session.run(list(outputs), feeds)):
        assert value.shape == t.shape and value.dtype == t.dtype, (name, value.shape, value.dtype, t)
        write(t.ptr, value)


def cpu_session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
        self.session = cpu_session(trt.bundle / self.spec.file)

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
        at = lambda tensors: {t.name: Tensor(addresses[t.name], self._shape(t, shapes), np.dtype(t.dtype))
                              for t in tensors}
        run_at(self.engine.session, at(spec.inputs), at(spec.outputs))
        self.trt.runs += 1


class HostOrt:
    """onnxruntime stand-in with a "CUDA" provider whose device memory is a `HostCudart`'s host memory: sessions
    run the real ONNX file with ONNX Runtime's CPU provider on the bound addresses. A session created with
    "enable_cuda_graph" captures what a run with a given "gpu_graph_id" reads and writes (addresses and shapes) on
    its first run and replays those on later runs with that id, whatever is bound then, as ONNX Runtime does.
    Like the real CUDA provider, `update_inplace` and `numpy()` are blocking copies and a run synchronizes unless
    "disable_synchronize_execution_providers" is set; each counts in `HostCudart.blocking`."""

    __version__ = "1.99.0 (host stand-in)"
    SessionOptions = ort.SessionOptions
    GraphOptimizationLevel = ort.GraphOptimizationLevel

    def __init__(self, cudart: HostCudart, refuse_graphs: bool = False):
        self.cudart = cudart
        self.refuse_graphs = refuse_graphs        # sessions with enable_cuda_graph fail to create
        self.sessions: list[HostSession] = []
        self.OrtValue = types.SimpleNamespace(ortvalue_from_shape_and_type=self._allocate)

    def get_available_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    class RunOptions:
        def __init__(self):
            self.entries: dict[str, str] = {}

        def add_run_config_entry(self, key, value):
            self.entries[key] = value

    def InferenceSession(self, path, options, providers, provider_options):  # noqa: N802 (onnxruntime's name)
        session = HostSession(self, path, providers, provider_options)
        if self.refuse_graphs and session.cuda_options.get("enable_cuda_graph") == "1":
            raise RuntimeError("This session cannot use the CUDA Graph feature as requested by the user as all "
                               "compute graph nodes have not been partitioned to the CUDA EP.")
        self.sessions.append(session)
        return session

    def session(self, file: str) -> HostSession:
        """The last session made of the bundle file `file` (e.g. "step.onnx")."""
        return [s for s in self.sessions if Path(s.path).name == file][-1]

    def _allocate(self, shape, dtype, device, index):
        assert device == "cuda", device
        return HostOrtValue(self.cudart, tuple(shape), np.dtype(dtype))


class HostOrtValue:
    _TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "uint8": "tensor(uint8)", "bool": "tensor(bool)"}

    def __init__(self, cudart: HostCudart, shape: tuple[int, ...], dtype: np.dtype):
        self.cudart = cudart
        nbytes = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 1)
        self.tensor = Tensor(cudart.cudaMalloc(nbytes)[1], shape, dtype)

    def shape(self):
        return list(self.tensor.shape)

    def data_type(self):
        return self._TYPES[self.tensor.dtype.name]

    def data_ptr(self):
        return self.tensor.ptr

    def update_inplace(self, array):
        self.cudart.copies[HostCudart.cudaMemcpyKind.cudaMemcpyHostToDevice] += 1
        self.cudart.blocking += 1
        write(self.tensor.ptr, np.asarray(array, dtype=self.tensor.dtype).reshape(self.tensor.shape))

    def numpy(self):
        self.cudart.copies[HostCudart.cudaMemcpyKind.cudaMemcpyDeviceToHost] += 1
        self.cudart.blocking += 1
        return read(*self.tensor)


class HostSession:
    def __init__(self, host: HostOrt, path, providers, provider_options):
        self.host, self.path, self.providers = host, str(path), list(providers)
        self.cuda_options = dict(provider_options[self.providers.index("CUDAExecutionProvider")])
        self.real = cpu_session(path)
        self.graphs: dict[str, tuple] = {}        # gpu_graph_id -> (inputs, outputs) captured
        self.runs = self.replays = 0

    def get_providers(self):
        return self.providers

    def get_inputs(self):
        return self.real.get_inputs()

    def get_outputs(self):
        return self.real.get_outputs()

    def io_binding(self):
        return HostBinding()

    def run_with_iobinding(self, binding, run_options=None):
        entries = run_options.entries if run_options is not None else {}
        graph = entries.get("gpu_graph_id") if self.cuda_options.get("enable_cuda_graph") == "1" else None
        if graph is not None and graph in self.graphs:
            inputs, outputs = self.graphs[graph]            # a replay reads and writes where the capture did
            self.replays += 1
        else:
            inputs, outputs = dict(binding.inputs), dict(binding.outputs)
            if graph is not None:
                self.graphs[graph] = inputs, outputs
        run_at(self.real, inputs, outputs)
        self.runs += 1
        if entries.get("disable_synchronize_execution_providers") != "1":
            self.host.cudart.blocking += 1


class HostBinding:
    def __init__(self):
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}

    def bind_input(self, name, device, index, element_type, shape, ptr):
        self.inputs[name] = Tensor(ptr, tuple(shape), np.dtype(element_type))

    def bind_output(self, name, device, index, element_type, shape, ptr):
        self.outputs[name] = Tensor(ptr, tuple(shape), np.dtype(element_type))

    def bind_ortvalue_input(self, name, value):
        self.inputs[name] = value.tensor

    def bind_ortvalue_output(self, name, value):
        self.outputs[name] = value.tensor


def scheduled_copies(images: int, steps: int, capacity: int, new_lane: bool = False) -> Transfers:
    """The copies the slot scheduler makes to generate `images` images of `steps` (>= 2) steps each through a lane
    of `capacity` slots (a `new_lane` first uploads its masked tokens, once): the images go in rounds of up to
    `capacity`, admitted together. Per round, host->device: each step's noise and per-row settings, and the labels
    once per ping-pong parity; device->device: the admission (masked tokens into the rows) and the retirement (the
    rows' sampled groups to combine + decode), one copy each for consecutive rows; device->host: the images and the
    token indices. Host syncs depend on the backend; tests add them."""
    rounds = -(-images // capacity)
    per_step = 1 + len(STEP_SETTINGS)                     # noise and the settings
    return Transfers(host_to_device=rounds * (per_step * steps + 2) + new_lane, device_to_host=2 * rounds,
                     device_to_device=2 * rounds)


def observed(cudart: HostCudart) -> Transfers:
    """What the stand-ins saw so far, in the backends' terms (subtract two of these for one generation)."""
    kinds = HostCudart.cudaMemcpyKind
    return Transfers(cudart.copies[kinds.cudaMemcpyHostToDevice], cudart.copies[kinds.cudaMemcpyDeviceToHost],
                     cudart.copies[kinds.cudaMemcpyDeviceToDevice], cudart.host_waits)


def staggered(pipe, seed: int) -> tuple[list[ImageJob], Scheduler]:
    """One image alone for two steps, then two more join it: the lane steps 1, 1, 3, 3, 3, 2, 1 rows, rows move
    into the holes of finished ones, and every (rows, parity) gets its own binding."""
    settings = lambda steps: pipe.sampling.with_overrides(num_steps=steps)
    jobs = [ImageJob(1, seed, 0, settings(6)), ImageJob(7, seed, 1, settings(3)), ImageJob(3, seed, 2, settings(5))]
    scheduler = Scheduler(pipe.backend, capacity=3)
    scheduler.submit(jobs[:1])
    scheduler.iterate()
    scheduler.iterate()
    scheduler.submit(jobs[1:])
    while not scheduler.idle():
        scheduler.iterate()
    return jobs, scheduler


def offline(cpu, job: ImageJob) -> np.ndarray:
    return cpu.generate([job.label], num_steps=job.num_steps, seed=job.seed, first_index=job.index).tokens[0]
