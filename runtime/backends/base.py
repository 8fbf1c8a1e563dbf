"""What every backend shares: the stepper, combine-then-decode and one-shot encode/decode, written once.

A backend implements only small primitives over its own buffers (`Primitives`: allocate, upload, bind, run,
download, close); `Executor` composes them into generation, so ONNX Runtime, TensorRT and AOTInductor run one
algorithm. Buffers and bindings are made once per batch size and reused. The step's two token buffers
ping-pong: two bindings are prepared, one per parity, each reading `tokens` from one buffer and writing
`next_tokens` into the other, so the next step's input is the previous output without a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from ..errors import MaskbitError
from ..manifest import Manifest
from ..schedules import StepParams
from ..specs import (BATCH, COMBINE, COMPONENTS, DECODER, ENCODER, GROUPS, IMAGES, INDICES, LABELS, NEXT_TOKENS,
                     NOISE, SAMPLED, STEP, STEP_SCALARS, STEP_UNGUIDED, TOKENS, ComponentSpec, Dims)


class BackendError(MaskbitError, RuntimeError):
    """A backend that cannot run this bundle here (missing library, wrong GPU, engine mismatch)."""


class Primitives(Protocol):
    """The device-specific part of a backend. Buffers and bindings are opaque handles to the executor."""

    name: str

    def allocate(self, shape: tuple[int, ...], dtype: str) -> Any:
        """An uninitialised device buffer."""

    def upload(self, buffer: Any, array: np.ndarray) -> None:
        """Host array -> device buffer of the same shape and dtype."""

    def download(self, buffer: Any) -> np.ndarray:
        """Device buffer -> a new host array (never a view of the reused buffer)."""

    def bind(self, component: str, buffers: Mapping[str, Any]) -> Any:
        """A prepared binding of every input and output tensor of `component` to buffers, run many times."""

    def run(self, binding: Any) -> None:
        """Execute a component on its bound buffers."""

    def describe(self) -> dict:
        """Providers/devices/versions for `maskbit-run info`."""

    def close(self) -> None:
        """Release sessions/engines and device memory."""


class Stepper:
    """The step's device buffers for one batch size and step variant, driven by the decode loop."""

    def __init__(self, executor: Executor, spec: ComponentSpec, batch: int):
        ex, dims = executor.primitives, executor.manifest.dims
        buffer = lambda t: ex.allocate(dims.resolve(t.shape, batch), t.dtype)
        self.primitives = ex
        self.state = [buffer(spec.input(TOKENS)), buffer(spec.output(NEXT_TOKENS))]
        self.sampled = buffer(spec.output(SAMPLED))
        self.inputs = {t.name: buffer(t) for t in spec.inputs if t.name != TOKENS}
        self.bindings = [ex.bind(spec.name, {TOKENS: self.state[p], NEXT_TOKENS: self.state[1 - p],
                                             SAMPLED: self.sampled, **self.inputs}) for p in (0, 1)]
        self.masked = np.full(dims.resolve(spec.input(TOKENS).shape, batch), dims.group_classes, np.int64)
        self.scalar_dtypes = {name: spec.input(name).dtype for name in STEP_SCALARS}
        self.parity = 0

    def start(self, labels: np.ndarray) -> None:
        self.parity = 0
        self.primitives.upload(self.state[0], self.masked)
        self.primitives.upload(self.inputs[LABELS], np.ascontiguousarray(labels, dtype=np.int64))

    def step(self, noise: np.ndarray, params: StepParams) -> None:
        self.primitives.upload(self.inputs[NOISE], noise)
        for name, dtype in self.scalar_dtypes.items():
            self.primitives.upload(self.inputs[name], np.array(getattr(params, name), dtype=dtype))
        self.primitives.run(self.bindings[self.parity])
        self.parity ^= 1

    def result(self) -> Any:
        return self.sampled


