"""Host-side schedules of MaskBit sampling: pure functions of the step index, numpy only.

Each rule exists once, here; the eager sampler (`maskbit.sampling`) and the runtime both call it.
Formulas follow the official `modeling/modules/sampling.py` (see MASKBIT_SPEC section 5):

* the mask ratio uses progress p = (i + 1) / T and is evaluated in float32, like the official tensor code;
* guidance annealing uses i / T (so step 0 has scale 0 and the last step never reaches the full scale);
* the confidence (Gumbel) noise is annealed linearly to zero with (1 - p);
* a guidance interval (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
  Distribution Quality in Diffusion Models", arXiv 2404.07724) guides only the steps with start <= i / T < stop
  (the annealing's i / T); the others have guidance 0 and run the unguided step, one transformer pass instead of two;
* a fixed unmasking order (`unmask_order`) replaces the annealed confidence noise by a scale that lets the
  order's crafted noise dominate the ranking (see `unmask_order.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .unmask_order import UNMASK_ORDERS, order_noise_scale  # noqa: F401 (UNMASK_ORDERS: the choices, here too)

MASK_SCHEDULES = ("linear", "square", "root", "cosine", "arccos")
GUIDANCE_ANNEALING = ("none", "linear", "cosine")


def mask_ratio(progress: float, schedule: str = "arccos") -> float:
    """Fraction of groups that stay masked at `progress` in (0, 1], clamped to [1e-6, 1] (float32 math)."""
    r = np.float32(progress)
    if schedule == "linear":
        ratio = np.float32(1.0) - r
    elif schedule == "square":
        ratio = np.float32(1.0) - r * r
    elif schedule == "root":
        ratio = np.float32(1.0) - np.sqrt(r)
    elif schedule == "cosine":
        ratio = np.cos(r * np.float32(math.pi / 2))
    elif schedule == "arccos":
        ratio = np.arccos(r) / np.float32(math.pi / 2)
    else:
        raise InputError(f"unknown mask schedule {schedule!r}; expected one of {', '.join(MASK_SCHEDULES)}")
    return float(np.clip(np.float32(ratio), np.float32(1e-6), np.float32(1.0)))


def num_to_mask_schedule(num_steps: int, num_groups: int, schedule: str = "arccos") -> list[int]:
    """How many groups stay masked after each step, for a sequence of `num_groups` maskable groups.

    Reproduces the official k = clamp(floor(ratio * L), 1, masked_before - 1), with the re-masking made exact
    (exactly k groups, not "all ties at the threshold"), so the number masked before a step is the previous k.
    """
    if num_steps < 1:
        raise InputError(f"num_steps must be >= 1, got {num_steps}")
    counts = []
    masked = num_groups
    for i in range(num_steps):
        ratio = np.float32(mask_ratio((i + 1) / num_steps, schedule))
        k = int(np.floor(ratio * np.float32(num_groups)))
        k = max(min(max(k, 1), masked - 1), 0)   # torch.clamp(min=1, max=masked-1) returns max if max < min
        counts.append(k)
        masked = k
    return counts


def guided_steps(num_steps: int, guidance_scale: float, start: float = 0.0, stop: float = 1.0) -> list[bool]:
    """Which steps apply classifier-free guidance (two transformer passes): a nonzero scale and i / T in
    [start, stop), the guidance interval of arXiv 2404.07724 measured in the annealing's i / T."""
    return [guidance_scale != 0.0 and start <= i / num_steps < stop for i in range(num_steps)]


def guidance_scale_schedule(guidance_scale: float, num_steps: int, annealing: str = "cosine",
                            scale_pow: float = 1.0) -> list[float]:
    """The effective classifier-free guidance scale of each step (official: uses i / T, not (i + 1) / T)."""
    scales = []
    for i in range(num_steps):
        t = i / num_steps
        if annealing == "none":
            factor = 1.0
        elif annealing == "linear":
            factor = t
        elif annealing == "cosine":
            factor = (1.0 - math.cos(math.pi * t ** scale_pow)) / 2.0
        else:
            raise InputError(f"unknown guidance annealing {annealing!r}; "
                             f"expected one of {', '.join(GUIDANCE_ANNEALING)}")
        scales.append(float(np.float32(guidance_scale * factor)))
    return scales


@dataclass(frozen=True)
class StepParams:
    """The host-side scalars of one step, in the order of the exported step's scalar inputs, and which step graph
    runs it (`guided`: the guided step, two transformer passes; else the unguided one, scale 0)."""

    guidance_scale: float
    softmax_temperature: float
    confidence_noise_scale: float
    num_to_mask: int
    guided: bool = True


def plan_steps(num_steps: int, num_groups: int, *, guidance_scale: float, guidance_annealing: str = "cosine",
               scale_pow: float = 1.0, softmax_temperature: float = 1.0, randomize_temperature: float = 0.0,
               mask_schedule: str = "arccos", use_sampling_annealing: bool = False, guidance_start: float = 0.0,
               guidance_stop: float = 1.0, unmask_order: str = "confidence") -> list[StepParams]:
    """Every step's scalar inputs for a generation of `num_steps` over `num_groups` groups per image."""
    counts = num_to_mask_schedule(num_steps, num_groups, mask_schedule)
    scales = guidance_scale_schedule(guidance_scale, num_steps, guidance_annealing, scale_pow)
    guided = guided_steps(num_steps, guidance_scale, guidance_start, guidance_stop)
    fixed_order = order_noise_scale(unmask_order, num_groups)
    plan = []
    for i in range(num_steps):
        progress = (i + 1) / num_steps
        temperature = 0.5 + 0.8 * (1.0 - progress) if use_sampling_annealing else softmax_temperature
        noise_scale = randomize_temperature * (1.0 - progress) if fixed_order is None else fixed_order
        plan.append(StepParams(
            guidance_scale=scales[i] if guided[i] else 0.0,
            softmax_temperature=float(np.float32(temperature)),
            confidence_noise_scale=float(np.float32(noise_scale)),
            num_to_mask=counts[i],
            guided=guided[i],
        ))
    return plan
