"""What every backend shares: the primitives' contract, data-movement counts, and one-shot encode/decode.

A backend implements only small primitives over its own buffers (`Primitives`: allocate, rows, staging, upload,
copy, download, bind, run, close). Everything above them, the slot scheduler that runs every generation
(`maskbit_runtime.scheduler`) and combine-then-decode (`Finisher`), is written once, so ONNX Runtime,
TensorRT and AOTInductor run one algorithm. Buffers and bindings are made once per batch size and reused; a
binding always reads and writes the same addresses, so a backend may replay it as a CUDA graph (`graphed` role
of the component's spec) without copying anything into fixed inputs first.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import MaskbitError
from ..manifest import ComponentEntry, Manifest
from ..specs import BATCH, COMBINE, DECODER, DEFAULT_COMPONENTS, ENCODER, GROUPS, IMAGES, INDICES, ComponentSpec, Dims

# On a GPU every backend replays the graphed components (specs' `graphed` role) as CUDA graphs unless opened with
# cuda_graphs=False; a capture that fails falls back to plain runs, and `describe()` says why
CUDA_GRAPHS = True


class BackendError(MaskbitError, RuntimeError):
    """A backend that cannot run this bundle here (missing library, wrong GPU, engine mismatch)."""


@dataclass
class Transfers:
    """Data movement between host and device, counted by a backend's primitives as they queue it."""

    host_to_device: int = 0       # copies from host memory into device buffers
    device_to_host: int = 0       # copies from device buffers into host memory
    device_to_device: int = 0     # copies between device buffers (admitted, moved and retired rows)
    host_syncs: int = 0           # times the host waited for work queued on the device, whoever waited

    def __sub__(self, other: Transfers) -> Transfers:
        return Transfers(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def copy(self) -> Transfers:
        return dataclasses.replace(self)

    def summary(self) -> str:
        plural = lambda n, one, many: f"{n} {one if n == 1 else many}"
        return ", ".join([plural(self.host_to_device, "host->device copy", "host->device copies"),
                          plural(self.device_to_host, "device->host copy", "device->host copies"),
                          plural(self.device_to_device, "device->device copy", "device->device copies"),
                          plural(self.host_syncs, "host sync", "host syncs")])


class Primitives(Protocol):
    """The device-specific part of a backend. Buffers, row ranges and bindings are opaque handles to callers."""

    name: str
    transfers: Transfers

    def allocate(self, shape: tuple[int, ...], dtype: str) -> Any:
        """An uninitialised device buffer."""

    def rows(self, buffer: Any, start: int, count: int) -> Any:
        """Rows [start, start + count) of a buffer (its first axis), without a copy: an address inside it that
        `bind` and `copy` take wherever they take a buffer."""

    def staging(self, buffer: Any) -> np.ndarray:
        """The reused host array that uploads into `buffer` go through, safe to write now: page-locked memory on
        CUDA (after waiting for the last copy out of it, should one still be in flight; counted as a host sync)."""

    def upload(self, buffer: Any, array: np.ndarray) -> None:
        """Host array -> device buffer of the same shape and dtype; asynchronous on CUDA when `array` is
        `staging(buffer)`."""

    def copy(self, target: Any, source: Any) -> None:
        """Device -> device copy between two buffers or row ranges of one shape and dtype, queued in order with
        the runs (asynchronous on CUDA). Row ranges of one buffer may be copied onto each other if disjoint."""

    def download(self, *buffers: Any) -> list[np.ndarray]:
        """Device buffers -> new host arrays (never views of the reused buffers), after one wait for the device."""

    def bind(self, component: str, buffers: Mapping[str, Any]) -> Any:
        """A prepared binding of every input and output tensor of `component` to buffers, run many times."""

    def run(self, binding: Any) -> None:
        """Execute a component on its bound buffers (replaying it as a CUDA graph where the backend does)."""

    def describe(self) -> dict:
        """Providers/devices/versions for `maskbit-run info`, and how this backend counts host syncs."""

    def close(self) -> None:
        """Release sessions/engines and device memory."""


def put(primitives: Primitives, buffer: Any, array: np.ndarray) -> None:
    """Upload `array` through the buffer's staging array (page-locked on CUDA, so the copy is asynchronous)."""
    host = primitives.staging(buffer)
    host[...] = array
    primitives.upload(buffer, host)


def copy_rows(primitives: Primitives, target: Any, source: Any, pairs: list[tuple[int, int]]) -> None:
    """Copy row `s` of `source` to row `t` of `target` for each (t, s), one copy per run of consecutive rows."""
    run_start = 0
    for i in range(1, len(pairs) + 1):
        if i == len(pairs) or pairs[i] != (pairs[i - 1][0] + 1, pairs[i - 1][1] + 1):
            (t, s), count = pairs[run_start], i - run_start
            primitives.copy(primitives.rows(target, t, count), primitives.rows(source, s, count))
            run_start = i


class Finisher:
    """Combine + decode of up to `batch` finished rows: sampled groups are copied in, nothing else leaves the
    device until the images and token indices are downloaded together (one wait)."""

    def __init__(self, executor: Executor, batch: int):
        ex, dims = executor.primitives, executor.manifest.dims
        self.primitives = ex
        self.groups = ex.allocate(dims.resolve(COMBINE.input(GROUPS).shape, batch), COMBINE.input(GROUPS).dtype)
        decoder = executor.manifest.spec(DECODER.name)
        self.decoded = {t.name: ex.allocate(dims.resolve(t.shape, batch), t.dtype)
                        for t in decoder.inputs + decoder.outputs}
        self.combine = ex.bind(COMBINE.name, {GROUPS: self.groups, INDICES: self.decoded[INDICES]})
        self.decode = ex.bind(DECODER.name, self.decoded)

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        self.primitives.run(self.combine)
        self.primitives.run(self.decode)
        images, indices = self.primitives.download(self.decoded[IMAGES], self.decoded[INDICES])
        return images, indices


class Executor:
    """One bundle on one backend's primitives: the buffers the scheduler steps, combine+decode, encode/decode."""

    def __init__(self, primitives: Primitives, manifest: Manifest):
        self.primitives = primitives
        self.manifest = manifest
        self.name = primitives.name
        self._io: dict[tuple[str, int], tuple[dict[str, Any], Any]] = {}
        self._finishers: dict[int, Finisher] = {}
        self.lanes: dict[tuple[str, int], Any] = {}       # the scheduler's lanes, kept with their device buffers
        self.lock = threading.RLock()                     # held by each scheduler iteration and `generate` call

    @property
    def transfers(self) -> Transfers:
        """Copies and host syncs since the backend opened (subtract two snapshots for one generation)."""
        return self.primitives.transfers

    def buffers(self, spec: ComponentSpec, batch: int) -> tuple[dict[str, Any], Any]:
        """Buffers of all of a component's tensors for one batch size, and their binding; made once."""
        key = (spec.name, batch)
        if key not in self._io:
            dims = self.manifest.dims
            buffers = {t.name: self.primitives.allocate(dims.resolve(t.shape, batch), t.dtype)
                       for t in spec.inputs + spec.outputs}
            self._io[key] = buffers, self.primitives.bind(spec.name, buffers)
        return self._io[key]

    def finisher(self, batch: int) -> Finisher:
        if batch not in self._finishers:
            self._finishers[batch] = Finisher(self, batch)
        return self._finishers[batch]

    def run_once(self, spec: ComponentSpec, array: np.ndarray) -> np.ndarray:
        (source,), (target,) = spec.inputs, spec.outputs
        buffers, binding = self.buffers(spec, len(array))
        put(self.primitives, buffers[source.name], array)
        self.primitives.run(binding)
        (result,) = self.primitives.download(buffers[target.name])
        return result

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self.run_once(ENCODER, images)

    def decode(self, indices: np.ndarray) -> np.ndarray:
        return self.run_once(DECODER, indices)

    def describe(self) -> dict:
        return self.primitives.describe()

    def close(self) -> None:
        self.lanes.clear()
        self._finishers.clear()
        self._io.clear()
        self.primitives.close()


def check_built(manifest: Manifest, kind: str, what: str, rebuild: str,
                mismatch: Callable[[ComponentEntry], str | None]) -> None:
    """Raise BackendError unless every component the runtime runs has its built file of `kind` ("engine",
    "package") and `mismatch(entry)` finds nothing wrong with each one there is (another GPU, version, device)."""
    components = manifest.components
    missing = [name for name in DEFAULT_COMPONENTS if name in components and getattr(components[name], kind) is None]
    if missing:
        raise BackendError(f"bundle {manifest.root} has no {what} for {', '.join(missing)}; build them with {rebuild}")
    for entry in components.values():
        why = mismatch(entry) if getattr(entry, kind) is not None else None
        if why:
            raise BackendError(f"{why}; rebuild with {rebuild}")


def check_component_io(spec: ComponentSpec, declared: Mapping[str, tuple[str, int]], where: str,
                       shapes: Mapping[str, tuple[int | None, ...]] | None = None, dims: Dims | None = None) -> None:
    """Compare a loaded graph's own tensors {name: (numpy dtype, rank)} with the bundle contract (`spec`, as the
    bundle's format declares it), and, given `shapes` {name: axes, None where dynamic} and the manifest's `dims`,
    every fixed axis with the manifest's."""
    expected = {t.name: (np.dtype(t.dtype).name, len(t.shape)) for t in spec.inputs + spec.outputs}
    if declared != expected:
        raise BackendError(f"{where} has tensors {sorted(declared.items())}, but a {spec.name} component must "
                           f"have {sorted(expected.items())}; the file does not belong to this bundle")
    for t in spec.inputs + spec.outputs if shapes is not None and dims is not None else ():
        want = tuple(None if s == BATCH else d for s, d in zip(t.shape, dims.resolve(t.shape, 0)))
        got = tuple(shapes[t.name])
        if any(g is not None and g != w for g, w in zip(got, want)) or (BATCH in t.shape and got[0] is not None):
            raise BackendError(f"{where}: tensor {t.name} has shape {_axes(got)}, but the manifest's dims give "
                               f"{_axes(want)}; the file does not belong to this bundle")


def _axes(shape: tuple[int | None, ...]) -> list:
    return [BATCH if s is None else s for s in shape]
