"""Whole generations (labels -> images), checked, then timed; and the loop's own overhead per step."""

from __future__ import annotations

import pytest
from harness import REPLAY, record, speedup_info

pytestmark = pytest.mark.benchmark(timer=REPLAY)


@pytest.mark.parametrize("case", ("eager_official", "ort_fp32", "ort_int8"))
def test_generate(benchmark, generate_group, generate_checks, labels, settings, case):
    benchmark.group = "generate"
    generate_checks[case]()
    if benchmark.disabled:
        record(benchmark, generate_group, case)
        return
    median = generate_group.median(case)
    record(benchmark, generate_group, case, steps=settings.generate_steps, images_per_s=len(labels) / median,
           ms_per_step=1e3 * median / settings.generate_steps,
           **speedup_info("generate", case, generate_group.median("eager_official") / median))


@pytest.mark.parametrize("case", ("eager_loop", "eager_forward", "ort_loop", "ort_forward"))
def test_loop_overhead(benchmark, overhead_group, step_group, settings, case):
    """Loop cost per step = loop / steps - forward, on a model without transformer layers; as % of a full step."""
    benchmark.group = "loop overhead"
    if benchmark.disabled:
        record(benchmark, overhead_group, case)
        return
    backend = case.split("_")[0]
    per_step = overhead_group.median(f"{backend}_loop") / settings.overhead_steps
    overhead = per_step - overhead_group.median(f"{backend}_forward")
    full_step = step_group.median("eager_fp32" if backend == "eager" else "ort_fp32")
    # the whole cheap step bounds the overhead from above when the difference drowns in noise
    record(benchmark, overhead_group, case, loop_overhead_ms_per_step=1e3 * overhead,
           full_step_ms=1e3 * full_step, loop_overhead_fraction=overhead / full_step,
           loop_overhead_upper_bound=per_step / full_step)
