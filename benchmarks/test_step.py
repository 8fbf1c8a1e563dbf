"""One unmasking step with guidance (the transformer runs 2 x images sequences), checked, then timed."""

from __future__ import annotations

import pytest
from harness import REPLAY, record, speedup_info

GEMMS = ("gemm_torch", "gemm_numpy", "gemm_ort")
# a reduced-precision step -> (its fp32 step, the GEMMs of its ceiling: fp32 and reduced, same library)
PRECISIONS = {"ort_int8": ("ort_fp32", "gemm_ort", "gemm_ort_int8"),
              "eager_bf16": ("eager_fp32", "gemm_torch", "gemm_torch_bf16")}
CASES = ("eager_fp32", "eager_bf16", "ort_fp32", "ort_int8", *GEMMS, "gemm_ort_int8", "gemm_torch_bf16")

pytestmark = pytest.mark.benchmark(timer=REPLAY)


def gemm_peak(group) -> float:
    """The machine's fp32 GEMM throughput on one layer's weight shapes: the best of torch, numpy and ONNX Runtime,
    measured round-robin with the steps."""
    return max(group.flops[g] / group.median(g) for g in GEMMS)


@pytest.mark.parametrize("case", CASES)
def test_step(benchmark, step_group, step_checks, labels, case):
    benchmark.group = "step"
    if case in step_checks:
        step_checks[case]()                   # a fast wrong result fails here, before it is timed
    if benchmark.disabled:
        record(benchmark, step_group, case)
        return
    median, peak = step_group.median(case), gemm_peak(step_group)
    flops = step_group.flops[case]
    extra = {"gflop": flops / 1e9, "gflops": flops / median / 1e9, "peak_gflops": peak / 1e9,
             "peak_fraction": flops / median / peak}
    if not case.startswith("gemm"):
        extra.update(images_per_s=len(labels) / median,
                     **speedup_info("step", case, step_group.median("eager_fp32") / median))
    if case in PRECISIONS:
        extra.update(precision_ratios(step_group, case))
    record(benchmark, step_group, case, **extra)


def precision_ratios(group, case: str) -> dict:
    """What the reduced precision buys the step on this machine (its fp32 step over it), next to what it buys
    the step's GEMMs (the fp32 GEMM over the reduced one, same library and shapes): the ceiling."""
    fp32_step, fp32_gemm, low_gemm = PRECISIONS[case]
    return {"precision_step_ratio": group.median(fp32_step) / group.median(case),
            "precision_gemm_ratio": group.median(fp32_gemm) / group.median(low_gemm)}


@pytest.mark.parametrize("case", ("ort_int8", "eager_bf16"))
def test_distribution_gate(benchmark, distribution_gate, case):
    """Teacher-forced TV/KL of the reduced-precision step against eager fp32 (the export gate's measurement),
    reported per case; the agreement of sampled groups is kept as a figure for comparison with earlier runs."""
    benchmark.group = "distribution gate"
    result = distribution_gate[case]
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "labels"})
    REPLAY.load([0.0])                       # the figure is the gate, not a time; this keeps the entry in the JSON
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert result["passed"], result
