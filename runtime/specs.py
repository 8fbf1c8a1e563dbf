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
    """A component's tensors and its roles; every subset of components (`components_where`) derives from these."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    needs_generator: bool
    run_by_runtime: bool = True          # generation/encode/decode run it (else it serves verification and studies)
    graphed: bool = False                # replayed as CUDA graphs where a backend can
    generator_precision: bool = False    # carries the bundle's reduced precision (fp16/bf16/int8 weights)

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


# Tensor names: code outside this module refers to tensors through these constants, never through literals.
IMAGES = "images"                  # encoder input float32 [B,3,H,W] / decoder output uint8 [B,H,W,3]
INDICES = "indices"                # full token indices [B,h,w]
TOKENS = "tokens"                  # the step's state in: groups [B,N,M], C = masked
NEXT_TOKENS = "next_tokens"        # the step's state out (becomes the next step's `tokens`)
SAMPLED = "sampled"                # every group filled in; the last step's is the result
LABELS = "labels"
NOISE = "noise"
GROUPS = "groups"
LOGITS = "logits"
DROP_LABEL_MASK = "drop_label_mask"
GUIDANCE_SCALE = "guidance_scale"
SOFTMAX_TEMPERATURE = "softmax_temperature"
CONFIDENCE_NOISE_SCALE = "confidence_noise_scale"
NUM_TO_MASK = "num_to_mask"

# the step's settings, one value per row (bundle format 3), named like the fields of `schedules.StepParams`
STEP_SETTINGS = (GUIDANCE_SCALE, SOFTMAX_TEMPERATURE, CONFIDENCE_NOISE_SCALE, NUM_TO_MASK)


def _t(name: str, dtype: str, *shape) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


ENCODER = ComponentSpec(
    "encoder",
    inputs=(_t(IMAGES, "float32", BATCH, 3, "H", "H"),),
    outputs=(_t(INDICES, "int64", BATCH, "h", "h"),),
    needs_generator=False)

DECODER = ComponentSpec(
    "decoder",
    inputs=(_t(INDICES, "int64", BATCH, "h", "h"),),
    outputs=(_t(IMAGES, "uint8", BATCH, "H", "H", 3),),
    needs_generator=False)

def _step_inputs(setting_shape: tuple) -> tuple[TensorSpec, ...]:
    return (_t(TOKENS, "int64", BATCH, "N", "M"), _t(LABELS, "int64", BATCH),
            _t(NOISE, "float32", BATCH, "N", "M", 2), _t(GUIDANCE_SCALE, "float32", *setting_shape),
            _t(SOFTMAX_TEMPERATURE, "float32", *setting_shape), _t(CONFIDENCE_NOISE_SCALE, "float32", *setting_shape),
            _t(NUM_TO_MASK, "int64", *setting_shape))


_STEP_OUTPUTS = (_t(NEXT_TOKENS, "int64", BATCH, "N", "M"), _t(SAMPLED, "int64", BATCH, "N", "M"))
_STEP_ROLES = dict(needs_generator=True, graphed=True, generator_precision=True)

STEP = ComponentSpec("step", inputs=_step_inputs((BATCH,)), outputs=_STEP_OUTPUTS, **_STEP_ROLES)

# the same step without classifier-free guidance (the conditional half only): used when the guidance scale
# is 0, so such generations do not pay for the unconditional forward; `guidance_scale` is accepted and ignored
STEP_UNGUIDED = ComponentSpec("step_unguided", inputs=_step_inputs((BATCH,)), outputs=_STEP_OUTPUTS, **_STEP_ROLES)

TRANSFORMER = ComponentSpec(
    "transformer",
    inputs=(_t(TOKENS, "int64", BATCH, "N", "M"), _t(LABELS, "int64", BATCH),
            _t(DROP_LABEL_MASK, "bool", BATCH)),
    outputs=(_t(LOGITS, "float32", BATCH, "N", "M", "C"),),
    needs_generator=True, run_by_runtime=False, generator_precision=True)

# the last step's sampled groups -> token indices for the decoder, without leaving the device
COMBINE = ComponentSpec(
    "combine",
    inputs=(_t(GROUPS, "int64", BATCH, "N", "M"),),
    outputs=(_t(INDICES, "int64", BATCH, "h", "h"),),
    needs_generator=True)

COMPONENTS: Mapping[str, ComponentSpec] = {c.name: c for c in (ENCODER, DECODER, STEP, STEP_UNGUIDED, TRANSFORMER,
                                                                COMBINE)}

# bundle formats 1 and 2 took the four step settings as scalars, one value for the whole batch; such bundles
# still generate (the scheduler then runs only rows that share their step and settings together)
PER_ROW_SETTINGS_FORMAT = 3
_LEGACY = {c.name: ComponentSpec(c.name, _step_inputs(()), c.outputs, **_STEP_ROLES) for c in (STEP, STEP_UNGUIDED)}


def components_for(format_version: int) -> Mapping[str, ComponentSpec]:
    """The component specs of a bundle of this format version."""
    return COMPONENTS if format_version >= PER_ROW_SETTINGS_FORMAT else {**COMPONENTS, **_LEGACY}


def per_row_settings(spec: ComponentSpec) -> bool:
    """True when the step takes one value of each setting per row (format 3), False for a scalar (formats 1-2)."""
    return spec.input(GUIDANCE_SCALE).shape == (BATCH,)


def components_where(**roles: bool) -> tuple[str, ...]:
    """The names of the components whose roles have these values, e.g. components_where(graphed=True)."""
    return tuple(c.name for c in COMPONENTS.values() if all(getattr(c, k) == v for k, v in roles.items()))


# written into every bundle (generator components only with a generator); the rest only on request
DEFAULT_COMPONENTS = components_where(run_by_runtime=True)
OPTIONAL_COMPONENTS = components_where(run_by_runtime=False)   # the raw transformer: repeats the step's weights
GRAPHED_COMPONENTS = components_where(graphed=True)
GENERATOR_PRECISION_COMPONENTS = components_where(generator_precision=True)
