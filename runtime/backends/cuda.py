"""Device memory through cuda-python's runtime bindings: checked calls, a stream, and device buffers.

Every cudart call returns a tuple whose first element is the error code; `check` turns anything but
cudaSuccess into a BackendError naming the call, so no CUDA failure passes silently. cuda-python is imported
only when a GPU backend is opened (pip install 'maskbit[gpu]').
"""

from __future__ import annotations

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
        self.handle = int(self._stream)

    def synchronize(self) -> None:
        check(import_cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

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

    def free(self) -> None:
        if self.ptr:
            check(import_cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0
