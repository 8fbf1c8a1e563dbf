"""The bundles one server serves side by side: `--bundle name=path` parsing, one Engine and Metrics per bundle,
what `/v1/models` says of each (its distribution-gate result from the manifest), and one `/metrics` over all.

A server started with one bundle behaves as it always did (one registry, no `model` label); with several, every
sample of every bundle's registry gets a `model="<name>"` label, so the metric names stay the same."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .pipeline import Pipeline
from .sampling import HELP
from .schedules import GUIDANCE_ANNEALING, MASK_SCHEDULES
from .unmask_order import UNMASK_ORDERS
from .serve import MAX_PREVIEWS, Engine

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
FORMATS = ["png", "grid_png", "npz", "tokens"]
CHOICES = {"guidance_annealing": list(GUIDANCE_ANNEALING), "mask_schedule": list(MASK_SCHEDULES),
           "unmask_order": list(UNMASK_ORDERS)}     # the sampling settings that take one of a few words


def parse_bundles(values: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """`--bundle` values -> {name: path}, in order. "name=path" names a bundle; a plain path is named after its
    folder. A value whose part before "=" is not a plain name (it holds a "/") is a path."""
    bundles: dict[str, Path] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and _NAME.fullmatch(name):
            if not rest:
                raise InputError(f"--bundle {value!r}: no path after '='")
            path = Path(rest)
        elif sep and "/" not in name and "\\" not in name:
            raise InputError(f"--bundle {value!r}: a name is letters, digits, '_', '.' or '-' (at most 64), "
                             "as in --bundle fp32=bundles/fp32")
        else:
            name, path = Path(value).name or "bundle", Path(value)
        if name in bundles:
            raise InputError(f"--bundle: the name {name!r} is given twice; name them: --bundle a=PATH --bundle b=PATH")
        bundles[name] = path
    return bundles


@dataclass
class Model:
    """One served bundle: its pipeline, its engine and that engine's metrics."""

    name: str
    pipeline: Pipeline
    engine: Engine
    metrics: Any                 # serve_metrics.Metrics


def named_pipelines(pipelines: Pipeline | Mapping[str, Pipeline]) -> dict[str, Pipeline]:
    """A single Pipeline (named after its manifest) or a mapping name -> Pipeline, as an ordered dict."""
    if isinstance(pipelines, Pipeline):
        manifest = pipelines.manifest
        return {manifest.name or Path(manifest.root).name or "default": pipelines}
    named = dict(pipelines)
    if not named:
        raise InputError("no bundle to serve")
    for name, pipeline in named.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InputError(f"bundle name {name!r}: letters, digits, '_', '.' or '-' (at most 64)")
        if not isinstance(pipeline, Pipeline):
            raise InputError(f"bundle {name!r}: expected a Pipeline, got {type(pipeline).__name__}")
    return named


def gate_summary(manifest) -> dict:
    """What export recorded about the bundle's quality (manifest `verification`, untrusted): `passed` (True, False
    or None when not verified), the distribution gate's figures when there is one, and one line for people."""
    verification = manifest.verification if isinstance(manifest.verification, Mapping) else {}
    precision = manifest.components["step"].precision
    if verification.get("performed") is not True:
        return {"passed": None, "precision": precision, "summary": f"{precision}: not verified at export"}
    gate = verification.get("distribution")
    if isinstance(gate, Mapping):
        figures = {key: _number(gate.get(key)) for key in ("tv_mean", "tv_worst_step")}
        limits = gate.get("gate") if isinstance(gate.get("gate"), Mapping) else {}
        limits = {key: _number(limits.get(key)) for key in figures}
        passed = gate.get("passed") is True
        text = ", ".join(f"{key} {_text(figures[key])} (gate {_text(limits[key])})" for key in figures)
        return {"passed": passed, "precision": precision, **figures, "gate": limits,
                "summary": f"{precision}: distribution gate {'passed' if passed else 'FAILED'}: {text}"}
    checks = [verification.get(key) for key in ("generation", "generation_unguided")]
    passed = all(isinstance(c, Mapping) and c.get("passed") is True for c in checks if c is not None)
    return {"passed": passed, "precision": precision,
            "summary": f"{precision}: seeded generations {'equal' if passed else 'DIFFER from'} eager float32's "
                       "(the distribution gate is for reduced precision)"}


def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _text(value: float | None) -> str:
    return "?" if value is None else f"{value:.3g}"


def model_card(model: Model, backend: str) -> dict:
    """One entry of `/v1/models`."""
    m, engine, pipeline = model.pipeline.manifest, model.engine, model.pipeline
    return {"id": model.name, "bundle": Path(m.root).name, "name": m.name, "backend": backend,
            "precision": m.components["step"].precision, "num_classes": m.num_classes,
            "classes": list(m.class_names) if m.class_names else None, "image_size": m.dims.image_size,
            "sampling": pipeline.sampling.to_dict(), "sampling_help": HELP,
            "sampling_choices": CHOICES,
            "formats": FORMATS, "gate": gate_summary(m),
            "limits": {"slots": engine.capacity, "max_images": engine.max_images, "max_queue": engine.max_queue,
                       "request_timeout": engine.request_timeout, "max_previews": MAX_PREVIEWS}}


class LabelledRegistries:
    """Several registries as one for `generate_latest`: every sample gets a `model` label (same metric names)."""

    def __init__(self, registries: Mapping[str, Any]):
        self.registries = dict(registries)

    def collect(self):
        from prometheus_client.metrics_core import Metric
        families: dict[str, Metric] = {}
        for name, registry in self.registries.items():
            for family in registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                merged.samples.extend(s._replace(labels={"model": name, **s.labels}) for s in family.samples)
        return list(families.values())
