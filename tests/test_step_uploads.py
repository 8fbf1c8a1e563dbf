"""Staged generations: every step's noise and scalars uploaded once per generation, steps reading their rows.

CPU tier. On ONNX Runtime (CPU) with the demo bundle: the staged path gives the per-step path's tokens, and the
copies a generation makes no longer grow with its number of steps. On the host-memory stand-ins for cudart and
TensorRT (tests/host_cudart.py): the byte arithmetic of rows, page-locked buffers and device copies, and the CUDA
graph bookkeeping of the TensorRT backend (one capture per parity, a replay per step, re-capture when the batch
changes, plain execution when a capture fails), checked token for token against ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from host_cudart import GPU, TENSORRT_VERSION, FakeTensorRT, HostCudart
from maskbit_runtime import Pipeline
from maskbit_runtime.backends import BackendError, Executor, cuda
from maskbit_runtime.backends import tensorrt as tensorrt_backend
from maskbit_runtime.backends.base import Transfers, row_length
from maskbit_runtime.cli import main as run_cli
from maskbit_runtime.cli_common import DEMO_BUNDLE
from maskbit_runtime.loop import sample
from maskbit_runtime.manifest import Manifest, sha256_file

LABELS = [1, 7, 3]
STEPS = 8
H2D, D2H, D2D = 1, 2, 3          # the stand-in's cudaMemcpyKind values


@pytest.fixture(scope="module")
def pipe():
    with Pipeline.load(DEMO_BUNDLE, threads=1) as pipe:
        yield pipe


def per_step(pipe: Pipeline, labels, seed: int = 5, batch_size: int | None = None,
             **overrides) -> tuple[np.ndarray, Transfers]:
    """The reference path: the loop drives the executor's stepper, which uploads each step's inputs as it runs."""
    settings = pipe.sampling.with_overrides(num_steps=overrides.pop("num_steps", STEPS), **overrides)
    dims = pipe.manifest.dims
    before = pipe.backend.transfers.copy()
    parts = sample(lambda batch: pipe.backend.stepper(batch, settings.uses_guidance), pipe.backend.finish,
                   np.asarray(labels), settings, seed, dims.num_tokens, dims.num_groups,
                   batch_size or pipe.manifest.max_batch("step"))
    return np.concatenate([tokens for _, tokens in parts]), pipe.backend.transfers - before


# ---------------------------------------------------------------- ONNX Runtime on the CPU


@pytest.mark.parametrize("guidance_scale, batch_size", [(None, None), (0.0, None), (None, 2)])
def test_staged_generation_gives_the_per_step_tokens(pipe, guidance_scale, batch_size):
    staged = pipe.generate(LABELS, num_steps=STEPS, guidance_scale=guidance_scale, seed=5, batch_size=batch_size)
    expected, _ = per_step(pipe, LABELS, batch_size=batch_size, guidance_scale=guidance_scale)
    np.testing.assert_array_equal(staged.tokens, expected)
    other_seed, _ = per_step(pipe, LABELS, seed=6, guidance_scale=guidance_scale)
    assert (other_seed != expected).any()            # the comparison can tell generations apart


@pytest.mark.parametrize("batch_size, batches", [(None, 1), (2, 2)])
def test_uploads_per_generation_do_not_grow_with_the_steps(pipe, batch_size, batches):
    for steps in (4, 16):
        pipe.generate(LABELS, num_steps=steps, seed=0, batch_size=batch_size)
        # per batch: masked tokens, labels, then one stack each of noise and the four scalars; images, indices
        assert pipe.last_transfers == Transfers(host_to_device=7 * batches, device_to_host=2 * batches)
        _, reference = per_step(pipe, LABELS, num_steps=steps, batch_size=batch_size)
        assert reference == Transfers(host_to_device=(2 + 5 * steps) * batches, device_to_host=2 * batches)


def test_staged_buffers_are_made_once_per_batch_and_steps(pipe, monkeypatch):
    pipe.generate(LABELS, num_steps=STEPS, seed=0)
    made = []
    allocate = pipe.backend.primitives.allocate
    monkeypatch.setattr(pipe.backend.primitives, "allocate", lambda *a: made.append(a) or allocate(*a))
    progress = []
    pipe.generate(LABELS, num_steps=STEPS, seed=1, on_step=progress.append)
    assert made == [] and progress == list(range(STEPS))
    pipe.generate(LABELS, num_steps=STEPS + 1, seed=1)
    dims = pipe.manifest.dims
    noise = (len(LABELS), dims.num_tokens, dims.num_groups, 2)
    assert made == [((STEPS + 1, row_length(noise, "float32")), "float32"), ((STEPS + 1, 64), "float32"),
                    ((STEPS + 1, 64), "float32"), ((STEPS + 1, 64), "float32"), ((STEPS + 1, 32), "int64")]


def test_rows_start_256_byte_aligned():
    assert row_length((), "float32") == 64 and row_length((), "int64") == 32
    assert row_length((3, 5, 2), "float32") == 64               # 120 bytes padded to 256
    assert row_length((2, 64, 2, 2), "float32") == 512           # 2048 bytes: no padding


def test_ort_rows_point_inside_the_stack(pipe):
    primitives = pipe.backend.primitives
    stack = primitives.allocate((4, 64), "float32")
    row = primitives.view(stack, 3, (2, 5))
    assert row.ptr - stack.data_ptr() == 3 * 256 and row.shape == (2, 5) and row.dtype == np.float32
    with pytest.raises(ValueError, match="cannot hold"):
        primitives.view(stack, 4, (2, 5))


def test_transfer_counts_are_measured_and_shown_by_info(pipe):
    counts = pipe.transfer_counts()
    assert counts["fixed"] == dataclasses.asdict(Transfers(host_to_device=7, device_to_host=2))
    assert not any(counts["per_step"].values())
    assert counts["summary"] == ("per generation: 7 host->device copies, 2 device->host copies, "
                                 "0 device->device copies, 0 host syncs")
    result = CliRunner().invoke(run_cli, ["info", "--bundle", str(DEMO_BUNDLE)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["per_generation"]["summary"] == counts["summary"]
    quiet = CliRunner().invoke(run_cli, ["info", "--bundle", str(DEMO_BUNDLE), "--no-measure-transfers"])
    assert "per_generation" not in json.loads(quiet.output)


# ---------------------------------------------------------------- the host-memory cudart stand-in


@pytest.fixture
def fake(monkeypatch) -> HostCudart:
    fake = HostCudart()
    monkeypatch.setattr(cuda, "_CUDART", fake)
    return fake


def test_rows_pinned_buffers_and_device_copies_do_the_byte_arithmetic(fake):
    stream = cuda.Stream(0)
    stack = cuda.Device((3, row_length((2, 5), "float32")), "float32", stream)           # rows of 256 bytes
    host = cuda.Pinned(stack.shape, stack.dtype, stream)
    host.array[...] = np.arange(3 * 64).reshape(3, 64)
    host.upload(stack)
    rows = [stack.row(i, (2, 5)) for i in range(3)]
    assert [r.ptr - stack.ptr for r in rows] == [0, 256, 512] and rows[2].nbytes == 40
    fixed = cuda.Device((2, 5), "float32", stream)
    fixed.copy_from(rows[2])
    back = cuda.Pinned((2, 5), "float32", stream)
    back.download(fixed)
    np.testing.assert_array_equal(back.array, np.arange(128, 138).reshape(2, 5))
    assert fake.copies == {H2D: 1, D2D: 1, D2H: 1}
    scalars = cuda.Device((4, 32), "int64", stream)
    assert scalars.row(2, ()).ptr - scalars.ptr == 512 and scalars.row(2, ()).shape == ()
    with pytest.raises(ValueError, match="cannot hold"):
        stack.row(3, (2, 5))
    with pytest.raises(ValueError, match="cannot hold"):
        stack.row(0, (8, 9))
    with pytest.raises(ValueError, match="cannot copy"):
        fixed.copy_from(stack.row(0, (10,)))
    with pytest.raises(ValueError, match="differ"):
        back.upload(stack)

    fake.events_stay_pending = True              # the copy out of `host` is still in flight
    host.upload(stack)
    assert host.wait() and fake.event_waits == 1 and not host.wait()
    ptr = host.ptr
    host.free()
    host.free()
    assert fake.freed_pinned == [ptr] and host.array is None


def test_graph_cache_captures_once_per_key_replays_and_falls_back(fake):
    stream = cuda.Stream(0)
    src, other, dst = (cuda.Device((4,), "int64", stream) for _ in range(3))
    src.upload(np.array([1, 2, 3, 4]))
    other.upload(np.array([9, 9, 9, 9]))
    reads = [src]
    enqueue = lambda: dst.copy_from(reads[0])
    graphs = cuda.GraphCache(stream)
    graphs.run("parity 0", enqueue)              # runs plainly, then captures without running again
    np.testing.assert_array_equal(dst.download(), [1, 2, 3, 4])
    assert (fake.captures, fake.launches, fake.copies[D2D]) == (1, 0, 2)
    src.upload(np.array([5, 6, 7, 8]))
    graphs.run("parity 0", enqueue)
    np.testing.assert_array_equal(dst.download(), [5, 6, 7, 8])
    reads[0] = other                             # a graph replays the address it captured, not the new one:
    graphs.run("parity 0", enqueue)              # why staged rows are first copied into fixed buffers
    np.testing.assert_array_equal(dst.download(), [5, 6, 7, 8])
    graphs.run("parity 1", enqueue)
    assert (fake.captures, fake.launches) == (2, 2)
    graphs.clear()
    assert fake.destroyed == 2 and not graphs.graphs

    fake.refuse_capture = True
    graphs.run("parity 0", enqueue)
    np.testing.assert_array_equal(dst.download(), [9, 9, 9, 9])        # ran plainly
    assert graphs.off.startswith("CUDA graph capture failed, running without graphs: CUDA call "
                                 "cudaStreamBeginCapture failed: cudaErrorStreamCaptureUnsupported")
    fake.refuse_capture = False
    graphs.run("parity 0", enqueue)
    assert (fake.captures, fake.launches) == (2, 2) and "\n" not in graphs.off


def test_a_failure_inside_a_capture_ends_it_and_is_the_reason(fake):
    stream = cuda.Stream(0)

    def enqueue():
        if stream.handle in fake.capturing:
            raise BackendError("TensorRT failed to enqueue step")
    graphs = cuda.GraphCache(stream)
    graphs.run("key", enqueue)
    assert not fake.capturing and fake.captures == 0
    assert graphs.off == "CUDA graph capture failed, running without graphs: TensorRT failed to enqueue step"


# ---------------------------------------------------------------- TensorRT primitives on the stand-ins


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    """The demo bundle with stand-in engine files (each holds its component's name) recorded in its manifest."""
    root = shutil.copytree(DEMO_BUNDLE, tmp_path_factory.mktemp("trt") / "bundle")
    manifest = Manifest.load(root)
    components = {}
    for name, entry in manifest.components.items():
        (root / f"{name}.engine").write_bytes(name.encode())
        components[name] = dataclasses.replace(entry, engine=f"{name}.engine", tensorrt_version=TENSORRT_VERSION,
                                               engine_sha256=sha256_file(root / f"{name}.engine"), gpu=GPU)
    return manifest.replace(components=components)


def open_tensorrt(monkeypatch, fake: HostCudart, manifest: Manifest, **options) -> tuple[Pipeline, FakeTensorRT]:
    trt = FakeTensorRT(fake, manifest.root, manifest.dims)
    monkeypatch.setattr(tensorrt_backend, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tensorrt_backend, "gpu_info", lambda device: dict(GPU))
    return Pipeline(manifest, Executor(tensorrt_backend.TensorRTPrimitives(manifest, **options), manifest)), trt


def test_tensorrt_graphs_capture_each_parity_once_and_replay_every_other_step(pipe, trt_bundle, fake, monkeypatch):
    expected, _ = per_step(pipe, LABELS)
    trt_pipe, trt = open_tensorrt(monkeypatch, fake, trt_bundle)
    with trt_pipe:
        for generation in (1, 2):
            out = trt_pipe.generate(LABELS, num_steps=STEPS, seed=5)
            np.testing.assert_array_equal(out.tokens, expected)
            assert (fake.captures, fake.launches) == (2, generation * STEPS - 2)     # steps 0 and 1 captured
            # one host sync, after the downloads; each step's five rows copied into the graphs' fixed buffers
            assert trt_pipe.last_transfers == Transfers(7, 2, 5 * STEPS, 1)
        assert trt.runs == 2 * (STEPS + 2)       # every step ran once (plainly or replayed), then combine, decode
        assert fake.copies[H2D] == 14 and fake.syncs == 2
        assert trt_pipe.info()["runtime"]["cuda_graphs"] == "on"
        reference, counts = per_step(trt_pipe, LABELS)     # the per-step path replays graphs of its own buffers
        np.testing.assert_array_equal(reference, expected)
        assert counts == Transfers(2 + 5 * STEPS, 2, 0, 1) and fake.captures == 4


def test_tensorrt_graphs_are_recaptured_when_the_batch_changes(pipe, trt_bundle, fake, monkeypatch):
    expected, _ = per_step(pipe, LABELS)
    trt_pipe, _ = open_tensorrt(monkeypatch, fake, trt_bundle)
    with trt_pipe:
        for generation in (1, 2):                       # batches of 2 and 1: each batch change re-captures
            out = trt_pipe.generate(LABELS, num_steps=STEPS, seed=5, batch_size=2)
            np.testing.assert_array_equal(out.tokens, expected)
            assert fake.captures == 4 * generation and fake.launches == 2 * (STEPS - 2) * generation
            assert fake.destroyed == 4 * generation - 2
            assert trt_pipe.last_transfers == Transfers(14, 4, 2 * 5 * STEPS, 2)


@pytest.mark.parametrize("failure, reason", [
    ("refuse_capture", "cudaStreamBeginCapture failed: cudaErrorStreamCaptureUnsupported"),
    ("fail_enqueue_in_capture", "TensorRT failed to enqueue step")])
def test_tensorrt_runs_without_graphs_when_a_capture_fails(pipe, trt_bundle, fake, monkeypatch, failure, reason):
    expected, _ = per_step(pipe, LABELS)
    trt_pipe, trt = open_tensorrt(monkeypatch, fake, trt_bundle)
    setattr(fake if failure == "refuse_capture" else trt, failure, True)
    with trt_pipe:
        first = trt_pipe.generate(LABELS, num_steps=STEPS, seed=5)
        again = trt_pipe.generate(LABELS, num_steps=STEPS, seed=5)
        graphs = trt_pipe.info()["runtime"]["cuda_graphs"]
    np.testing.assert_array_equal(first.tokens, expected)
    np.testing.assert_array_equal(again.tokens, expected)
    assert (fake.captures, fake.launches) == (0, 0)
    assert graphs.startswith("off (step: CUDA graph capture failed") and reason in graphs
    assert trt_pipe.last_transfers == Transfers(7, 2, 0, 1)          # without graphs, steps bind their rows


def test_tensorrt_without_graphs_binds_rows_directly(pipe, trt_bundle, fake, monkeypatch):
    expected, _ = per_step(pipe, LABELS)
    trt_pipe, _ = open_tensorrt(monkeypatch, fake, trt_bundle, cuda_graphs=False)
    with trt_pipe:
        out = trt_pipe.generate(LABELS, num_steps=STEPS, seed=5)
        assert trt_pipe.info()["runtime"]["cuda_graphs"] == "off (cuda_graphs=False)"
    np.testing.assert_array_equal(out.tokens, expected)
    assert trt_pipe.last_transfers == Transfers(7, 2, 0, 1) and fake.captures == 0


def test_replayed_steps_really_read_the_copied_rows(pipe, trt_bundle, fake, monkeypatch):
    """Control: without the device copies of the rows, replayed steps read stale inputs and the tokens change."""
    expected, _ = per_step(pipe, LABELS)
    trt_pipe, _ = open_tensorrt(monkeypatch, fake, trt_bundle)
    monkeypatch.setattr(cuda.Device, "copy_from", lambda self, source: None)
    with trt_pipe:
        out = trt_pipe.generate(LABELS, num_steps=STEPS, seed=5)
    assert (out.tokens != expected).any()


def test_pinned_staging_waits_for_a_copy_still_in_flight(trt_bundle, fake, monkeypatch):
    trt_pipe, _ = open_tensorrt(monkeypatch, fake, trt_bundle)
    with trt_pipe:
        stepper = trt_pipe.backend.stepper(len(LABELS))
        fake.events_stay_pending = True
        before = trt_pipe.backend.transfers.copy()
        stepper.start(np.array(LABELS))
        assert fake.event_waits == 0
        stepper.start(np.array(LABELS))                 # rewrites the page-locked arrays of the first start
        assert fake.event_waits == 2 and trt_pipe.backend.transfers - before == Transfers(4, 0, 0, 2)
