"""Sampling settings, defined once: the eager sampler, the bundle manifest, the runtime and the CLIs use this type.

Field names are the official config's names, the keyword arguments of `generate` and the CLI flags
(`num_steps` <-> `--num-steps`). Every value is checked on construction, so a setting read from a manifest,
a YAML file or a command line is typed, finite and in range before any step runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .schedules import GUIDANCE_ANNEALING, MASK_SCHEDULES, StepParams, guided_steps, plan_steps
from .unmask_order import UNMASK_ORDERS, order_noise

MAX_STEPS = 4096                 # the official configs use 64-256; more only grows time, never quality
MAX_GUIDANCE = 1000.0
MIN_TEMPERATURE = 1e-3           # softmax(logits / 0) is undefined, tiny values only saturate
MAX_TEMPERATURE = 1000.0


HELP = {   # one line per field, for the command lines' options
    "num_steps": "Unmasking steps.",
    "guidance_scale": "Classifier-free guidance scale (0 = no guidance: the unconditional half is skipped).",
    "guidance_annealing": "How guidance grows over the steps.",
    "scale_pow": "Exponent of the cosine guidance annealing.",
    "softmax_temperature": "Temperature of the class distribution each group is drawn from.",
    "randomize_temperature": "Scale of the Gumbel noise on the confidence ranking (annealed to 0).",
    "mask_schedule": "How many groups stay masked after each step.",
    "use_sampling_annealing": "Anneal the softmax temperature from 1.3 to 0.5 instead of a fixed one.",
    "guidance_start": "Guidance interval start, a fraction of the steps: step i guides when start <= i/steps < stop; "
                      "the others run unguided (one transformer pass instead of two).",
    "guidance_stop": "Guidance interval end (exclusive), a fraction of the steps (1 = through the last step).",
    "unmask_order": "Which masked groups are decided first: by confidence (with annealed Gumbel noise), or in a "
                    "fixed quasi-random Halton order over the token grid (randomize_temperature then has no effect).",
}


ADDED_LATER = ("guidance_start", "guidance_stop", "unmask_order")     # the sampling plans' fields


class SamplingError(InputError):
    """A sampling setting of the wrong type or out of range."""


@dataclass(frozen=True)
class SamplingSettings:
    """Test-time sampling settings (official field names and defaults of the 256x256 generators)."""

    num_steps: int = 64
    guidance_scale: float = 7.1
    guidance_annealing: str = "cosine"
    scale_pow: float = 3.0
    softmax_temperature: float = 1.0
    randomize_temperature: float = 7.8
    mask_schedule: str = "arccos"
    use_sampling_annealing: bool = False
    guidance_start: float = 0.0      # guidance interval (arXiv 2404.07724), fractions of the steps
    guidance_stop: float = 1.0
    unmask_order: str = "confidence"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("num_steps", _integer("num_steps", self.num_steps, 1, MAX_STEPS))
        set_("guidance_scale", _real("guidance_scale", self.guidance_scale, 0.0, MAX_GUIDANCE))
        set_("scale_pow", _real("scale_pow", self.scale_pow, 1e-3, 100.0))
        set_("softmax_temperature", _real("softmax_temperature", self.softmax_temperature, MIN_TEMPERATURE,
                                          MAX_TEMPERATURE))
        set_("randomize_temperature", _real("randomize_temperature", self.randomize_temperature, 0.0, 1e4))
        set_("guidance_annealing", _choice("guidance_annealing", self.guidance_annealing, GUIDANCE_ANNEALING))
        set_("mask_schedule", _choice("mask_schedule", self.mask_schedule, MASK_SCHEDULES))
        if not isinstance(self.use_sampling_annealing, bool):
            raise SamplingError(f"use_sampling_annealing must be true or false, got {self.use_sampling_annealing!r}")
        set_("guidance_start", _real("guidance_start", self.guidance_start, 0.0, 1.0))
        set_("guidance_stop", _real("guidance_stop", self.guidance_stop, 0.0, 1.0))
        set_("unmask_order", _choice("unmask_order", self.unmask_order, UNMASK_ORDERS))
        if not any(guided_steps(self.num_steps, 1.0, self.guidance_start, self.guidance_stop)):
            raise SamplingError(f"the guidance interval [{self.guidance_start:g}, {self.guidance_stop:g}) holds none "
                                f"of the {self.num_steps} steps (step i guides when start <= i/{self.num_steps} "
                                f"< stop)")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "sampling settings") -> SamplingSettings:
        """Settings from a mapping (manifest, checkpoint metadata); unknown keys are refused, missing ones default."""
        if not isinstance(data, Mapping):
            raise SamplingError(f"{where} must be a mapping, got {type(data).__name__}")
        unknown = set(data) - set(cls.fields())
        if unknown:
            raise SamplingError(f"{where}: unknown sampling setting(s) {', '.join(sorted(map(str, unknown)))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """`to_dict` less the fields added later (`ADDED_LATER`) while they hold their defaults: ids derived from
        settings (a sample run's `run_id`) stay those of runs recorded before those fields existed."""
        defaults = SamplingSettings()
        return {k: v for k, v in self.to_dict().items() if k not in ADDED_LATER or v != getattr(defaults, k)}

    def with_overrides(self, **overrides) -> SamplingSettings:
        """A copy with the given fields replaced; None means "keep" (an unset CLI option or keyword)."""
        unknown = set(overrides) - set(self.fields())
        if unknown:
            raise SamplingError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def uses_guidance(self) -> bool:
        """False when every step's effective guidance scale is 0: the unconditional half can be skipped."""
        return self.guidance_scale != 0.0

    def guided_steps(self) -> list[bool]:
        """Per step, whether it runs the guided graph (two transformer passes) or the unguided one (one pass)."""
        return guided_steps(self.num_steps, self.guidance_scale, self.guidance_start, self.guidance_stop)

    def transformer_passes(self, has_unguided: bool = True) -> int:
        """Transformer passes per image: 2 per guided step, 1 per unguided one (2 when the bundle has no unguided
        step graph: its unguided steps run the guided graph at scale 0)."""
        guided = sum(self.guided_steps())
        return 2 * guided + (1 if has_unguided else 2) * (self.num_steps - guided)

    def plan(self, num_groups: int) -> list[StepParams]:
        """Every step's scalar inputs for images of `num_groups` maskable groups."""
        settings = self.to_dict()
        return plan_steps(settings.pop("num_steps"), num_groups, **settings)

    def order_noise(self, num_tokens: int, groups_per_token: int):
        """float32 [N, M], the noise[...,1] of every step under a fixed unmask order; None under the confidence
        order (the image's stream draws it)."""
        return order_noise(self.unmask_order, num_tokens, groups_per_token)


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise SamplingError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SamplingError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _real(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise SamplingError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SamplingError(f"{name} {value!r} is not one of {', '.join(choices)}")
    return value
