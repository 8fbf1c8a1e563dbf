"""ONNX Runtime backend: sessions on the CPU or CUDA provider, buffers bound with IOBinding.

The step's two token buffers ping-pong: each step reads `tokens` from one buffer and writes `next_tokens`
into the other, so the next step's input is the previous output without a copy. Only noise and four scalars
go to the device per step; only the final images and indices come back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..manifest import Manifest
from ..schedules import StepParams
from ..specs import COMBINE, DECODER, STEP, STEP_SCALARS
from .base import BackendError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("the ONNX Runtime backend needs onnxruntime: pip install 'maskbit[export]' "
                           "(or 'maskbit[gpu]' for CUDA)") from None
    return onnxruntime


class OrtBackend:
    name = "ort"

    def __init__(self, manifest: Manifest, providers: list[str] | None = None, threads: int | None = None):
        self.ort = import_ort()
        available = self.ort.get_available_providers()
        if providers is None:
            providers = [CUDA, CPU] if CUDA in available else [CPU]
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendError(f"ONNX Runtime here lacks {', '.join(missing)} (available: {', '.join(available)})")
        self.manifest = manifest
        self.providers = providers
        self.device = "cuda" if providers[0] == CUDA else "cpu"
        self.options = self.ort.SessionOptions()
        if threads:
            self.options.intra_op_num_threads = threads
        self._sessions: dict[str, Any] = {}
        self._steppers: dict[int, OrtStepper] = {}
        self._finishers: dict[int, tuple] = {}

    def session(self, component: str):
        if component not in self._sessions:
            path = self.manifest.file(component)
            try:
                self._sessions[component] = self.ort.InferenceSession(str(path), self.options,
                                                                      providers=self.providers)
            except Exception as exc:  # ORT raises its own exception types
                raise BackendError(f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0]}") from None
        return self._sessions[component]

    def value(self, shape: tuple[int, ...], dtype: str):
        """An uninitialised device buffer."""
        return self.ort.OrtValue.ortvalue_from_shape_and_type(shape, np.dtype(dtype), self.device, 0)

    def stepper(self, batch: int) -> OrtStepper:
        if batch not in self._steppers:
            self._steppers[batch] = OrtStepper(self, batch)
        return self._steppers[batch]

    def finish(self, sampled, batch: int) -> tuple[np.ndarray, np.ndarray]:
        if batch not in self._finishers:
            dims = self.manifest.dims
            indices = self.value(dims.resolve(COMBINE.output("indices").shape, batch), "int64")
            images = self.value(dims.resolve(DECODER.output("images").shape, batch), "uint8")
            combine = self.session("combine").io_binding()
            combine.bind_ortvalue_output("indices", indices)
            decode = self.session("decoder").io_binding()
            decode.bind_ortvalue_input("indices", indices)
            decode.bind_ortvalue_output("images", images)
            self._finishers[batch] = (combine, decode, indices, images)
        combine, decode, indices, images = self._finishers[batch]
        combine.bind_ortvalue_input("groups", sampled)
        self.session("combine").run_with_iobinding(combine)
        self.session("decoder").run_with_iobinding(decode)
        return images.numpy().copy(), indices.numpy().copy()   # numpy() may alias the reused buffers

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self.session("encoder").run(["indices"], {"images": np.ascontiguousarray(images, np.float32)})[0]

    def decode(self, indices: np.ndarray) -> np.ndarray:
        return self.session("decoder").run(["images"], {"indices": np.ascontiguousarray(indices, np.int64)})[0]

    def describe(self) -> dict:
        return {"backend": self.name, "onnxruntime": self.ort.__version__, "providers": self.providers,
                "available_providers": self.ort.get_available_providers(), "device": self.device}

    def close(self) -> None:
        self._steppers.clear()
        self._finishers.clear()
        self._sessions.clear()


class OrtStepper:
    """Device buffers of the step for one batch size, with two prepared IOBindings (ping-pong)."""

    def __init__(self, backend: OrtBackend, batch: int):
        dims = backend.manifest.dims
        self.session = backend.session("step")
        self.mask = dims.group_classes
        buffer = lambda t: backend.value(dims.resolve(t.shape, batch), t.dtype)
        self.tokens_shape = dims.resolve(STEP.input("tokens").shape, batch)
        self.tokens = [buffer(STEP.input("tokens")), buffer(STEP.output("next_tokens"))]
        self.sampled = buffer(STEP.output("sampled"))
        self.inputs = {t.name: buffer(t) for t in STEP.inputs if t.name != "tokens"}
        self.scalar_dtypes = {name: STEP.input(name).dtype for name in STEP_SCALARS}
        self.bindings = []
        for parity in (0, 1):
            binding = self.session.io_binding()
            binding.bind_ortvalue_input("tokens", self.tokens[parity])
            for name, value in self.inputs.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output("next_tokens", self.tokens[1 - parity])
            binding.bind_ortvalue_output("sampled", self.sampled)
            self.bindings.append(binding)
        self.parity = 0

    def start(self, labels: np.ndarray) -> None:
        self.tokens[0].update_inplace(np.full(self.tokens_shape, self.mask, dtype=np.int64))
        self.inputs["labels"].update_inplace(np.ascontiguousarray(labels, dtype=np.int64))
        self.parity = 0

    def step(self, noise: np.ndarray, params: StepParams) -> None:
        self.inputs["noise"].update_inplace(noise)
        for name, dtype in self.scalar_dtypes.items():
            self.inputs[name].update_inplace(np.array(getattr(params, name), dtype=dtype))
        self.session.run_with_iobinding(self.bindings[self.parity])
        self.parity ^= 1

    def result(self):
        return self.sampled
