"""The cost-quality front of sampling plans (`maskbit-eval tradeoff`).

A plan is a name and sampling overrides (any `SamplingSettings` field); "default" is the bundle's own settings and
is always measured. For every seed and plan (seed-major, so a drift of the machine's load spreads over all plans),
the bundle generates `per_class` images of each demo class with the runtime, and the report records per image:
- transformer passes, from the settings (`SamplingSettings.transformer_passes`): a guided step (nonzero scale,
  inside the guidance interval) runs the conditional and the unconditional halves, 2 passes, any other step the
  unguided graph, 1 pass (2 when the bundle has no unguided graph);
- wall time of the generation on this machine (CPU model, instruction sets and load average recorded);
- quality by the demo evaluation (`evaluate_demo`: demo-FID, KID, precision/recall and class accuracy in the
  demo network's features, and FID, KID, precision/recall in 16x16 thumbnails; later sets are scored by its
  `_score` against the same references, without its plan-independent reconstructed and real sets);
then each metric's mean, std, min and max over seeds, and which plans lie within the default's spread (WITHIN_RULE).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from maskbit_runtime.errors import InputError
from maskbit_runtime.machine import cpu_info
from maskbit_runtime.sampling import SamplingSettings
from maskbit_runtime.specs import STEP, STEP_UNGUIDED

from .demo import REFERENCE_SEED, _score, evaluate_demo, evaluation_labels
from .demo_network import crops_dataset
from .features import PixelFeatures, extract

DEFAULT = "default"
MAX_PLANS = 64
MAX_PLANS_BYTES = 1 << 20
MAX_NAME = 64
# each seed's generated-set metrics, flattened from `evaluate_demo` ("pixels_*": the thumbnail feature space)
METRICS = ("fid", "kid", "precision", "recall", "class_accuracy",
           "pixels_fid", "pixels_kid", "pixels_precision", "pixels_recall")
# the metrics WITHIN_RULE looks at, in both feature spaces, and which way is better
GATES = {"fid": "lower", "precision": "higher", "recall": "higher",
         "pixels_fid": "lower", "pixels_precision": "higher", "pixels_recall": "higher"}
WITHIN_RULE = ("a plan lies within the default's spread when, in the demo network's features and in 16x16 "
               "thumbnails alike, its seed-mean FID is at most the default's largest per-seed FID and its seed-mean "
               "precision and recall are each at least the default's smallest per-seed value (better than every "
               "default seed counts as within); the marked plan is the one with the fewest transformer passes per "
               "image among those within (ties: fewer seconds per image), the default itself when no cheaper plan "
               "is within")


# -- plans ------------------------------------------------------------------------------------------------------
def read_plans(path: str | Path, base: SamplingSettings) -> dict[str, SamplingSettings]:
    """Plans from a JSON file {name: {setting: value}} (untrusted: every name and value is checked)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"plans file {path} does not exist or is not a file")
    if path.stat().st_size > MAX_PLANS_BYTES:
        raise InputError(f"plans file {path} is larger than {MAX_PLANS_BYTES >> 20} MiB")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:     # bad JSON, bad UTF-8, a 5000-digit number, deep nesting
        raise InputError(f"plans file {path} is not valid JSON: {exc}") from None
    return parse_plans(data, base, f"plans file {path}")


def parse_plans(data, base: SamplingSettings, where: str = "plans") -> dict[str, SamplingSettings]:
    """{name: overrides} -> {name: settings}, "default" (the bundle's settings `base`) first."""
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a JSON object mapping plan names to sampling overrides, "
                         f"got {type(data).__name__}")
    if not data:
        raise InputError(f"{where} holds no plans")
    if len(data) > MAX_PLANS:
        raise InputError(f"{where} holds {len(data)} plans; at most {MAX_PLANS}")
    plans = {DEFAULT: base}
    for name, overrides in data.items():
        if not name or len(name) > MAX_NAME or not name.isprintable() or name != name.strip():
            raise InputError(f"{where}: plan names are 1-{MAX_NAME} printable characters without edge spaces, "
                             f"got {name[:MAX_NAME]!r}")
        if not isinstance(overrides, dict):
            raise InputError(f"{where}: plan {name!r} must be an object of sampling settings, "
                             f"got {type(overrides).__name__}")
        if name == DEFAULT:
            if overrides:
                raise InputError(f"{where}: the plan name {DEFAULT!r} is the bundle's own settings; "
                                 f"give overrides another name")
            continue
        nulls = sorted(key for key, value in overrides.items() if value is None)
        if nulls:
            raise InputError(f"{where}: plan {name!r}: {', '.join(nulls)} is null; give a value or leave it out")
        try:
            plans[name] = base.with_overrides(**overrides)
        except InputError as exc:
            raise InputError(f"{where}: plan {name!r}: {exc}") from None
    return plans


