"""Device memory through cuda-python's runtime bindings: checked calls, a stream, device and page-locked host
buffers, and CUDA graphs.

Every cudart call returns a tuple whose first element is the error code; `check` turns anything but
cudaSuccess into a BackendError naming the call, so no CUDA failure passes silently. cuda-python is imported
only when a GPU backend is opened (pip install 'maskbit[gpu]').
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Hashable

import numpy as np

from .base import BackendError

_CUDART = None


def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6) or the older `cuda.cudart`."""
    global _CUDART
    if _CUDART is None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart
            except ImportError:
                raise BackendError("GPU backends need cuda-python for device memory: "
                                   "pip install 'maskbit[gpu]'") from None
        _CUDART = cudart
    return _CUDART


def check(result, call: str):
    """(err, *values) from a cudart call -> the values; raises BackendError unless err is cudaSuccess."""
    cudart = import_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        _, text = cudart.cudaGetErrorString(err)
        raise BackendError(f"CUDA call {call} failed: {_text(name)} ({_text(text)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def native_handle(handle) -> int:
    """The address a cuda-python handle wraps, as an int: `cuda.bindings.utils.get_cuda_native_handle` (int() on
    handles is deprecated since cuda-bindings 13), int() on older cuda-python and on plain integers."""
    if isinstance(handle, int):
        return handle
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(handle)
    return get_cuda_native_handle(handle)


def _text(value) -> str:
    return value.decode(errors="replace").rstrip("\x00") if isinstance(value, bytes) else str(value)


def gpu_info(device: int = 0) -> dict:
    """{"name", "compute_capability"} of a CUDA device; a clear error when there is none."""
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        reason = "no CUDA device is visible" if err == cudart.cudaError_t.cudaSuccess else \
            f"CUDA is unavailable ({_text(cudart.cudaGetErrorName(err)[1])})"
        raise BackendError(f"TensorRT needs an NVIDIA GPU, but {reason}")
    if not 0 <= device < count:
        raise BackendError(f"CUDA device {device} does not exist (this machine has {count})")
    prop = check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return {"name": _text(prop.name), "compute_capability": f"{prop.major}.{prop.minor}"}


class Stream:
    """A CUDA stream on one device; `handle` is the integer TensorRT's execute_async_v3 takes."""

    def __init__(self, device: int = 0):
        cudart = import_cudart()
        check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self._stream = check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.handle = native_handle(self._stream)

    def synchronize(self) -> None:
        check(import_cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def copy_device_to_device(self, dst: int, src: int, nbytes: int) -> None:
        """Queue an asynchronous copy of `nbytes` between two device addresses on this stream."""
        cudart = import_cudart()
        check(cudart.cudaMemcpyAsync(dst, src, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream),
              "cudaMemcpyAsync(device to device)")

    def close(self) -> None:
        if self._stream is not None:
            check(import_cudart().cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None


class Device:
    """One device buffer of fixed shape and dtype; copies to and from numpy run on the owner's stream."""

    def __init__(self, shape: tuple[int, ...], dtype: str | np.dtype, stream: Stream):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.stream = stream
        self.ptr = check(import_cudart().cudaMalloc(max(self.nbytes, 1)), "cudaMalloc")

    def upload(self, array: np.ndarray) -> None:
        """Asynchronous host -> device copy. From pageable memory, cudaMemcpyAsync returns once the data is
        staged, so the caller may reuse `array` right away."""
        array = np.asarray(array, dtype=self.dtype, order="C")     # keeps 0-d scalars 0-d, unlike ascontiguousarray
        if array.shape != self.shape:
            raise ValueError(f"cannot copy an array of shape {array.shape} into a device buffer of {self.shape}")
        cudart = import_cudart()
        check(cudart.cudaMemcpyAsync(self.ptr, array.ctypes.data, self.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream._stream),
              "cudaMemcpyAsync(host to device)")

    def download(self) -> np.ndarray:
        """Device -> host copy into a new array, after everything queued on the stream has finished."""
        out = np.empty(self.shape, dtype=self.dtype)
        cudart = import_cudart()
        check(cudart.cudaMemcpyAsync(out.ctypes.data, self.ptr, self.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream._stream),
              "cudaMemcpyAsync(device to host)")
        self.stream.synchronize()
        return out

    def copy_from(self, source: Device | Slice) -> None:
        """Asynchronous device -> device copy of a tensor of the same shape and dtype, on the owner's stream."""
        if source.shape != self.shape or source.dtype != self.dtype:
            raise ValueError(f"cannot copy {source.dtype} {source.shape} into a device buffer of {self.dtype} "
                             f"{self.shape}")
        self.stream.copy_device_to_device(self.ptr, source.ptr, self.nbytes)

    def rows(self, start: int, count: int) -> Slice:
        """Rows [start, start + count) of this buffer (its first axis): an address inside it, no copy."""
        return Slice(self, start, count)

    def free(self) -> None:
        if self.ptr:
            check(import_cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class Slice:
    """Rows [start, start + count) of a device buffer (or of another slice). It owns no memory; `ptr` is the
    base's address plus the rows' offset, so binding it costs nothing."""

    def __init__(self, base: Device | Slice, start: int, count: int):
        if not base.shape or not (start >= 0 and count >= 1 and start + count <= base.shape[0]):
            raise ValueError(f"rows {start}..{start + count - 1} do not exist in a device buffer of shape {base.shape}")
        self.base = base
        self.shape = (count, *base.shape[1:])
        self.dtype = base.dtype
        row_bytes = int(np.prod(base.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.nbytes = count * row_bytes
        self.ptr = base.ptr + start * row_bytes
        self.stream = base.stream

    def rows(self, start: int, count: int) -> Slice:
        return Slice(self, start, count)


class Pinned:
    """Page-locked host memory seen as a numpy array (`array`), for truly asynchronous copies to and from device
    buffers on the owner's stream. An event marks the last copy, so the host knows when it may touch the array
    again (`wait`)."""

    def __init__(self, shape: tuple[int, ...], dtype: str | np.dtype, stream: Stream):
        cudart = import_cudart()
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = size * self.dtype.itemsize
        self.stream = stream
        self.ptr = check(cudart.cudaMallocHost(max(self.nbytes, 1)), "cudaMallocHost")
        raw = (ctypes.c_byte * max(self.nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=self.dtype, count=size).reshape(self.shape)
        self.event = check(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming), "cudaEventCreateWithFlags")

    def upload(self, device: Device) -> None:
        """Queue array -> `device` on the stream; the host must not write the array before `wait`."""
        self._copy(device.ptr, self.ptr, device, "HostToDevice")

    def download(self, device: Device) -> None:
        """Queue `device` -> array on the stream; the array holds the data after `wait` (or a stream sync)."""
        self._copy(self.ptr, device.ptr, device, "DeviceToHost")

    def _copy(self, dst: int, src: int, device: Device, kind: str) -> None:
        if device.shape != self.shape or device.dtype != self.dtype:
            raise ValueError(f"page-locked {self.dtype} {self.shape} and device buffer {device.dtype} {device.shape} "
                             f"differ")
        cudart = import_cudart()
        check(cudart.cudaMemcpyAsync(dst, src, self.nbytes, getattr(cudart.cudaMemcpyKind, f"cudaMemcpy{kind}"),
                                     self.stream._stream), f"cudaMemcpyAsync({kind})")
        check(cudart.cudaEventRecord(self.event, self.stream._stream), "cudaEventRecord")

    def wait(self) -> bool:
        """Block until the last copy from or into the array has finished; True when the host had to wait."""
        cudart = import_cudart()
        result = cudart.cudaEventQuery(self.event)
        if (result[0] if isinstance(result, tuple) else result) != cudart.cudaError_t.cudaErrorNotReady:
            check(result, "cudaEventQuery")
            return False
        check(cudart.cudaEventSynchronize(self.event), "cudaEventSynchronize")
        return True

    def free(self) -> None:
        if self.ptr:
            cudart = import_cudart()
            check(cudart.cudaEventDestroy(self.event), "cudaEventDestroy")
            check(cudart.cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0
            self.array = None


class Graph:
    """One captured and instantiated CUDA graph."""

    def __init__(self, stream: Stream, enqueue: Callable[[], None]):
        """Capture what `enqueue` queues on `stream` (nothing runs during a capture) and instantiate it."""
        cudart = import_cudart()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal    # other threads may use CUDA freely
        check(cudart.cudaStreamBeginCapture(stream._stream, mode), "cudaStreamBeginCapture")
        failure = None
        try:
            enqueue()
        except BackendError as exc:
            failure = exc
        ended = cudart.cudaStreamEndCapture(stream._stream)       # always leave capture mode, even after a failure
        graph = ended[1] if ended[0] == cudart.cudaError_t.cudaSuccess else None
        if failure is not None or graph is None:
            if graph is not None:
                check(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
            raise failure or BackendError(f"CUDA call cudaStreamEndCapture failed: {_error_name(ended[0])}")
        try:
            self.exec = check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except BackendError:
            check(cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")
            raise
        self.graph = graph
        self.stream = stream

    def launch(self) -> None:
        check(import_cudart().cudaGraphLaunch(self.exec, self.stream._stream), "cudaGraphLaunch")

    def destroy(self) -> None:
        if self.graph is not None:
            cudart = import_cudart()
            check(cudart.cudaGraphExecDestroy(self.exec), "cudaGraphExecDestroy")
            check(cudart.cudaGraphDestroy(self.graph), "cudaGraphDestroy")
            self.graph = self.exec = None


class GraphCache:
    """CUDA graphs of work queued on one stream, one per key (e.g. one per set of tensor addresses and shapes).

    The first run of a key executes plainly (TensorRT needs one plain run after a shape change before a capture)
    and then captures the same work, which does not run it again; later runs of the key launch the graph. When a
    capture fails, every later run is plain and `off` holds the one-line reason."""

    def __init__(self, stream: Stream):
        self.stream = stream
        self.graphs: dict[Hashable, Graph] = {}
        self.off: str | None = None

    def run(self, key: Hashable, enqueue: Callable[[], None]) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.launch()
            return
        enqueue()
        if self.off is None:
            try:
                self.graphs[key] = Graph(self.stream, enqueue)
            except BackendError as exc:
                self.off = f"CUDA graph capture failed, running without graphs: {exc}"
                self.clear()

    def clear(self) -> None:
        """Destroy every graph (their kernels hold addresses and shapes that are about to change)."""
        for graph in self.graphs.values():
            graph.destroy()
        self.graphs.clear()


def _error_name(err) -> str:
    return _text(import_cudart().cudaGetErrorName(err)[1])
