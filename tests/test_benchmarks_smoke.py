"""The benchmark suite runs as a test (every case once, tiny models) so it cannot rot.

It runs in a subprocess rather than through `testpaths`: the suite has its own conftest (options such as
--size, session fixtures that build bundles and set torch's thread count) and needs `--benchmark-disable`,
while `pytest benchmarks --benchmark-only` (the real run) must not inherit that flag from the project config.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None,
                    reason="pytest-benchmark missing: pip install 'maskbit[dev]'")
def test_benchmark_suite_runs_at_tiny_size(tmp_path):
    command = [sys.executable, "-m", "pytest", str(BENCHMARKS), "--benchmark-disable", "--size", "tiny",
               "--agreement-steps", "2", "--generate-steps", "2", "-q", "-p", "no:cacheprovider",
               f"--basetemp={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=BENCHMARKS.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_gpu_throughput_script_runs_on_cpu_at_tiny_size(tmp_path):
    """The GPU tier's throughput script (scripts/gpu_suite.sh runs it on a GPU) with every case at tiny size on
    the CPU: what the CPU cannot run (TF32) is skipped with a reason, the rest reports its figures."""
    command = [sys.executable, str(BENCHMARKS / "gpu_throughput.py"), "--size", "tiny", "--batch", "2", "--steps",
               "2", "--rounds", "1", "--device", "cpu", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=BENCHMARKS.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert set(report["cases"]) == {"eager_fp32", "eager_bf16", "aoti_bf16"}, report["skipped"]
    assert report["skipped"] == {"eager_tf32": "TF32 exists only on CUDA"}
    for case in report["cases"].values():
        assert case["images_per_s"] > 0 and case["decoder_ms"] > 0 and case["host_syncs_per_generation"] is None
