"""The I/O of every exported component, declared once.

Export (names, dynamic axes, sample inputs), verification, engine profiles, runtime buffer allocation and the
bundle manifest all read these specs; tensor-name literals live here and nowhere else. Shapes are tuples of
ints and symbols: "batch" is the dynamic axis, the other symbols come from the model dimensions below.
Pure Python/numpy, so the runtime can use it without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

BATCH = "batch"


@dataclass(frozen=True)
class Dims:
    """The model dimensions that shapes refer to."""

    image_size: int        # H = W
    latent_size: int       # h = w
    num_tokens: int        # N = h * w
    num_groups: int        # M
    group_classes: int     # C = 2**(K/M), also the mask value

    def resolve(self, shape: tuple, batch: int) -> tuple[int, ...]:
        values = {BATCH: batch, "H": self.image_size, "h": self.latent_size, "N": self.num_tokens,
                  "M": self.num_groups, "C": self.group_classes}
        return tuple(values[s] if isinstance(s, str) else s for s in shape)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str             # numpy dtype name
    shape: tuple           # ints and symbols

    @property
    def dynamic_axes(self) -> list[int]:
        return [i for i, s in enumerate(self.shape) if s == BATCH]

    def to_dict(self, dims: Dims) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": [s if s == BATCH else d for s, d in
                                                                  zip(self.shape, dims.resolve(self.shape, 1))]}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    needs_generator: bool

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def allocate(self, dims: Dims, batch: int, which: str = "outputs") -> dict[str, np.ndarray]:
        """Zeroed host arrays of this component's inputs or outputs for a batch size."""
        return {t.name: np.zeros(dims.resolve(t.shape, batch), dtype=t.dtype) for t in getattr(self, which)}


def _t(name: str, dtype: str, *shape) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


ENCODER = ComponentSpec(
    "encoder",
    inputs=(_t("images", "float32", BATCH, 3, "H", "H"),),
    outputs=(_t("indices", "int64", BATCH, "h", "h"),),
    needs_generator=False)

DECODER = ComponentSpec(
    "decoder",
    inputs=(_t("indices", "int64", BATCH, "h", "h"),),
    outputs=(_t("images", "uint8", BATCH, "H", "H", 3),),
    needs_generator=False)

STEP = ComponentSpec(
    "step",
    inputs=(_t("tokens", "int64", BATCH, "N", "M"), _t("labels", "int64", BATCH),
            _t("noise", "float32", BATCH, "N", "M", 2), _t("guidance_scale", "float32"),
            _t("softmax_temperature", "float32"), _t("confidence_noise_scale", "float32"),
            _t("num_to_mask", "int64")),
    outputs=(_t("next_tokens", "int64", BATCH, "N", "M"), _t("sampled", "int64", BATCH, "N", "M")),
    needs_generator=True)

TRANSFORMER = ComponentSpec(
    "transformer",
    inputs=(_t("tokens", "int64", BATCH, "N", "M"), _t("labels", "int64", BATCH),
            _t("drop_label_mask", "bool", BATCH)),
    outputs=(_t("logits", "float32", BATCH, "N", "M", "C"),),
    needs_generator=True)

# the last step's sampled groups -> token indices for the decoder, without leaving the device
COMBINE = ComponentSpec(
    "combine",
    inputs=(_t("groups", "int64", BATCH, "N", "M"),),
    outputs=(_t("indices", "int64", BATCH, "h", "h"),),
    needs_generator=True)

COMPONENTS: Mapping[str, ComponentSpec] = {c.name: c for c in (ENCODER, DECODER, STEP, TRANSFORMER, COMBINE)}

# scalar step inputs in the order of `maskbit_runtime.schedules.StepParams`
STEP_SCALARS = ("guidance_scale", "softmax_temperature", "confidence_noise_scale", "num_to_mask")
