"""Verification tolerances of exported components against eager PyTorch, in one place.

Float outputs compare with atol/rtol; integer outputs that come from thresholding floats (encoder signs,
sampled groups) may flip where a float lands within rounding error of the threshold, so they allow a small
mismatching fraction; uint8 images allow one level where x255 rounds the other way. Whole seeded generations
must give exactly the eager tokens.
"""

from __future__ import annotations

TOLERANCES: dict[str, dict[str, dict[str, float]]] = {
    "fp32": {
        "encoder": {"max_mismatch_fraction": 1e-3},
        "decoder": {"max_abs": 1, "max_mismatch_fraction": 0.02},
        "transformer": {"atol": 1e-4, "rtol": 1e-3},
        "step": {"max_mismatch_fraction": 1e-3},
        "combine": {"max_mismatch_fraction": 0.0},
        "generation": {"max_mismatch_fraction": 0.0},
    },
}


def tolerance(precision: str, component: str) -> dict[str, float]:
    try:
        return TOLERANCES[precision][component]
    except KeyError:
        raise KeyError(f"no verification tolerance for {component!r} at precision {precision!r}") from None
