"""TensorRT engines and GPU backends.

The CPU tier checks what runs without TensorRT: the one-line errors of a missing TensorRT, the engine/GPU
compatibility rule and checked CUDA calls (the types of fp16/bf16 graphs: tests/test_cast_precision.py). The
`tensorrt`/`gpu` tier needs TensorRT, cuda-python and a CUDA device (scripts/gpu_suite.sh runs it): it compares the
fp32 TensorRT and ONNX Runtime CUDA pipelines with the eager sampler token for token, and holds tf32, fp16 and bf16
engines (and ONNX Runtime CUDA with TF32) to the distribution gate against eager float32.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from host_cudart import HostCudart, scheduled_copies
from maskbit_export.cli import main as export_cli
from maskbit_runtime import Pipeline
from maskbit_runtime.backends import BackendError, open_backend
from maskbit_runtime.backends.tensorrt import check_engines
from maskbit_runtime.manifest import Manifest

import maskbit

LABELS = [1, 2, 3]
STEPS = 8


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'maskbit[tensorrt]'; its libraries come from NVIDIA's index)"
    return None


def _gpu_missing() -> str | None:
    try:
        from maskbit_runtime.backends.cuda import gpu_info
        gpu_info(0)
    except BackendError as exc:
        return str(exc)
    return None


def _ort_cuda_missing() -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        return "needs onnxruntime-gpu with CUDAExecutionProvider and a CUDA GPU (pip install 'maskbit[gpu]')"
    return None


TRT_MISSING = _tensorrt_missing()
GPU_MISSING = _gpu_missing()
ORT_CUDA_MISSING = _ort_cuda_missing()       # decided before any fixture exports a bundle


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return maskbit.build_tokenizer("tiny_lfq10"), maskbit.build_generator("tiny_lfq10")


def _export(models, root, *extra):
    """`maskbit-export build-engines` on saved tiny checkpoints (max batch 4)."""
    tok, gen = models
    preset = maskbit.get_preset("tiny_lfq10")
    maskbit.save_tokenizer(tok, root / "tok.safetensors", preset)
    maskbit.save_generator(gen, root / "gen.safetensors", preset)
    out = root / "bundle"
    result = CliRunner().invoke(export_cli, [
        "build-engines", "--tokenizer", str(root / "tok.safetensors"), "--generator", str(root / "gen.safetensors"),
        "--config", "tiny_lfq10", "--out", str(out), "--max-batch", "4", "--no-verify", *extra])
    return out, result


@pytest.fixture(scope="module")
def cli_run(models, tmp_path_factory):
    """An ONNX bundle, exported by the CLI."""
    out, result = _export(models, tmp_path_factory.mktemp("onnx"))
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="module")
def eager(models):
    tok, gen = models
    return maskbit.generate(tok, gen, labels=LABELS, seed=0, num_steps=STEPS)


# ---------------------------------------------------------------- CPU tier: no TensorRT needed


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is installed here; this checks the error without it")
def test_build_engines_without_tensorrt_fails_in_one_line_before_exporting(models, tmp_path):
    out, result = _export(models, tmp_path, "--backend", "tensorrt")
    assert result.exit_code == 1, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: ") and "pip install 'maskbit[tensorrt]'" in error
    assert "Traceback" not in result.output + result.stderr
    assert not out.exists() and "exporting" not in result.stderr        # failed before the long export


def test_engine_precision_needs_the_tensorrt_backend(models, tmp_path):
    out, result = _export(models, tmp_path, "--engine-precision", "bf16")
    assert result.exit_code == 2 and "--engine-precision applies to engines" in result.output
    assert not out.exists()


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT is installed here; this checks the error without it")
def test_tensorrt_backend_without_tensorrt_names_the_extra(cli_run):
    out, _ = cli_run
    with pytest.raises(BackendError, match=r"pip install 'maskbit\[tensorrt\]'"):
        open_backend("tensorrt", Manifest.load(out), trust_native_code=True)
    with pytest.raises(BackendError, match=r"maskbit\[tensorrt\]"):
        Pipeline.load(out, backend="tensorrt", trust_native_code=True)


def _fake_manifest(bundle, **engine_fields) -> Manifest:
    """The tiny bundle's manifest as if engines had been built for an H200 with TensorRT 10.3.0."""
    fields = {"tensorrt_version": "10.3.0", "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"},
              **engine_fields}
    manifest = Manifest.load(bundle)
    return manifest.replace(components={
        name: dataclasses.replace(entry, engine=f"{name}.engine", engine_sha256="0" * 64, **fields)
        for name, entry in manifest.components.items()})


