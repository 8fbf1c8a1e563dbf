"""ONNX Runtime on CUDA (with and without CUDA graphs), at the CPU tier: the backend under the slot scheduler
against host-memory stand-ins for cudart and onnxruntime (tests/host_cudart.py), whose sessions replay a captured
graph id's addresses and shapes like ONNX Runtime does, and whose blocking copies and synchronized runs are counted.
Tokens are compared with the demo bundle on the real CPU provider; the backend's transfer counts with the slot
scheduler's contract (host_cudart.scheduled_copies) and with what the stand-ins saw. The real run is in
scripts/gpu_suite.sh (tests/test_tensorrt.py, ONNX Runtime CUDA cases)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from host_cudart import HostCudart, HostOrt, observed, offline, scheduled_copies, staggered
from maskbit_runtime import Pipeline
from maskbit_runtime.backends import cuda
from maskbit_runtime.backends import ort as ort_backend
from maskbit_runtime.backends.base import Transfers
from maskbit_runtime.cli_common import DEMO_BUNDLE

LABELS = [1, 7, 3]
STEPS = 6
SEED = 3
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def cpu():
    with Pipeline.load(DEMO_BUNDLE, threads=1) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def expected(cpu):
    return cpu.generate(LABELS, num_steps=STEPS, seed=SEED).tokens


@pytest.fixture
def host(monkeypatch) -> HostOrt:
    cudart = HostCudart()
    monkeypatch.setattr(cuda, "_CUDART", cudart)
    host = HostOrt(cudart)
    monkeypatch.setattr(ort_backend, "import_ort", lambda: host)
    return host


def with_syncs(copies: Transfers, runs: int = 0) -> Transfers:
    """ONNX Runtime on CUDA waits for every upload, once per download plus once per downloaded buffer, and after
    each of `runs` runs that synchronize (all of them without CUDA graphs)."""
    downloads = copies.device_to_host // 2              # each download fetches images and indices
    return dataclasses.replace(copies, host_syncs=copies.host_to_device + downloads + copies.device_to_host + runs)


def generate(pipe: Pipeline, cudart: HostCudart, **options) -> tuple[np.ndarray, Transfers, Transfers]:
    """Tokens, the backend's own counts and the stand-ins' observations of one generation."""
    before = observed(cudart)
    out = pipe.generate(LABELS, num_steps=STEPS, seed=SEED, **options)
    return out.tokens, pipe.last_transfers, observed(cudart) - before


def test_graphed_steps_give_the_cpu_tokens_and_count_every_copy_and_wait(host, expected):
    with Pipeline.load(DEMO_BUNDLE, providers=CUDA, cuda_graphs=True) as pipe:
        for generation in (1, 2):
            tokens, counted, seen = generate(pipe, host.cudart)
            np.testing.assert_array_equal(tokens, expected)
            copies = scheduled_copies(len(LABELS), STEPS, capacity=len(LABELS), new_lane=generation == 1)
            assert counted == seen == with_syncs(copies)
        info = pipe.info()["runtime"]
        (lane,) = pipe.backend.lanes.values()
        stream = pipe.backend.primitives.stream.handle
    assert info["cuda_graphs"] == "on" and "OrtValue.numpy()" in info["host_syncs"]
    step = host.session("step.onnx")
    assert step.cuda_options["enable_cuda_graph"] == "1"
    # one graph per (rows, parity) binding, replayed with nothing copied first (every device copy is one of
    # the scheduler's, which `seen` already matched)
    assert sorted(lane.bindings) == [(len(LABELS), 0), (len(LABELS), 1)] and len(step.graphs) == 2
    assert step.replays == 2 * STEPS - 2
    assert all(s.cuda_options["user_compute_stream"] == str(stream) for s in host.sessions)


@pytest.mark.parametrize("keys_ignore_rows", [False, True])
def test_each_row_count_replays_its_own_graph(host, cpu, monkeypatch, keys_ignore_rows):
    """Control (keys_ignore_rows): graph ids keyed by addresses alone give the 3-row steps the graph captured for
    1 row (rows of one buffer start at one address), so the images that joined later are never computed."""
    if keys_ignore_rows:
        monkeypatch.setattr(ort_backend, "graph_key", lambda component, tensors: (component, *(p for p, _ in tensors)))
    with Pipeline.load(DEMO_BUNDLE, providers=CUDA, cuda_graphs=True) as pipe:
        before = observed(host.cudart)
        jobs, scheduler = staggered(pipe, SEED)
        counted, seen = pipe.backend.transfers, observed(host.cudart) - before
        (lane,) = scheduler.lanes()
    same = [np.array_equal(job.tokens, offline(cpu, job)) for job in jobs]
    if keys_ignore_rows:
        assert not all(same)
        return
    assert all(same) and counted == seen
    assert len(host.session("step.onnx").graphs) == len(lane.bindings) == 5


def test_a_refused_capture_runs_without_graphs_and_says_why(monkeypatch, expected):
    cudart = HostCudart()
    monkeypatch.setattr(cuda, "_CUDART", cudart)
    host = HostOrt(cudart, refuse_graphs=True)
    monkeypatch.setattr(ort_backend, "import_ort", lambda: host)
    with Pipeline.load(DEMO_BUNDLE, providers=CUDA, cuda_graphs=True) as pipe:
        tokens, counted, seen = generate(pipe, cudart)
        info = pipe.info()["runtime"]
    np.testing.assert_array_equal(tokens, expected)
    assert counted == seen == with_syncs(scheduled_copies(len(LABELS), STEPS, len(LABELS), new_lane=True))
    assert info["cuda_graphs"].startswith("off for step: This session cannot use the CUDA Graph feature")
    assert all(s.cuda_options.get("enable_cuda_graph") != "1" for s in host.sessions)


def test_without_graphs_every_run_synchronizes(host, expected):
    with Pipeline.load(DEMO_BUNDLE, providers=CUDA, cuda_graphs=False) as pipe:
        tokens, counted, seen = generate(pipe, host.cudart)
        info = pipe.info()["runtime"]
    np.testing.assert_array_equal(tokens, expected)
    assert info["cuda_graphs"] == "off (cuda_graphs=False)"
    runs = STEPS + 2                                    # each step, combine and the decoder
    assert counted == seen == with_syncs(scheduled_copies(len(LABELS), STEPS, len(LABELS), new_lane=True), runs)
    assert all("user_compute_stream" in s.cuda_options for s in host.sessions)


def test_without_the_device_copies_the_tokens_change(host, expected, monkeypatch):
    """Control: admission writes the masked tokens into the rows and retirement hands the sampled groups to
    combine + decode with device copies; dropping them changes the result."""
    monkeypatch.setattr(cuda.Stream, "copy_device_to_device", lambda self, dst, src, nbytes: None)
    with Pipeline.load(DEMO_BUNDLE, providers=CUDA, cuda_graphs=True) as pipe:
        tokens, _, _ = generate(pipe, host.cudart)
    assert (tokens != expected).any()
