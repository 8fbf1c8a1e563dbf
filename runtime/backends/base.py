"""What every backend shares: the stepper, combine-then-decode and one-shot encode/decode, written once.

A backend implements only small primitives over its own buffers (`Primitives`: allocate, view, staging, upload,
bind, run, download, close); `Executor` composes them into generation, so ONNX Runtime, TensorRT and AOTInductor
run one algorithm. Buffers and bindings are made once per batch size and reused. The step's two token buffers
ping-pong: each step binding reads `tokens` from one buffer and writes `next_tokens` into the other, so the next
step's input is the previous output without a copy.

A generation's per-step inputs (every step's noise and four scalars) are known before its first step, so they are
staged (`StagedInputs`): stacked one row per step in host arrays (page-locked memory on CUDA), uploaded in one
copy per input into device buffers kept per (batch, steps), and step i's binding reads row i (`Primitives.view`,
a device address inside the stack: no copy). A generation then costs a fixed number of host<->device copies,
whatever its number of steps; each backend counts them (`Transfers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import MaskbitError
from ..manifest import Manifest
from ..schedules import StepParams
from ..specs import (BATCH, COMBINE, COMPONENTS, DECODER, ENCODER, GROUPS, IMAGES, INDICES, LABELS, NEXT_TOKENS,
                     NOISE, SAMPLED, STEP, STEP_SCALARS, STEP_UNGUIDED, TOKENS, ComponentSpec, Dims)

ROW_ALIGN = 256      # bytes; TensorRT wants every tensor address 256-byte aligned, so stacked rows start aligned
STAGED = (NOISE, *STEP_SCALARS)       # the step inputs that change every step


class BackendError(MaskbitError, RuntimeError):
    """A backend that cannot run this bundle here (missing library, wrong GPU, engine mismatch)."""


@dataclass
class Transfers:
    """Data movement between host and device, counted by a backend's primitives (`Primitives.transfers`)."""

    host_to_device: int = 0       # copies from host memory into device buffers
    device_to_host: int = 0       # copies from device buffers into host memory
    device_to_device: int = 0     # copies between device buffers (a step's rows moved under a CUDA graph)
    host_syncs: int = 0           # times the host waited for work queued on the device

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
    """The device-specific part of a backend. Buffers and bindings are opaque handles to the executor."""

    name: str
    transfers: Transfers

    def allocate(self, shape: tuple[int, ...], dtype: str) -> Any:
        """An uninitialised device buffer."""

    def view(self, buffer: Any, row: int, shape: tuple[int, ...]) -> Any:
        """Row `row` of a 2-d buffer [rows, n] read as a tensor of `shape` (its first prod(shape) elements), without
        a copy; `bind` takes it as an input wherever it takes a buffer."""

    def staging(self, buffer: Any) -> np.ndarray:
        """The reused host array that uploads into `buffer` go through, safe to write now: page-locked memory on
        CUDA (after waiting for the last copy out of it, should one still be in flight)."""

    def upload(self, buffer: Any, array: np.ndarray) -> None:
        """Host array -> device buffer of the same shape and dtype; asynchronous on CUDA when `array` is
        `staging(buffer)`."""

    def download(self, *buffers: Any) -> list[np.ndarray]:
        """Device buffers -> new host arrays (never views of the reused buffers), after one wait for the device."""

    def bind(self, component: str, buffers: Mapping[str, Any]) -> Any:
        """A prepared binding of every input and output tensor of `component` to buffers, run many times."""

    def run(self, binding: Any) -> None:
        """Execute a component on its bound buffers."""

    def describe(self) -> dict:
        """Providers/devices/versions for `maskbit-run info`."""

    def close(self) -> None:
        """Release sessions/engines and device memory."""


