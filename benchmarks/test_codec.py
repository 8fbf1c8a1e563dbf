"""The tokenizer's decoder (indices -> uint8 images) and encoder (images -> indices), eager vs the runtime."""

from __future__ import annotations

import pytest
from harness import REPLAY, record, speedup_info

pytestmark = pytest.mark.benchmark(timer=REPLAY)


@pytest.mark.parametrize("component", ("decoder", "encoder"))
@pytest.mark.parametrize("case", ("eager_fp32", "ort_fp32"))
def test_codec(benchmark, codec_groups, settings, component, case):
    from cases import codec_check
    benchmark.group = component
    group = codec_groups[component]
    if case == "ort_fp32":
        codec_check(group.cases, component)()
    if benchmark.disabled:
        record(benchmark, group, case)
        return
    median = group.median(case)
    record(benchmark, group, case, gflop=group.flops / 1e9, gflops=group.flops / median / 1e9,
           images_per_s=settings.batch / median,
           **speedup_info(component, case, group.median("eager_fp32") / median))