class Executor:
    """Generation, encoding and decoding of one bundle on one backend's primitives."""

    def __init__(self, primitives: Primitives, manifest: Manifest):
        self.primitives = primitives
        self.manifest = manifest
        self.name = primitives.name
        self._steppers: dict[tuple[str, int], Stepper] = {}
        self._io: dict[tuple[str, int], tuple[dict[str, Any], Any]] = {}

    def stepper(self, batch: int, guided: bool = True) -> Stepper:
        """The stepper for `batch` images; unguided (conditional half only) when the bundle has that variant."""
        spec = STEP if guided or STEP_UNGUIDED.name not in self.manifest.components else STEP_UNGUIDED
        key = (spec.name, batch)
        if key not in self._steppers:
            self._steppers[key] = Stepper(self, spec, batch)
        return self._steppers[key]

    def buffers(self, spec: ComponentSpec, batch: int) -> tuple[dict[str, Any], Any]:
        """Buffers of all of a component's tensors for one batch size, and their binding; made once."""
        key = (spec.name, batch)
        if key not in self._io:
            dims = self.manifest.dims
            buffers = {t.name: self.primitives.allocate(dims.resolve(t.shape, batch), t.dtype)
                       for t in spec.inputs + spec.outputs}
            self._io[key] = buffers, self.primitives.bind(spec.name, buffers)
        return self._io[key]

    def finish(self, sampled: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Final sampled groups (device buffer) -> (uint8 images [B,H,W,3], int64 indices [B,h,w]) on the host.
        Combine writes straight into the decoder's input buffer: nothing but the results leaves the device."""
        decoded, decode = self.buffers(DECODER, batch)
        combine = self.primitives.bind(COMBINE.name, {GROUPS: sampled, INDICES: decoded[INDICES]})
        self.primitives.run(combine)
        self.primitives.run(decode)
        return self.primitives.download(decoded[IMAGES]), self.primitives.download(decoded[INDICES])

    def run_once(self, spec: ComponentSpec, array: np.ndarray) -> np.ndarray:
        (source,), (target,) = spec.inputs, spec.outputs
        buffers, binding = self.buffers(spec, len(array))
        self.primitives.upload(buffers[source.name], np.ascontiguousarray(array, dtype=source.dtype))
        self.primitives.run(binding)
        return self.primitives.download(buffers[target.name])

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self.run_once(ENCODER, images)

    def decode(self, indices: np.ndarray) -> np.ndarray:
        return self.run_once(DECODER, indices)

    def describe(self) -> dict:
        return self.primitives.describe()

    def close(self) -> None:
        self._steppers.clear()
        self._io.clear()
        self.primitives.close()


def check_component_io(component: str, declared: Mapping[str, tuple[str, int]], where: str,
                       shapes: Mapping[str, tuple[int | None, ...]] | None = None, dims: Dims | None = None) -> None:
    """Compare a loaded graph's own tensors {name: (numpy dtype, rank)} with the bundle contract, and, given
    `shapes` {name: axes, None where dynamic} and the manifest's `dims`, every fixed axis with the manifest's."""
    spec = COMPONENTS[component]
    expected = {t.name: (np.dtype(t.dtype).name, len(t.shape)) for t in spec.inputs + spec.outputs}
    if declared != expected:
        raise BackendError(f"{where} has tensors {sorted(declared.items())}, but a {component} component must "
                           f"have {sorted(expected.items())}; the file does not belong to this bundle")
    for t in spec.inputs + spec.outputs if shapes is not None and dims is not None else ():
        want = tuple(None if s == BATCH else d for s, d in zip(t.shape, dims.resolve(t.shape, 0)))
        got = tuple(shapes[t.name])
        if any(g is not None and g != w for g, w in zip(got, want)) or (BATCH in t.shape and got[0] is not None):
            raise BackendError(f"{where}: tensor {t.name} has shape {_axes(got)}, but the manifest's dims give "
                               f"{_axes(want)}; the file does not belong to this bundle")


def _axes(shape: tuple[int | None, ...]) -> list:
    return [BATCH if s is None else s for s in shape]