def row_length(shape: tuple[int, ...], dtype: str) -> int:
    """Elements per row of a stacked buffer that holds one tensor of `shape` per row, every row 256-byte aligned."""
    itemsize = np.dtype(dtype).itemsize
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    return max(-(-nbytes // ROW_ALIGN), 1) * ROW_ALIGN // itemsize


def put(primitives: Primitives, buffer: Any, array: np.ndarray) -> None:
    """Upload `array` through the buffer's staging array (page-locked on CUDA, so the copy is asynchronous)."""
    host = primitives.staging(buffer)
    host[...] = array
    primitives.upload(buffer, host)


class Stepper:
    """The step's device buffers for one batch size and step variant.

    Two ways to feed the steps: `step` uploads one step's noise and scalars into fixed buffers (the reference
    path, and what a benchmark of single steps runs); `stage` uploads a whole generation's at once and `replay`
    runs step i on its rows. Both run the same step on the same inputs, so they give the same tokens."""

    def __init__(self, executor: Executor, spec: ComponentSpec, batch: int):
        ex, dims = executor.primitives, executor.manifest.dims
        self.primitives = ex
        self.spec = spec
        self.shapes = {t.name: dims.resolve(t.shape, batch) for t in spec.inputs + spec.outputs}
        buffer = lambda t: ex.allocate(self.shapes[t.name], t.dtype)
        self.state = [buffer(spec.input(TOKENS)), buffer(spec.output(NEXT_TOKENS))]
        self.sampled = buffer(spec.output(SAMPLED))
        self.inputs = {t.name: buffer(t) for t in spec.inputs if t.name != TOKENS}
        self.bindings = [ex.bind(spec.name, {**self.wiring(p), **self.inputs}) for p in (0, 1)]
        self.masked = np.full(self.shapes[TOKENS], dims.group_classes, np.int64)
        self.scalar_dtypes = {name: spec.input(name).dtype for name in STEP_SCALARS}
        self.parity = 0
        self._staged: dict[int, StagedInputs] = {}

    def wiring(self, parity: int) -> dict[str, Any]:
        """The buffers every step of this parity binds besides its per-step inputs."""
        return {TOKENS: self.state[parity], NEXT_TOKENS: self.state[1 - parity], SAMPLED: self.sampled,
                LABELS: self.inputs[LABELS]}

    def start(self, labels: np.ndarray) -> None:
        self.parity = 0
        put(self.primitives, self.state[0], self.masked)
        put(self.primitives, self.inputs[LABELS], labels)

    def step(self, noise: np.ndarray, params: StepParams) -> None:
        self.primitives.upload(self.inputs[NOISE], noise)
        for name, dtype in self.scalar_dtypes.items():
            self.primitives.upload(self.inputs[name], np.array(getattr(params, name), dtype=dtype))
        self.primitives.run(self.bindings[self.parity])
        self.parity ^= 1

    def stage(self, noises: Sequence[np.ndarray], plan: Sequence[StepParams]) -> StagedInputs:
        """Upload every step's noise and scalars of a generation (after `start`), one copy per input."""
        if len(noises) != len(plan) or not plan:
            raise ValueError(f"staging needs one noise array per step, got {len(noises)} for {len(plan)} steps")
        if len(plan) not in self._staged:
            self._staged[len(plan)] = StagedInputs(self, len(plan))
        staged = self._staged[len(plan)]
        staged.upload(noises, plan)
        return staged

    def replay(self, staged: StagedInputs, i: int) -> None:
        """Run step i of a staged generation on its rows (step 0 reads the state `start` wrote)."""
        self.primitives.run(staged.bindings[i])
        self.parity = (i + 1) % 2

    def result(self) -> Any:
        return self.sampled


class StagedInputs:
    """Every step's noise and scalars for generations of `steps` steps: one stacked device buffer per input, a
    256-byte aligned row per step, filled by one upload; and one binding per step that reads its rows."""

    def __init__(self, stepper: Stepper, steps: int):
        ex = self.primitives = stepper.primitives
        self.shapes = {name: stepper.shapes[name] for name in STAGED}
        dtypes = {name: stepper.spec.input(name).dtype for name in STAGED}
        self.stacks = {name: ex.allocate((steps, row_length(self.shapes[name], dtypes[name])), dtypes[name])
                       for name in STAGED}
        self.bindings = [ex.bind(stepper.spec.name, {**stepper.wiring(i % 2), **{
            name: ex.view(stack, i, self.shapes[name]) for name, stack in self.stacks.items()}}) for i in range(steps)]

    def upload(self, noises: Sequence[np.ndarray], plan: Sequence[StepParams]) -> None:
        for name, stack in self.stacks.items():
            host = self.primitives.staging(stack)
            if name == NOISE:
                size = int(np.prod(self.shapes[NOISE]))
                for i, noise in enumerate(noises):
                    if np.shape(noise) != self.shapes[NOISE]:
                        raise ValueError(f"step {i}'s noise has shape {np.shape(noise)}, expected {self.shapes[NOISE]}")
                    host[i, :size] = np.asarray(noise, dtype=host.dtype).reshape(-1)
            else:
                host[:, 0] = [getattr(params, name) for params in plan]
            self.primitives.upload(stack, host)


class StagedStepper:
    """The decode loop's stepper (`loop.Stepper`) for whole generations: `step` only collects each step's noise and
    scalars on the host; `result` stages them (one upload per input) and replays every step on its rows,
    reporting each to `on_step`. The same inputs reach the same step as on the per-step path."""

    def __init__(self, stepper: Stepper, on_step: Callable[[int], None] | None = None):
        self.stepper = stepper
        self.on_step = on_step
        self.noises: list[np.ndarray] = []
        self.plan: list[StepParams] = []

    def start(self, labels: np.ndarray) -> None:
        self.stepper.start(labels)
        self.noises, self.plan = [], []

    def step(self, noise: np.ndarray, params: StepParams) -> None:
        self.noises.append(np.array(noise, dtype=np.float32))       # a copy: the caller may reuse its array
        self.plan.append(params)

    def result(self) -> Any:
        staged = self.stepper.stage(self.noises, self.plan)
        for i in range(len(self.plan)):
            self.stepper.replay(staged, i)
            if self.on_step is not None:
                self.on_step(i)
        self.noises = []
        return self.stepper.result()


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

    def staged_stepper(self, batch: int, guided: bool = True,
                       on_step: Callable[[int], None] | None = None) -> StagedStepper:
        """The decode loop's stepper that uploads each generation's per-step inputs once (see `StagedStepper`)."""
        return StagedStepper(self.stepper(batch, guided), on_step)

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

    def finish(self, sampled: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Final sampled groups (device buffer) -> (uint8 images [B,H,W,3], int64 indices [B,h,w]) on the host.
        Combine writes straight into the decoder's input buffer: nothing but the results leaves the device."""
        decoded, decode = self.buffers(DECODER, batch)
        combine = self.primitives.bind(COMBINE.name, {GROUPS: sampled, INDICES: decoded[INDICES]})
        self.primitives.run(combine)
        self.primitives.run(decode)
        images, indices = self.primitives.download(decoded[IMAGES], decoded[INDICES])
        return images, indices

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