# -- seed statistics and the rule ------------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max())}


def within_spread(plan: Mapping[str, dict], default: Mapping[str, dict]) -> bool:
    """WITHIN_RULE for one plan: `plan` and `default` map each metric of GATES to its summary over seeds."""
    for metric, better in GATES.items():
        mean = plan[metric]["mean"]
        if better == "lower" and not mean <= default[metric]["max"]:
            return False
        if better == "higher" and not mean >= default[metric]["min"]:
            return False
    return True


def cheapest_within(plans: Mapping[str, dict]) -> str:
    """The marked plan of WITHIN_RULE; `plans` maps names (DEFAULT among them) to entries holding
    `transformer_passes_per_image`, `seconds_per_image` {mean} and `metrics` {metric: summary}."""
    default = plans[DEFAULT]["metrics"]
    within = [name for name, entry in plans.items() if within_spread(entry["metrics"], default)]
    return min(within, key=lambda name: (plans[name]["transformer_passes_per_image"],
                                         plans[name]["seconds_per_image"]["mean"], name != DEFAULT))


# -- the measurement -------------------------------------------------------------------------------------------
def _generate(pipe, labels: list[int], seed: int, settings: SamplingSettings,
              progress: Callable[[int], None] | None) -> tuple[np.ndarray, float]:
    """The images `pipe.generate(labels, seed)` makes, in parts of one engine batch (same images: image j's noise
    is seeded by (seed, j)), and the seconds they took."""
    chunk = pipe.manifest.max_batch(STEP.name)
    parts, start = [], time.perf_counter()
    for first in range(0, len(labels), chunk):
        part = labels[first:first + chunk]
        parts.append(pipe.generate(part, seed=seed, first_index=first, **settings.to_dict()).images)
        if progress:
            progress(len(part))
    return np.concatenate(parts), time.perf_counter() - start


def _warm_up(pipe, labels: list[int]) -> None:
    """Open every graph (guided and unguided step, combine, decoder) before anything is timed."""
    part = labels[:pipe.manifest.max_batch(STEP.name)]
    for guidance in (1.0, 0.0):
        pipe.generate(part, num_steps=2, guidance_scale=guidance, guidance_start=0.0, guidance_stop=1.0, seed=0)


def _cpu_family() -> dict:
    """CPU vendor, family and model numbers (/proc/cpuinfo): the same model name hides several generations."""
    wanted = {"vendor_id": "cpu_vendor", "cpu family": "cpu_family", "model": "cpu_model_number"}
    found = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in wanted and wanted[key.strip()] not in found:
                found[wanted[key.strip()]] = value.strip()
    except OSError:
        pass
    return found


def _flatten(generated: dict) -> dict:
    pixels = generated["pixels"]
    return {metric: float(pixels[metric[7:]] if metric.startswith("pixels_") else generated[metric])
            for metric in METRICS}


def measure_tradeoff(pipe, network, plans: Mapping[str, SamplingSettings], per_class: int = 16,
                     seeds: Sequence[int] = (0, 1, 2), reference_per_class: int = 64,
                     progress: Callable[[int], None] | None = None,
                     on_partial: Callable[[dict], None] | None = None) -> dict:
    """Cost and quality of every plan on a demo bundle (see the module docstring); `progress(n)` after every n
    images generated; `on_partial(report)` after each seed round from the second on but the last, with the report
    of the seeds done so far (`complete` false), so a long run cut short still leaves a report.
    `plans` must hold DEFAULT (the bundle's settings), as `parse_plans` returns."""
    if DEFAULT not in plans:
        raise InputError(f"plans must include {DEFAULT!r}, the bundle's own settings")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise InputError(f"tradeoff needs at least 2 distinct seeds for the seed-to-seed spread, got {list(seeds)}")
    labels = evaluation_labels(per_class).tolist()
    _warm_up(pipe, labels)
    machine = {**cpu_info(), **_cpu_family()}
    score, context = None, {"bundle": str(pipe.manifest.root), "per_class": per_class,
                            "images_per_seed": len(labels), "seeds_planned": list(seeds)}
    per_seed = {name: {} for name in plans}
    for done, seed in enumerate(seeds, 1):
        for name, settings in plans.items():
            images, seconds = _generate(pipe, labels, seed, settings, progress)
            if score is None:        # the first set: the whole demo evaluation, with its ceiling and floor
                report = evaluate_demo(pipe, network, per_class, seed, reference_per_class, generated=images,
                                       **settings.to_dict())
                context.update({key: report[key] for key in ("features", "pixel_features", "reference_images",
                                                             "reconstructed", "real")})
                generated, score = report["generated"], demo_scorer(network, per_class, reference_per_class)
            else:
                generated = score(images)
            per_seed[name][str(seed)] = {"seconds_per_image": seconds / len(labels),
                                         "load_average_1min": (cpu_info()["load_average"] or [None])[0],
                                         **_flatten(generated)}
        if on_partial and 2 <= done < len(seeds):
            on_partial(_report(pipe, plans, per_seed, list(seeds[:done]), machine, context))
    return _report(pipe, plans, per_seed, list(seeds), machine, context)


