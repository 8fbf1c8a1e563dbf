"""One unmasking step with guidance (the transformer runs 2 x images sequences), and the int8 quality gate."""

from __future__ import annotations

import pytest
from harness import record

GEMMS = ("gemm_torch", "gemm_numpy", "gemm_ort")
CASES = ("eager_fp32", "eager_bf16", "ort_fp32", "ort_int8", *GEMMS)


def gemm_peak(group) -> float:
    """The machine's fp32 GEMM throughput on one layer's weight shapes: the best of torch, numpy and ONNX Runtime,
    measured round-robin with the steps."""
    return max(group.flops[g] / group.median(g) for g in GEMMS)


@pytest.mark.parametrize("case", CASES)
def test_step(benchmark, step_group, labels, case):
    benchmark.group = "step"
    if benchmark.disabled:
        record(benchmark, step_group, case)
        return
    median, peak = step_group.median(case), gemm_peak(step_group)
    flops = step_group.flops[case]
    extra = {"gflop": flops / 1e9, "gflops": flops / median / 1e9, "peak_gflops": peak / 1e9,
             "peak_fraction": flops / median / peak}
    if case not in GEMMS:
        extra.update(images_per_s=len(labels) / median, speedup_vs_eager=step_group.median("eager_fp32") / median)
    record(benchmark, step_group, case, **extra)


def test_int8_agreement(benchmark, models, pipelines, labels, settings):
    """Teacher-forced agreement of the int8 step's sampled groups with float32 (the export gate's measurement)."""
    from cases import sampling_plan
    from maskbit_export.verify import teacher_forced_agreement

    from maskbit.step import GenerationStep
    benchmark.group = "agreement"
    generator = models[2]
    plan, _ = sampling_plan(generator, settings.agreement_steps)
    step, session = GenerationStep(generator).eval(), pipelines["int8"].backend.session("step")
    result = benchmark.pedantic(teacher_forced_agreement, args=(step, session, labels.tolist(), plan, 4321),
                                rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "labels"})
    assert 0.0 <= result["agreement"] <= 1.0
