"""What a generation moves between host and device, on the primitives the slot scheduler drives.

CPU tier. On ONNX Runtime (CPU) with the demo bundle: the tokens equal the eager sampler's, every generation makes
the copies of the scheduler's contract (tests/host_cudart.py `scheduled_copies`, derived from the number of images,
steps and slots), buffers are made once per lane whatever the step count, row ranges are bounds-checked addresses,
and `maskbit-run info` reports the counts. On the host-memory stand-ins for cudart and TensorRT
(tests/host_cudart.py): the byte arithmetic of row ranges, page-locked buffers and device copies, and the TensorRT
backend under the scheduler (one capture per (rows, parity) binding, replays with nothing copied first, re-capture
when the rows change, plain execution when a capture fails), token for token against ONNX Runtime, with counts
that equal both the contract and what the stand-in saw.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from host_cudart import (GPU, TENSORRT_VERSION, FakeTensorRT, HostCudart, observed, offline, scheduled_copies,
                         staggered)
from maskbit_runtime import Pipeline
from maskbit_runtime.backends import BackendError, Executor, cuda
from maskbit_runtime.backends import tensorrt as tensorrt_backend
from maskbit_runtime.backends.base import Transfers, put
from maskbit_runtime.cli import main as run_cli
from maskbit_runtime.cli_common import DEMO_BUNDLE
from maskbit_runtime.manifest import Manifest, sha256_file
from maskbit_runtime.specs import STEP_SETTINGS

import maskbit

LABELS = [1, 7, 3]
STEPS = 8
SEED = 5
H2D, D2H, D2D = 1, 2, 3          # the stand-in's cudaMemcpyKind values


@pytest.fixture(scope="module")
def pipe():
    with Pipeline.load(DEMO_BUNDLE, threads=1) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def expected(pipe):
    return pipe.generate(LABELS, num_steps=STEPS, seed=SEED).tokens


# ---------------------------------------------------------------- ONNX Runtime on the CPU


@pytest.mark.parametrize("guidance_scale", [None, 0.0])
def test_cpu_tokens_equal_the_eager_samplers(pipe, guidance_scale):
    tok = maskbit.load_tokenizer(maskbit.DEMO_DIR / "tokenizer.safetensors")
    gen = maskbit.load_generator(maskbit.DEMO_DIR / "generator.safetensors", "demo64")
    eager = maskbit.generate(tok, gen, labels=LABELS, num_steps=STEPS, guidance_scale=guidance_scale, seed=SEED)
    out = pipe.generate(LABELS, num_steps=STEPS, guidance_scale=guidance_scale, seed=SEED)
    np.testing.assert_array_equal(out.tokens, eager.tokens)
    assert (pipe.generate(LABELS, num_steps=STEPS, guidance_scale=guidance_scale, seed=SEED + 1).tokens
            != eager.tokens).any()                      # the comparison can tell generations apart


@pytest.mark.parametrize("guidance_scale, batch_size", [(None, None), (0.0, None), (None, 2)])
def test_copies_per_generation_follow_the_scheduler(guidance_scale, batch_size):
    with Pipeline.load(DEMO_BUNDLE, threads=1) as fresh:
        capacity = batch_size or fresh.manifest.max_batch("step")
        for steps, new_lane in [(4, True), (4, False), (16, False)]:
            fresh.generate(LABELS, num_steps=steps, guidance_scale=guidance_scale, seed=0, batch_size=batch_size)
            # on the CPU nothing runs asynchronously: no host syncs
            assert fresh.last_transfers == scheduled_copies(len(LABELS), steps, capacity, new_lane)


def test_buffers_are_made_once_per_lane_whatever_the_steps(pipe, monkeypatch):
    pipe.generate(LABELS, num_steps=STEPS, seed=0)
    made = []
    allocate = pipe.backend.primitives.allocate
    monkeypatch.setattr(pipe.backend.primitives, "allocate", lambda *a: made.append(a) or allocate(*a))
    progress = []
    pipe.generate(LABELS, num_steps=STEPS, seed=1, on_step=progress.append)
    pipe.generate(LABELS, num_steps=2 * STEPS, seed=1)
    assert made == [] and progress == list(range(STEPS))


def test_ort_rows_are_bounds_checked_addresses_inside_the_buffer(pipe):
    ex = pipe.backend.primitives
    buffer = ex.allocate((4, 3, 2), "int64")
    row_bytes = 3 * 2 * 8
    middle = ex.rows(buffer, 1, 2)
    assert middle.ptr - buffer.data_ptr() == row_bytes and middle.shape == (2, 3, 2) and middle.dtype == np.int64
    inner = ex.rows(middle, 1, 1)
    assert inner.ptr - buffer.data_ptr() == 2 * row_bytes and inner.shape == (1, 3, 2)
    for source, start, count in [(buffer, 3, 2), (buffer, -1, 1), (buffer, 0, 0), (middle, 1, 2)]:
        with pytest.raises(ValueError, match="do not exist"):
            ex.rows(source, start, count)
    with pytest.raises(ValueError, match="do not exist"):
        ex.rows(ex.allocate((), "float32"), 0, 1)
    put(ex, buffer, np.arange(24).reshape(4, 3, 2))
    ex.copy(ex.rows(buffer, 2, 2), ex.rows(buffer, 0, 2))            # disjoint ranges of one buffer
    (back,) = ex.download(buffer)
    np.testing.assert_array_equal(back, np.arange(24).reshape(4, 3, 2)[[0, 1, 0, 1]])
    with pytest.raises(ValueError, match="cannot copy"):
        ex.copy(ex.rows(buffer, 0, 1), ex.rows(buffer, 1, 2))


def test_transfer_counts_are_measured_and_shown_by_info():
    one = scheduled_copies(1, 2, 1)
    per_step = 1 + len(STEP_SETTINGS)
    fixed = dataclasses.replace(one, host_to_device=one.host_to_device - 2 * per_step)
    summary = (f"per generation: {fixed.summary()}; plus per step: {Transfers(host_to_device=per_step).summary()}")
    with Pipeline.load(DEMO_BUNDLE, threads=1) as fresh:           # its first generation also makes the lane
        counts = fresh.transfer_counts()
    assert counts["fixed"] == dataclasses.asdict(fixed) == dataclasses.asdict(Transfers(2, 2, 2, 0))
    assert counts["per_step"] == dataclasses.asdict(Transfers(host_to_device=per_step))
    assert counts["summary"] == summary
    result = CliRunner().invoke(run_cli, ["info", "--bundle", str(DEMO_BUNDLE)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["per_generation"]["summary"] == summary
    assert info["runtime"]["host_syncs"].startswith("none: on the CPU")
    quiet = CliRunner().invoke(run_cli, ["info", "--bundle", str(DEMO_BUNDLE), "--no-count-transfers"])
    assert "per_generation" not in json.loads(quiet.output)


# ---------------------------------------------------------------- the host-memory cudart stand-in


@pytest.fixture
def fake(monkeypatch) -> HostCudart:
    fake = HostCudart()
    monkeypatch.setattr(cuda, "_CUDART", fake)
    return fake


def test_rows_pinned_buffers_and_device_copies_do_the_byte_arithmetic(fake):
    stream = cuda.Stream(0)
    buffer = cuda.Device((3, 2, 5), "float32", stream)                # rows of 40 bytes
    host = cuda.Pinned(buffer.shape, buffer.dtype, stream)
    host.array[...] = np.arange(30).reshape(3, 2, 5)
    host.upload(buffer)
    tail = buffer.rows(1, 2)
    assert tail.ptr - buffer.ptr == 40 and tail.shape == (2, 2, 5) and tail.nbytes == 80
    assert tail.rows(1, 1).ptr - buffer.ptr == 80 and tail.rows(1, 1).stream is stream
    last = cuda.Device((1, 2, 5), "float32", stream)
    last.copy_from(tail.rows(1, 1))
    back = cuda.Pinned(last.shape, last.dtype, stream)
    back.download(last)
    np.testing.assert_array_equal(back.array, np.arange(20, 30).reshape(1, 2, 5))
    assert fake.copies == {H2D: 1, D2D: 1, D2H: 1}
    for source, start, count in [(buffer, 3, 1), (buffer, 2, 2), (buffer, -1, 1), (buffer, 0, 0), (tail, 1, 2)]:
        with pytest.raises(ValueError, match="do not exist"):
            source.rows(start, count)
    with pytest.raises(ValueError, match="do not exist"):
        cuda.Device((), "float32", stream).rows(0, 1)
    with pytest.raises(ValueError, match="cannot copy"):
        last.copy_from(buffer.rows(0, 2))
    with pytest.raises(ValueError, match="differ"):
        back.upload(buffer)

    fake.events_stay_pending = True              # the copy out of `host` is still in flight
    host.upload(buffer)
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
    graphs.run("parity 0", enqueue)              # why every binding reads fixed addresses, keyed with them
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


def generate(trt_pipe: Pipeline, fake: HostCudart, **options) -> tuple[np.ndarray, Transfers, Transfers]:
    """Tokens, the backend's own counts and the stand-in's observations of one generation."""
    before = observed(fake)
    out = trt_pipe.generate(LABELS, num_steps=STEPS, seed=SEED, **options)
    return out.tokens, trt_pipe.last_transfers, observed(fake) - before


def with_syncs(copies: Transfers) -> Transfers:
    """TensorRT waits once per download (images and indices together), when nothing else was in flight."""
    return dataclasses.replace(copies, host_syncs=copies.device_to_host // 2)


def test_tensorrt_graphs_capture_each_rows_and_parity_once_and_replay(expected, trt_bundle, fake, monkeypatch):
    trt_pipe, trt = open_tensorrt(monkeypatch, fake, trt_bundle)
    with trt_pipe:
        for generation in (1, 2):
            tokens, counted, seen = generate(trt_pipe, fake)
            np.testing.assert_array_equal(tokens, expected)
            copies = scheduled_copies(len(LABELS), STEPS, len(LABELS), new_lane=generation == 1)
            assert counted == seen == with_syncs(copies)
            assert (fake.captures, fake.launches) == (2, generation * STEPS - 2)     # steps 0 and 1 captured
        (lane,) = trt_pipe.backend.lanes.values()
        info = trt_pipe.info()["runtime"]
    assert sorted(lane.bindings) == [(len(LABELS), 0), (len(LABELS), 1)]
    assert trt.runs == 2 * (STEPS + 2)       # every step ran once (plainly or replayed), then combine, decode
    assert info["cuda_graphs"] == "on" and info["host_syncs"].startswith("the host's waits per generation")


def test_tensorrt_graphs_are_recaptured_when_the_rows_change(expected, trt_bundle, fake, monkeypatch):
    trt_pipe, _ = open_tensorrt(monkeypatch, fake, trt_bundle)
    with trt_pipe:
        for generation in (1, 2):                       # rounds of 2 rows and 1: each change re-captures
            tokens, counted, seen = generate(trt_pipe, fake, batch_size=2)
            np.testing.assert_array_equal(tokens, expected)
            assert fake.captures == 4 * generation and fake.launches == 2 * (STEPS - 2) * generation
            assert fake.destroyed == 4 * generation - 2
            assert counted == seen == with_syncs(scheduled_copies(len(LABELS), STEPS, 2, new_lane=generation == 1))


def test_tensorrt_gives_every_staggered_image_its_offline_tokens(pipe, trt_bundle, fake, monkeypatch):
    trt_pipe, _ = open_tensorrt(monkeypatch, fake, trt_bundle)
    with trt_pipe:
        before = observed(fake)
        jobs, _ = staggered(trt_pipe, SEED)
        counted, seen = trt_pipe.backend.transfers, observed(fake) - before
    for job in jobs:
        np.testing.assert_array_equal(job.tokens, offline(pipe, job))
    assert counted == seen and fake.launches > 0


@pytest.mark.parametrize("failure, reason", [
    ("refuse_capture", "cudaStreamBeginCapture failed: cudaErrorStreamCaptureUnsupported"),
    ("fail_enqueue_in_capture", "TensorRT failed to enqueue step")])
def test_tensorrt_runs_without_graphs_when_a_capture_fails(expected, trt_bundle, fake, monkeypatch, failure, reason):
    trt_pipe, trt = open_tensorrt(monkeypatch, fake, trt_bundle)
    setattr(fake if failure == "refuse_capture" else trt, failure, True)
    with trt_pipe:
        first, _, _ = generate(trt_pipe, fake)
        again, counted, seen = generate(trt_pipe, fake)
        graphs = trt_pipe.info()["runtime"]["cuda_graphs"]
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(again, expected)
    assert (fake.captures, fake.launches) == (0, 0)
    assert graphs.startswith("off (step: CUDA graph capture failed") and reason in graphs
    assert counted == seen == with_syncs(scheduled_copies(len(LABELS), STEPS, len(LABELS)))


def test_tensorrt_without_graphs(expected, trt_bundle, fake, monkeypatch):
    trt_pipe, _ = open_tensorrt(monkeypatch, fake, trt_bundle, cuda_graphs=False)
    with trt_pipe:
        tokens, counted, seen = generate(trt_pipe, fake)
        assert trt_pipe.info()["runtime"]["cuda_graphs"] == "off (cuda_graphs=False)"
    np.testing.assert_array_equal(tokens, expected)
    assert counted == seen == with_syncs(scheduled_copies(len(LABELS), STEPS, len(LABELS), new_lane=True))
    assert fake.captures == 0


def test_without_the_device_copies_the_tokens_change(expected, trt_bundle, fake, monkeypatch):
    """Control: admission writes the masked tokens into the rows and retirement hands the sampled groups to
    combine + decode with device copies; a `copy` that does nothing changes the result."""
    trt_pipe, _ = open_tensorrt(monkeypatch, fake, trt_bundle)
    monkeypatch.setattr(tensorrt_backend.TensorRTPrimitives, "copy", lambda self, target, source: None)
    with trt_pipe:
        tokens, _, _ = generate(trt_pipe, fake)
    assert (tokens != expected).any()


def test_staging_waits_for_an_upload_still_in_flight_and_counts_it(expected, trt_bundle, fake, monkeypatch):
    """Each step rewrites the page-locked arrays of its parity (noise and the settings), whose uploads two steps
    earlier the stand-in keeps "in flight" until the download's stream sync: each such wait is a host sync."""
    trt_pipe, _ = open_tensorrt(monkeypatch, fake, trt_bundle)
    with trt_pipe:
        fake.events_stay_pending = True
        for generation in (1, 2):
            tokens, counted, seen = generate(trt_pipe, fake)
            np.testing.assert_array_equal(tokens, expected)
            waits = (1 + len(STEP_SETTINGS)) * (STEPS - 2)
            copies = scheduled_copies(len(LABELS), STEPS, len(LABELS), new_lane=generation == 1)
            assert counted == seen == dataclasses.replace(copies, host_syncs=1 + waits)
        ex = trt_pipe.backend.primitives
        buffer = ex.allocate((2,), "int64")
        before = fake.event_waits
        put(ex, buffer, np.array([1, 2]))
        put(ex, buffer, np.array([3, 4]))              # rewrites the array of an upload still in flight
        assert fake.event_waits - before == 1 and ex.download(buffer)[0].tolist() == [3, 4]
