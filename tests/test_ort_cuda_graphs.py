"""ONNX Runtime on CUDA with CUDA graphs (`cuda_graphs=True`), at the CPU tier: the backend's bookkeeping against
host-memory stand-ins for cudart and onnxruntime (tests/host_cudart.py), whose sessions replay a captured graph id's
addresses like ONNX Runtime does. Tokens are compared with the demo bundle on the real CPU provider. The real run is
in scripts/gpu_suite.sh (tests/test_tensorrt.py, ONNX Runtime CUDA cases)."""

from __future__ import annotations

import numpy as np
import pytest
from host_cudart import HostCudart, HostOrt
from maskbit_runtime import Pipeline
from maskbit_runtime.backends import cuda
from maskbit_runtime.backends import ort as ort_backend
from maskbit_runtime.backends.base import Transfers
from maskbit_runtime.cli_common import DEMO_BUNDLE

LABELS = [1, 7, 3]
STEPS = 6
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def expected():
    with Pipeline.load(DEMO_BUNDLE, threads=1) as pipe:
        return pipe.generate(LABELS, num_steps=STEPS, seed=3).tokens


@pytest.fixture
def host(monkeypatch):
    cudart = HostCudart()
    monkeypatch.setattr(cuda, "_CUDART", cudart)
    host = HostOrt(cudart)
    monkeypatch.setattr(ort_backend, "import_ort", lambda: host)
    return host


def _generate(**options):
    with Pipeline.load(DEMO_BUNDLE, providers=CUDA, **options) as pipe:
        runs = [pipe.generate(LABELS, num_steps=STEPS, seed=3) for _ in range(2)]
        stream = pipe.backend.primitives.stream
        return runs, pipe.last_transfers, pipe.info()["runtime"], stream and stream.handle


def test_graphed_steps_give_the_cpu_tokens_with_one_host_sync(host, expected):
    runs, transfers, info, stream = _generate(cuda_graphs=True)
    for run in runs:
        np.testing.assert_array_equal(run.tokens, expected)
    # per generation: 7 uploads, 2 downloads, each step's 5 rows copied into the graph's fixed inputs, 1 wait
    assert transfers == Transfers(7, 2, 5 * STEPS, 1)
    assert info["cuda_graphs"] == "on"
    step = next(s for s in host.sessions if "step.onnx" in s.real._model_path)
    assert step.cuda_options["enable_cuda_graph"] == "1"
    assert len(step.graphs) == 2                    # one graph id per ping-pong parity, reused by the second run
    assert all(s.cuda_options["user_compute_stream"] == str(stream) for s in host.sessions)


def test_without_the_row_copies_the_replays_read_stale_inputs(host, expected, monkeypatch):
    """The control: a replay reads the fixed buffers, so skipping the copies into them changes the tokens."""
    monkeypatch.setattr(cuda.Stream, "copy_device_to_device", lambda self, dst, src, nbytes: None)
    runs, _, _, _ = _generate(cuda_graphs=True)
    assert (runs[0].tokens != expected).any()


def test_a_refused_capture_runs_without_graphs_and_says_why(monkeypatch, expected):
    cudart = HostCudart()
    monkeypatch.setattr(cuda, "_CUDART", cudart)
    host = HostOrt(cudart, refuse_graphs=True)
    monkeypatch.setattr(ort_backend, "import_ort", lambda: host)
    runs, transfers, info, _ = _generate(cuda_graphs=True)
    np.testing.assert_array_equal(runs[0].tokens, expected)
    assert transfers == Transfers(7, 2, 0, 1)       # rows bound in place, still one wait
    assert info["cuda_graphs"].startswith("off for step: This session cannot use the CUDA Graph feature")
    assert all(s.cuda_options.get("enable_cuda_graph") != "1" for s in host.sessions)


def test_without_graphs_every_run_synchronizes(host, expected):
    runs, transfers, info, _ = _generate()
    np.testing.assert_array_equal(runs[0].tokens, expected)
    assert info["cuda_graphs"] == "off (cuda_graphs=False)"
    assert transfers == Transfers(7, 2, 0, STEPS + 2)    # each step, combine and the decoder
    assert all("user_compute_stream" not in s.cuda_options for s in host.sessions)