def test_engines_for_this_gpu_and_version_pass(cli_run):
    check_engines(_fake_manifest(cli_run[0]), "10.3.0", {"name": "NVIDIA H200", "compute_capability": "9.0"})


@pytest.mark.parametrize("version, gpu, found", [
    ("10.3.0", {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, "this is GPU NVIDIA A100"),
    ("10.7.0", {"name": "NVIDIA H200", "compute_capability": "9.0"}, "(TensorRT 10.7.0)")])
def test_engines_for_another_gpu_or_version_are_refused(cli_run, version, gpu, found):
    with pytest.raises(BackendError) as info:
        check_engines(_fake_manifest(cli_run[0]), version, gpu)
    message = str(info.value)
    assert "was built for GPU NVIDIA H200 (compute capability 9.0) (TensorRT 10.3.0)" in message
    assert found in message and message.endswith("rebuild with maskbit-export build-engines --backend tensorrt")


def test_bundle_without_engines_says_how_to_build_them(cli_run):
    manifest = _fake_manifest(cli_run[0])
    manifest = manifest.replace(components={
        name: dataclasses.replace(entry, engine=None) if name in ("decoder", "step") else entry
        for name, entry in manifest.components.items()})
    with pytest.raises(BackendError, match="no TensorRT engine for decoder, step; build them with maskbit-export"):
        check_engines(manifest, "10.3.0", {"name": "NVIDIA H200", "compute_capability": "9.0"})


def test_cuda_errors_become_exceptions():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (pip install 'maskbit[gpu]')")
    from maskbit_runtime.backends.cuda import check, import_cudart
    cudart = import_cudart()
    assert check((cudart.cudaError_t.cudaSuccess, 42), "cudaMalloc") == 42
    with pytest.raises(BackendError, match=r"CUDA call cudaMalloc failed: cudaErrorMemoryAllocation"):
        check((cudart.cudaError_t.cudaErrorMemoryAllocation, 0), "cudaMalloc")


def test_device_buffers_copy_whole_arrays_and_scalars(monkeypatch):
    from maskbit_runtime.backends import cuda
    fake = HostCudart()
    monkeypatch.setattr(cuda, "_CUDART", fake)
    stream = cuda.Stream(0)
    assert stream.handle == 7
    noise = cuda.Device((2, 3, 2), "float32", stream)
    scale = cuda.Device((), "int64", stream)
    values = np.arange(12, dtype=np.float64).reshape(2, 3, 2)
    noise.upload(values)                                   # converted to the buffer's dtype
    scale.upload(np.array(5))
    assert noise.nbytes == 48 and noise.download().dtype == np.float32
    np.testing.assert_array_equal(noise.download(), values)
    assert scale.download().shape == () and scale.download() == 5
    with pytest.raises(ValueError, match="shape"):
        noise.upload(np.zeros((3, 3, 2)))
    noise.free()
    noise.free()                                           # idempotent
    assert len(fake.freed) == 1


@pytest.mark.skipif(GPU_MISSING is None, reason="a CUDA GPU is visible here")
def test_no_gpu_is_one_clear_error():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (pip install 'maskbit[gpu]')")
    from maskbit_runtime.backends.cuda import gpu_info
    with pytest.raises(BackendError, match="TensorRT needs an NVIDIA GPU, but"):
        gpu_info(0)


# ---------------------------------------------------------------- GPU tier: TensorRT and a CUDA device


@pytest.fixture(scope="module")
def trt_bundle(models, tmp_path_factory):
    out, result = _export(models, tmp_path_factory.mktemp("trt"), "--backend", "tensorrt")
    assert result.exit_code == 0, result.output + result.stderr
    return out


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(TRT_MISSING is not None or GPU_MISSING is not None,
                    reason=f"needs TensorRT and a CUDA GPU: {TRT_MISSING or GPU_MISSING}")
class TestTensorRT:
    def test_engines_are_recorded_in_the_manifest(self, trt_bundle):
        manifest = Manifest.load(trt_bundle)
        for name, entry in manifest.components.items():
            assert entry.engine == f"{name}.engine" and entry.engine_precision == "fp32", name
            assert entry.tensorrt_version and entry.gpu["compute_capability"]

    def test_generation_matches_eager_tokens(self, trt_bundle, eager):
        with Pipeline.load(trt_bundle, backend="tensorrt", trust_native_code=True) as pipe:
            out = pipe.generate(labels=LABELS, seed=0, num_steps=STEPS)
            assert pipe.info()["runtime"]["backend"] == "tensorrt"
        np.testing.assert_array_equal(out.tokens, eager.tokens)
        assert np.abs(out.images.astype(np.int16) - eager.images.astype(np.int16)).max() <= 1

    def test_graphs_replay_each_binding_with_nothing_copied_first(self, trt_bundle, eager):
        """The step runs as CUDA graphs, one per (rows, parity) binding of the scheduler's lane; a generation makes
        the scheduler's copies (host_cudart.scheduled_copies) and waits once, for the download, plus any staging
        upload still in flight (counted only when the host really waited); without graphs the tokens are the same."""
        with Pipeline.load(trt_bundle, backend="tensorrt", trust_native_code=True) as pipe:
            capacity = pipe.manifest.max_batch("step")
            for generation in (1, 2):
                out = pipe.generate(labels=LABELS, seed=0, num_steps=STEPS)
                np.testing.assert_array_equal(out.tokens, eager.tokens)
                moved = pipe.last_transfers
                copies = scheduled_copies(len(LABELS), STEPS, capacity, new_lane=generation == 1)
                assert dataclasses.replace(moved, host_syncs=0) == copies and moved.host_syncs >= 1, moved
            assert pipe.info()["runtime"]["cuda_graphs"] == "on"
            (lane,) = pipe.backend.lanes.values()
            assert len(pipe.backend.primitives.engine("step").graphs.graphs) == len(lane.bindings) == 2
        with Pipeline.load(trt_bundle, backend="tensorrt", trust_native_code=True, cuda_graphs=False) as pipe:
            out = pipe.generate(labels=LABELS, seed=0, num_steps=STEPS)
            moved = pipe.last_transfers
        np.testing.assert_array_equal(out.tokens, eager.tokens)
        copies = scheduled_copies(len(LABELS), STEPS, capacity, new_lane=True)
        assert dataclasses.replace(moved, host_syncs=0) == copies and moved.host_syncs >= 1, moved

    def test_more_images_than_slots_go_through_in_rounds(self, trt_bundle, models):
        tok, gen = models
        labels = [1, 2, 3, 4, 5, 6]                      # profile max is 4: rounds of 4 and 2 rows
        expected = maskbit.generate(tok, gen, labels=labels, seed=0, num_steps=STEPS).tokens
        with Pipeline.load(trt_bundle, backend="tensorrt", trust_native_code=True) as pipe:
            tokens = pipe.generate(labels=labels, seed=0, num_steps=STEPS).tokens
            (lane,) = pipe.backend.lanes.values()
            assert lane.capacity == 4 and sorted({rows for rows, _ in lane.bindings}) == [2, 4]
        np.testing.assert_array_equal(tokens, expected)

    def test_encode_and_decode_match_onnx_runtime(self, trt_bundle, eager):
        with Pipeline.load(trt_bundle, backend="ort", providers=["CPUExecutionProvider"]) as ort_pipe, \
                Pipeline.load(trt_bundle, backend="tensorrt", trust_native_code=True) as trt_pipe:
            images_ort, images_trt = ort_pipe.decode(eager.tokens), trt_pipe.decode(eager.tokens)
            assert np.abs(images_ort.astype(np.int16) - images_trt.astype(np.int16)).max() <= 1
            indices_ort, indices_trt = ort_pipe.encode(images_ort), trt_pipe.encode(images_ort)
        assert (indices_ort == indices_trt).mean() >= 0.99   # sign quantization may flip latents at ~0

    def test_engines_built_for_another_gpu_are_refused(self, trt_bundle, tmp_path):
        copy = tmp_path / "bundle"
        shutil.copytree(trt_bundle, copy)
        data = json.loads((copy / "manifest.json").read_text())
        data["components"]["step"]["gpu"] = {"name": "Imaginary GPU 9000", "compute_capability": "1.0"}
        (copy / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(BackendError, match=r"engine step.engine was built for GPU Imaginary GPU 9000 .* "
                                               r"rebuild with maskbit-export build-engines --backend tensorrt"):
            Pipeline.load(copy, backend="tensorrt", trust_native_code=True)


@pytest.mark.gpu
@pytest.mark.skipif(ORT_CUDA_MISSING is not None, reason=str(ORT_CUDA_MISSING))
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_onnx_runtime_cuda_generation_matches_eager_tokens(cli_run, eager, cuda_graphs):
    out, _ = cli_run
    with Pipeline.load(out, backend="ort", providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                       provider_options={"CUDAExecutionProvider": {"use_tf32": "0"}},      # exact fp32
                       cuda_graphs=cuda_graphs) as pipe:
        assert pipe.backend.primitives.device == "cuda"
        result = pipe.generate(labels=LABELS, seed=0, num_steps=STEPS)
        assert pipe.info()["runtime"]["cuda_graphs"] == ("on" if cuda_graphs else "off (cuda_graphs=False)")
        # every upload is a blocking copy; one wait per download plus one per downloaded buffer (images,
        # indices); without graphs every run (each step, combine, decode) synchronizes too
        copies = scheduled_copies(len(LABELS), STEPS, pipe.manifest.max_batch("step"), new_lane=True)
        runs = 0 if cuda_graphs else STEPS + 2
        syncs = copies.host_to_device + 1 + copies.device_to_host + runs
        assert pipe.last_transfers == dataclasses.replace(copies, host_syncs=syncs)
    np.testing.assert_array_equal(result.tokens, eager.tokens)
    assert np.abs(result.images.astype(np.int16) - eager.images.astype(np.int16)).max() <= 1


# ---------------------------------------------------------------- GPU tier: reduced precision, the distribution gate


def _engine_logits(pipe):
    """(tokens, labels, drop) -> logits of the bundle's transformer engine, through the runtime's own buffers."""
    from maskbit_runtime.backends.base import put
    from maskbit_runtime.specs import DROP_LABEL_MASK, LABELS as LABELS_INPUT, LOGITS, TOKENS, TRANSFORMER

    executor = pipe.backend

    def logits(tokens, labels, drop):
        buffers, binding = executor.buffers(TRANSFORMER, len(tokens))
        for name, array in ((TOKENS, tokens), (LABELS_INPUT, labels), (DROP_LABEL_MASK, drop)):
            put(executor.primitives, buffers[name], array)
        executor.primitives.run(binding)
        return executor.primitives.download(buffers[LOGITS])[0]
    return logits


def _gate(models, logits, precision):
    from maskbit_export.verify import distribution_report
    _, gen = models
    plan = gen.sampling_config.with_overrides(num_steps=STEPS).plan(gen.config.num_tokens * gen.config.codebook_splits)
    return distribution_report(gen, logits, LABELS, plan, precision)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(TRT_MISSING is not None or GPU_MISSING is not None,
                    reason=f"needs TensorRT and a CUDA GPU: {TRT_MISSING or GPU_MISSING}")
@pytest.mark.parametrize("precision", ["tf32", "fp16", "bf16"])
def test_reduced_precision_engines_pass_the_distribution_gate(models, tmp_path, precision):
    """Strongly typed engines from graphs in their precision: the transformer engine's sampling distributions along
    a teacher-forced float32 trajectory are within the gate of eager float32, and a generation runs."""
    out, result = _export(models, tmp_path, "--backend", "tensorrt", "--engine-precision", precision,
                          "--with-transformer")
    assert result.exit_code == 0, result.output + result.stderr
    manifest = Manifest.load(out)
    assert manifest.components["step"].engine_precision == precision
    with Pipeline.load(out, backend="tensorrt", trust_native_code=True) as pipe:
        report = _gate(models, _engine_logits(pipe), precision)
        tokens = pipe.generate(labels=LABELS, seed=0, num_steps=STEPS).tokens
    assert report["passed"], report
    assert report["tv_mean"] > 0 or precision == "tf32"        # reduced precision is not bit-exact float32
    assert tokens.shape[0] == len(LABELS) and tokens.min() >= 0


@pytest.mark.gpu
@pytest.mark.skipif(ORT_CUDA_MISSING is not None, reason=str(ORT_CUDA_MISSING))
def test_onnx_runtime_cuda_with_tf32_passes_the_distribution_gate(models, tmp_path):
    """ONNX Runtime's CUDA provider runs TF32 by default: held to the gate on the fp32 transformer graph."""
    import onnxruntime as ort
    from maskbit_export.verify import session_logits
    out, result = _export(models, tmp_path, "--with-transformer")
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out / "transformer.onnx"), providers=["CUDAExecutionProvider"],
                                   provider_options=[{"use_tf32": "1"}])
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    report = _gate(models, session_logits(session), "tf32")
    assert report["passed"], report
