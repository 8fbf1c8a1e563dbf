"""The tokenizer's decoder (indices -> uint8 images) and encoder (images -> indices), eager vs the runtime."""

from __future__ import annotations

import pytest
from harness import record


@pytest.mark.parametrize("component", ("decoder", "encoder"))
@pytest.mark.parametrize("case", ("eager_fp32", "ort_fp32"))
def test_codec(benchmark, codec_groups, settings, component, case):
    benchmark.group = component
    group = codec_groups[component]
    if benchmark.disabled:
        record(benchmark, group, case)
        return
    median = group.median(case)
    record(benchmark, group, case, gflop=group.flops / 1e9, gflops=group.flops / median / 1e9,
           images_per_s=settings.batch / median, speedup_vs_eager=group.median("eager_fp32") / median)
