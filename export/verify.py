"""Verification of a bundle: each component in ONNX Runtime against its eager module on fresh random inputs,
then whole seeded generations (guided and unguided) through the runtime against the eager sampler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from maskbit_runtime.errors import MaskbitError
from maskbit_runtime.machine import cpu_info
from maskbit_runtime.specs import (COMPONENTS, DROP_LABEL_MASK, LABELS, LOGITS, NEXT_TOKENS, NOISE, SAMPLED, STEP,
                                   STEP_SETTINGS, TOKENS, TRANSFORMER, ComponentSpec, Dims)
from maskbit_runtime.tokens import combine_groups
from torch import nn

from maskbit.generator import Generator
from maskbit.sampling import generate_groups
from maskbit.step import GenerationStep
from maskbit.tokenizer import Tokenizer

from .cast import cpu_session
from .graphs import graph_module, random_inputs
from .quality import GATES, passes, teacher_forced_distances
from .tolerances import AGREEMENT_STEPS, tolerance

GENERATION_CHECK_STEPS = 8


class VerificationError(MaskbitError, RuntimeError):
    """An exported component whose outputs do not match eager PyTorch within tolerance."""


def compare(expected: np.ndarray, actual: np.ndarray, tol: dict[str, float]) -> dict:
    """Metrics of one output against its eager value, and whether they are within `tol`."""
    if expected.shape != actual.shape:
        return {"passed": False, "reason": f"shape {list(actual.shape)} != eager {list(expected.shape)}"}
    for name, array in (("eager", expected), ("exported", actual)):
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            return {"passed": False, "reason": f"the {name} output has NaN or infinite values"}
    diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
    result = {"max_abs": float(diff.max(initial=0.0)), "mismatch_fraction": float((diff > 0).mean())}
    passed = True
    if "atol" in tol:
        passed &= bool(np.all(diff <= tol["atol"] + tol.get("rtol", 0.0) * np.abs(expected)))
    if "max_abs" in tol:
        passed &= result["max_abs"] <= tol["max_abs"]
    if "max_mismatch_fraction" in tol:
        passed &= result["mismatch_fraction"] <= tol["max_mismatch_fraction"]
    result["passed"] = bool(passed)
    return result


def step_feeds(tokens: np.ndarray, labels: np.ndarray, noise: np.ndarray, params) -> dict[str, np.ndarray]:
    """The step's inputs by name: the state, labels and noise, and one plan entry's settings for every row."""
    labels = np.asarray(labels, dtype=np.int64)
    feeds = {TOKENS: tokens, LABELS: labels, NOISE: noise}
    feeds.update({n: np.full(len(labels), getattr(params, n), dtype=STEP.input(n).dtype) for n in STEP_SETTINGS})
    return feeds


def run_eager(module: nn.Module, spec: ComponentSpec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(np.array(inputs[t.name])) for t in spec.inputs))
    out = out if isinstance(out, tuple) else (out,)
    return {t.name: o.cpu().numpy() for t, o in zip(spec.outputs, out)}


def verify_component(module: nn.Module, spec: ComponentSpec, session, batches: list[dict[str, np.ndarray]],
                     precision: str = "fp32") -> dict:
    """Run eager and ONNX Runtime on each input batch; return per-output metrics (worst case over batches)."""
    tol = tolerance(precision, spec.name)
    report: dict = {"passed": True, "tolerance": tol, "outputs": {}, "batches": [], "inputs": "random"}
    for inputs in batches:
        eager = run_eager(module, spec, inputs)
        onnx_out = session.run([t.name for t in spec.outputs], {t.name: inputs[t.name] for t in spec.inputs})
        report["batches"].append(int(next(iter(inputs.values())).shape[0]) if spec.inputs[0].shape else 1)
        for t, value in zip(spec.outputs, onnx_out):
            metrics = compare(eager[t.name], value, tol)
            worst = report["outputs"].get(t.name)
            if worst is None or not metrics["passed"] or metrics.get("max_abs", 0) > worst.get("max_abs", 0):
                report["outputs"][t.name] = metrics
            report["passed"] &= metrics["passed"]
    return report


def failure_message(name: str, report: dict) -> str:
    bad = {k: v for k, v in report["outputs"].items() if not v["passed"]}
    details = "; ".join(f"{k}: {', '.join(f'{m}={v[m]:.3g}' for m in ('max_abs', 'mismatch_fraction') if m in v)}"
                        f"{v.get('reason', '')}" for k, v in bad.items())
    return f"verification of {name} failed ({details}; tolerance {report['tolerance']})"


def teacher_forced_agreement(step: nn.Module, session, labels: list[int], plan, seed: int) -> dict:
    """How often a reduced-precision step samples the same groups as the float32 step, along one float32 trajectory.

    At every step both get the same inputs (the float32 trajectory's tokens, the same noise and scalars); the
    groups compared are those the step draws (masked at its input). The float32 `next_tokens` feed the next step.
    """
    from maskbit_runtime.noise import StepNoise

    cfg = step.generator.config
    labels = np.asarray(labels, dtype=np.int64)
    noise = StepNoise(seed, len(labels), cfg.num_tokens, cfg.codebook_splits)
    tokens = np.full((len(labels), cfg.num_tokens, cfg.codebook_splits), cfg.mask_token, dtype=np.int64)
    agreeing, drawn, per_step = 0, 0, []
    for params in plan:
        inputs = step_feeds(tokens, labels, noise.draw(), params)
        reference = run_eager(step, STEP, inputs)
        sampled = session.run([SAMPLED], inputs)[0]
        masked = tokens == cfg.mask_token
        same = int(((sampled == reference[SAMPLED]) & masked).sum())
        agreeing, drawn = agreeing + same, drawn + int(masked.sum())
        per_step.append(same / max(1, int(masked.sum())))
        tokens = reference[NEXT_TOKENS]
    return {"agreement": agreeing / drawn, "worst_step_agreement": min(per_step), "drawn_groups": drawn,
            "num_steps": len(plan), "labels": labels.tolist(), "seed": seed}


def check_logits_finite(tokenizer: Tokenizer, generator: Generator, dims: Dims, precision: str) -> None:
    """The reduced-precision generator's logits on sample inputs (masked and decided groups, with and without the
    label) must be finite: a half-precision overflow gives NaN logits, from which the step draws garbage tokens
    without a word. Run before anything is written, with or without verification."""
    spec = TRANSFORMER
    inputs = random_inputs(spec, dims, 2, seed=0, codebook_size=tokenizer.config.codebook_size,
                           num_classes=generator.config.num_classes)
    logits = run_eager(graph_module(spec.name, tokenizer, generator, precision), spec, inputs)[LOGITS]
    if not np.all(np.isfinite(logits)):
        raise VerificationError(f"the {precision} generator's logits are NaN or infinite on a sample input "
                                f"({np.mean(~np.isfinite(logits)):.0%} of them): its activations overflow {precision}; "
                                f"export --precision fp32{' or bf16' if precision == 'fp16' else ''}")


def verify_bundle(root: Path, names: list[str], tokenizer: Tokenizer, generator: Generator | None, dims: Dims,
                  precision: str, max_batch: int, progress: Callable[[str], None]) -> dict:
    """Verify every component and, with a generator, seeded generations; raise VerificationError on failure."""
    from maskbit_runtime.backends.ort import import_ort
    ort = import_ort()
    codebook = tokenizer.config.codebook_size
    num_classes = generator.config.num_classes if generator is not None else 1000
    report: dict = {"performed": True, "components": {}}
    for name in names:
        progress(f"verifying {name}")
        spec = COMPONENTS[name]
        session = cpu_session(ort, root / spec.file)
        batches = [random_inputs(spec, dims, b, seed=100 + b, codebook_size=codebook, num_classes=num_classes)
                   for b in sorted({1, min(3, max_batch)})]
        result = verify_component(graph_module(name, tokenizer, generator, precision), spec, session, batches,
                                  precision)
        report["components"][name] = result
        if not result["passed"]:
            raise VerificationError(failure_message(name, result))
    if generator is None:
        return report
    labels = np.random.default_rng(7).integers(0, num_classes, min(3, max(2, max_batch))).tolist()
    for key, guidance in (("generation", None), ("generation_unguided", 0.0)):
        progress(f"verifying a seeded generation ({'guidance 0' if guidance == 0 else 'default guidance'})")
        settings = generator.sampling_config.with_overrides(guidance_scale=guidance)
        report[key] = result = _verify_generation(root, generator, settings, labels, 1234, precision)
        if result.get("performed", True) and not result["passed"]:
            raise VerificationError(f"a seeded generation through the exported step differs from the eager sampler "
                                    f"on {result.get('mismatch_fraction', 1.0):.2%} of tokens"
                                    f"{' (' + result['reason'] + ')' if 'reason' in result else ''}")
    if precision in GATES and precision != "fp32":
        progress(f"distribution gate: the {precision} step's sampling distributions against float32")
        report["distribution"] = result = _verify_distribution(root, generator, labels, precision)
        report["agreement"] = _verify_agreement(root, generator, labels, precision)      # reported, not gated
        if not result["passed"]:
            raise VerificationError(
                f"the {precision} generator's sampling distributions are too far from float32's: mean total "
                f"variation {result['tv_mean']:.3g} (gate {result['gate']['tv_mean']}), worst step "
                f"{result['tv_worst_step']:.3g} (gate {result['gate']['tv_worst_step']}); build --precision fp32")
    return report


def _verify_generation(root: Path, generator: Generator, settings, labels: list[int], seed: int,
                       precision: str) -> dict:
    """A whole seeded generation through the exported step against the eager sampler's tokens: identical at
    fp32; at reduced precision recorded only (it diverges after its first different draw; the agreement gates)."""
    from maskbit_runtime import Pipeline
    if precision == "bf16":
        return {"performed": False, "reason": "ONNX Runtime's CPU provider has no bfloat16 MatMul; "
                "the components and the distribution gate ran the bfloat16 graphs emulated (cast.py)"}
    settings = settings.with_overrides(num_steps=min(GENERATION_CHECK_STEPS, settings.num_steps))
    eager = generate_groups(generator, labels, settings, seed).cpu().numpy()
    with Pipeline.load(root, backend="ort", allow_incomplete=True, providers=["CPUExecutionProvider"]) as pipe:
        exported = pipe.generate(labels, seed=seed, **settings.to_dict()).tokens
    expected = combine_groups(eager, generator.config.num_bits).reshape(exported.shape)
    result = compare(expected, exported, tolerance(precision, "generation"))
    result.update({"labels": labels, "seed": seed, "num_steps": settings.num_steps,
                   "guidance_scale": settings.guidance_scale})
    return result


def _gate_plan(generator: Generator):
    sampling = generator.sampling_config
    return sampling.with_overrides(num_steps=min(sampling.num_steps, AGREEMENT_STEPS)).plan(
        generator.config.num_tokens * generator.config.codebook_splits)


def _verify_agreement(root: Path, generator: Generator, labels: list[int], precision: str) -> dict:
    """Teacher-forced agreement of sampled groups with the float32 step (a reported figure, see quality.py)."""
    from maskbit_runtime.backends.ort import import_ort
    session = cpu_session(import_ort(), root / STEP.file)
    return teacher_forced_agreement(GenerationStep(generator).eval(), session, labels, _gate_plan(generator), 4321)


def eager_logits(generator: Generator, bf16: bool = False):
    """(tokens, labels, drop) -> logits of the eager generator, in float32 or under bfloat16 autocast."""
    def logits(tokens, labels, drop):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return generator(*(torch.from_numpy(a) for a in (tokens, labels, drop))).float().numpy()
    return logits


def session_logits(session):
    """(tokens, labels, drop) -> logits of an ONNX Runtime session of a transformer graph."""
    return lambda tokens, labels, drop: session.run([LOGITS], {TOKENS: tokens, LABELS: labels,
                                                               DROP_LABEL_MASK: drop})[0]


def eager_advance(generator: Generator):
    """(tokens, labels, noise, params) -> next tokens of the eager float32 step: the reference trajectory."""
    step = GenerationStep(generator).eval()

    def advance(tokens, labels, noise, params):
        return run_eager(step, STEP, step_feeds(tokens, labels, noise, params))[NEXT_TOKENS]
    return advance


def distribution_report(generator: Generator, candidate, labels: list[int], plan, precision: str) -> dict:
    """Teacher-forced TV/KL of `candidate` (a logits function) against eager float32, with the gate's verdict."""
    cfg = generator.config
    result = teacher_forced_distances(eager_logits(generator), candidate, eager_advance(generator), labels, plan,
                                      cfg.mask_token, (cfg.num_tokens, cfg.codebook_splits))
    result.update(gate=GATES[precision], passed=passes(result, precision), cpu_flags=cpu_info()["isa"])
    return result


def _verify_distribution(root: Path, generator: Generator, labels: list[int], precision: str) -> dict:
    """The reduced-precision gate on the exported transformer graph (same weights and quantization as the step)."""
    from maskbit_runtime.backends.ort import import_ort
    session = cpu_session(import_ort(), root / TRANSFORMER.file)
    return distribution_report(generator, session_logits(session), labels, _gate_plan(generator), precision)
