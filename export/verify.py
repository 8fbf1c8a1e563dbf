"""Verification of exported components: ONNX Runtime against the eager module on fresh random inputs."""

from __future__ import annotations

import numpy as np
import torch
from maskbit_runtime.specs import ComponentSpec
from torch import nn

from .tolerances import tolerance
from maskbit_runtime.errors import MaskbitError


class VerificationError(MaskbitError, RuntimeError):
    """An exported component whose outputs do not match eager PyTorch within tolerance."""


def compare(expected: np.ndarray, actual: np.ndarray, tol: dict[str, float]) -> dict:
    """Metrics of one output against its eager value, and whether they are within `tol`."""
    if expected.shape != actual.shape:
        return {"passed": False, "reason": f"shape {list(actual.shape)} != eager {list(expected.shape)}"}
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
    from maskbit_runtime.specs import STEP, STEP_SCALARS

    cfg = step.generator.config
    labels = np.asarray(labels, dtype=np.int64)
    noise = StepNoise(seed, len(labels), cfg.num_tokens, cfg.codebook_splits)
    tokens = np.full((len(labels), cfg.num_tokens, cfg.codebook_splits), cfg.mask_token, dtype=np.int64)
    agreeing, drawn, per_step = 0, 0, []
    for params in plan:
        inputs = {"tokens": tokens, "labels": labels, "noise": noise.draw()}
        inputs.update({name: np.array(getattr(params, name), dtype=STEP.input(name).dtype) for name in STEP_SCALARS})
        reference = run_eager(step, STEP, inputs)
        sampled = session.run(["sampled"], inputs)[0]
        masked = tokens == cfg.mask_token
        same = int(((sampled == reference["sampled"]) & masked).sum())
        agreeing, drawn = agreeing + same, drawn + int(masked.sum())
        per_step.append(same / max(1, int(masked.sum())))
        tokens = reference["next_tokens"]
    return {"agreement": agreeing / drawn, "worst_step_agreement": min(per_step), "drawn_groups": drawn,
            "num_steps": len(plan), "labels": labels.tolist(), "seed": seed}