def _report(pipe, plans, per_seed: dict, seeds: list[int], machine: dict, context: dict) -> dict:
    has_unguided = STEP_UNGUIDED.name in pipe.manifest.components
    entries = _entries(plans, per_seed, has_unguided)
    marked = cheapest_within(entries)
    return {**context, "seeds": seeds, "complete": seeds == context["seeds_planned"],
            "has_unguided_step": has_unguided, "machine": {**machine, "load_average_end": cpu_info()["load_average"]},
            "within_rule": WITHIN_RULE, "marked": marked,
            "marked_passes_saved_vs_default": entries[marked]["passes_saved_vs_default"], "plans": entries}


def demo_scorer(network, per_class: int, reference_per_class: int) -> Callable[[np.ndarray], dict]:
    """images -> the "generated" part of `evaluate_demo(..., per_class, reference_per_class, generated=images)`,
    without scoring its reconstructed and real sets again (they do not depend on the plan or the seed)."""
    reference_images, _ = crops_dataset(reference_per_class, REFERENCE_SEED)
    references = extract(network, reference_images)[0], extract(PixelFeatures(), reference_images)[0]
    labels = evaluation_labels(per_class)
    return lambda images: _score(network, images, labels, *references)


def _entries(plans: Mapping[str, SamplingSettings], per_seed: dict, has_unguided: bool) -> dict:
    """Each plan's settings, passes per image, and seconds and metrics summarized over seeds."""
    entries = {}
    for name, settings in plans.items():
        seeds_of = list(per_seed[name].values())
        entries[name] = {
            "overrides": {k: v for k, v in settings.to_dict().items() if v != plans[DEFAULT].to_dict()[k]},
            "sampling": settings.to_dict(),
            "transformer_passes_per_image": settings.transformer_passes(has_unguided),
            "seconds_per_image": summarize([s["seconds_per_image"] for s in seeds_of]),
            "metrics": {metric: summarize([s[metric] for s in seeds_of]) for metric in METRICS},
            "per_seed": per_seed[name]}
    default = entries[DEFAULT]
    for entry in entries.values():
        entry["passes_saved_vs_default"] = default["transformer_passes_per_image"] / \
            entry["transformer_passes_per_image"]
        entry["within_default_spread"] = within_spread(entry["metrics"], default["metrics"])
    return entries


# -- the plot --------------------------------------------------------------------------------------------------
_LABELS = {"fid": "FID, demo network", "pixels_fid": "FID, thumbnails", "recall": "recall, demo network",
           "pixels_recall": "recall, thumbnails"}


def plot_front(report: dict, out: str | Path) -> Path:
    """Passes per image (x) against FID and recall (y, mean with the min-max over seeds); default and marked
    plan highlighted. Written atomically as PNG."""
    from maskbit_runtime.errors import require
    from maskbit_runtime.files import atomic_output
    matplotlib = require("matplotlib", "eval", "the tradeoff plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plans, marked = report["plans"], report["marked"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for ax, metric in zip(axes.flat, ("fid", "pixels_fid", "recall", "pixels_recall")):
        for name, entry in plans.items():
            x, summary = entry["transformer_passes_per_image"], entry["metrics"][metric]
            colour = "black" if name == DEFAULT else "tab:blue"
            ax.errorbar([x], [summary["mean"]], yerr=[[summary["mean"] - summary["min"]],
                                                      [summary["max"] - summary["mean"]]],
                        fmt="o", color=colour, capsize=3, markersize=5)
            if name == marked:
                ax.plot([x], [summary["mean"]], "o", markersize=13, markerfacecolor="none", color="tab:red")
            ax.annotate(name, (x, summary["mean"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
        spread = plans[DEFAULT]["metrics"][metric]
        ax.axhspan(spread["min"], spread["max"], color="0.85", zorder=0, label="default: seed min-max")
        ax.set_xlabel("transformer passes per image")
        ax.set_ylabel(_LABELS[metric] + " (mean, min-max over seeds)")
        ax.legend(loc="best", fontsize=7)
    fig.suptitle(f"{Path(report['bundle']).name}: {report['images_per_seed']} images x {len(report['seeds'])} "
                 f"seeds per plan; black: default, red ring: cheapest within the default's spread ({marked})",
                 fontsize=9)
    fig.tight_layout()
    out = Path(out)
    with atomic_output(out) as partial:
        fig.savefig(partial, format="png", dpi=110)
    plt.close(fig)
    return out
