"""Verification tolerances of exported components against eager PyTorch, in one place.

Float outputs compare with atol/rtol; integer outputs that come from thresholding floats (encoder signs,
sampled groups) may flip where a float lands within rounding error of the threshold, so they allow a small
mismatching fraction; uint8 images allow one level where x255 rounds the other way. Whole seeded generations
must give exactly the eager tokens.

Reduced precision (`int8`, `fp16`, `bf16`) cannot match float32 sampled groups exactly: a logit error moves the
inverse-CDF draw wherever the uniform lands near a class boundary. Its quality gate is the distribution gate
(`quality.py`): the total variation between its sampling distributions and float32's along a teacher-forced
trajectory of up to AGREEMENT_STEPS steps. The component tolerances below only catch gross errors; a
free-running int8 generation diverges from float32 after its first different draw, so its token mismatch is
recorded, not gated, and so is the teacher-forced agreement of sampled groups.
"""

from __future__ import annotations

from maskbit_runtime.specs import COMBINE, DECODER, ENCODER, STEP, STEP_UNGUIDED, TRANSFORMER

GENERATION = "generation"        # a whole seeded generation's tokens

# int8, fp16 and bf16 catch gross errors only (the distribution gate decides). Measured on the demo model (|logits|
# up to 7): the fp16 graph in ONNX Runtime differs from its eager module by at most 0.012, the bf16 graph (emulated,
# cast.py) by 0.22; the eager cast modules differ from float32 by 0.012 and 0.088
_REDUCED = {
    ENCODER.name: {"max_mismatch_fraction": 1e-3},          # the tokenizer stays float32
    DECODER.name: {"max_abs": 1, "max_mismatch_fraction": 0.02},
    TRANSFORMER.name: {"atol": 0.5, "rtol": 0.1},
    STEP.name: {"max_mismatch_fraction": 0.25},
    STEP_UNGUIDED.name: {"max_mismatch_fraction": 0.25},
    COMBINE.name: {"max_mismatch_fraction": 0.0},
    GENERATION: {"max_mismatch_fraction": 1.0},
}

TOLERANCES: dict[str, dict[str, dict[str, float]]] = {
    "fp32": {
        ENCODER.name: {"max_mismatch_fraction": 1e-3},
        DECODER.name: {"max_abs": 1, "max_mismatch_fraction": 0.02},
        TRANSFORMER.name: {"atol": 1e-4, "rtol": 1e-3},
        STEP.name: {"max_mismatch_fraction": 1e-3},
        STEP_UNGUIDED.name: {"max_mismatch_fraction": 1e-3},
        COMBINE.name: {"max_mismatch_fraction": 0.0},
        GENERATION: {"max_mismatch_fraction": 0.0},
    },
    "int8": _REDUCED,
    "fp16": _REDUCED,
    "bf16": _REDUCED,
}

AGREEMENT_STEPS = 64                # longest teacher-forced trajectory of the distribution gate


def tolerance(precision: str, component: str) -> dict[str, float]:
    try:
        return TOLERANCES[precision][component]
    except KeyError:
        raise KeyError(f"no verification tolerance for {component!r} at precision {precision!r}") from None
