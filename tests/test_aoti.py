"""The AOTInductor backend: `.pt2` packages compiled from the same modules, run by the shared executor.

One tiny_lfq10 bundle is exported through `maskbit-export build-engines --backend aoti` once per module (each
AOTInductor compile takes tens of seconds on two cores); the fp32 packages must give the eager sampler's tokens
exactly. A bf16 transformer package is compiled once and held to the distribution gate (export/quality.py).
On a machine with a CUDA GPU the `gpu` tests compile for cuda and compare with eager on the CPU.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from host_cudart import scheduled_copies
from maskbit_export.aoti import build_aoti
from maskbit_export.aoti_backend import COMPONENT_KEY, AotiPrimitives, WaitCounter
from maskbit_export.bundle import ExportOptions, build_bundle
from maskbit_export.cli import main as export_cli
from maskbit_export.tolerances import tolerance
from maskbit_export.verify import _gate_plan, distribution_report
from maskbit_runtime import Pipeline
from maskbit_runtime.backends import BackendError
from maskbit_runtime.backends.base import Transfers
from maskbit_runtime.cli import main as run_cli
from maskbit_runtime.manifest import MANIFEST, BundleError, Manifest, sha256_file
from PIL import Image

import maskbit

LABELS = [1, 7, 282]
STEPS = 6
GPU_MISSING = None if torch.cuda.is_available() else "PyTorch sees no CUDA GPU"


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return maskbit.build_tokenizer("tiny_lfq10"), maskbit.build_generator("tiny_lfq10")


@pytest.fixture(scope="module")
def bundle(models, tmp_path_factory):
    """An ONNX + fp32 AOTInductor (cpu) bundle with max batch 2, built by the export command line."""
    tok, gen = models
    root = tmp_path_factory.mktemp("aoti")
    preset = maskbit.get_preset("tiny_lfq10")
    maskbit.save_tokenizer(tok, root / "tok.safetensors", preset)
    maskbit.save_generator(gen, root / "gen.safetensors", preset)
    result = CliRunner().invoke(export_cli, [
        "build-engines", "--tokenizer", str(root / "tok.safetensors"), "--generator", str(root / "gen.safetensors"),
        "--config", "tiny_lfq10", "--out", str(root / "bundle"), "--max-batch", "2", "--backend", "aoti"])
    assert result.exit_code == 0, result.output
    return root / "bundle"


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "copy")


def _edit_manifest(path, component, **changes):
    data = json.loads((path / MANIFEST).read_text())
    data["components"][component].update(changes)
    (path / MANIFEST).write_text(json.dumps(data))


def test_manifest_records_packages_torch_and_device(bundle):
    manifest = Manifest.load(bundle)
    for name, entry in manifest.components.items():
        assert entry.package == f"{name}.pt2" and entry.package_sha256 == sha256_file(bundle / entry.package)
        assert (entry.package_device, entry.torch_version, entry.package_precision) == ("cpu", torch.__version__,
                                                                                         "fp32")


def test_generation_equals_eager_token_for_token(bundle, models):
    tok, gen = models
    eager = maskbit.generate(tok, gen, labels=LABELS, num_steps=STEPS, guidance_scale=3.0, seed=11)
    with Pipeline.load(bundle, backend="aoti", trust_native_code=True) as pipe:       # max batch 2: rounds of 2 and 1
        out = pipe.generate(labels=LABELS, num_steps=STEPS, guidance_scale=3.0, seed=11)
        assert pipe.last_transfers == scheduled_copies(len(LABELS), STEPS, capacity=2, new_lane=True)   # no syncs
        assert pipe.info()["runtime"]["backend"] == "aoti"
        assert pipe.info()["runtime"]["host_syncs"].startswith("none: on the CPU")
    np.testing.assert_array_equal(out.tokens, eager.tokens)
    diff = np.abs(out.images.astype(int) - eager.images.astype(int))
    assert out.images.dtype == np.uint8 and diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_guidance_zero_runs_the_unguided_package(bundle, models):
    tok, gen = models
    eager = maskbit.generate(tok, gen, labels=LABELS, num_steps=STEPS, guidance_scale=0.0, seed=3)
    with Pipeline.load(bundle, backend="aoti", trust_native_code=True) as pipe:
        out = pipe.generate(labels=LABELS, num_steps=STEPS, guidance_scale=0.0, seed=3)
        loaded = set(pipe.backend.primitives._packages)
    np.testing.assert_array_equal(out.tokens, eager.tokens)
    assert "step_unguided" in loaded and "step" not in loaded


def test_encode_and_decode_match_onnx_runtime(bundle):
    images = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with Pipeline.load(bundle, backend="aoti", trust_native_code=True) as aoti, \
            Pipeline.load(bundle, backend="ort") as ort:
        indices = aoti.encode(images)
        mismatch = (indices != ort.encode(images)).mean()
        decoded, reference = aoti.decode(indices), ort.decode(indices)
    assert mismatch <= tolerance("fp32", "encoder")["max_mismatch_fraction"]
    diff = np.abs(decoded.astype(int) - reference.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= tolerance("fp32", "decoder")["max_mismatch_fraction"]


def test_cli_generates_with_the_aoti_backend(bundle, models, tmp_path):
    result = subprocess.run(["maskbit-run", "generate", "--bundle", str(bundle), "--backend", "aoti",
                             "--trust-native-code", "--labels", "1,7", "--num-steps", str(STEPS),
                             "--guidance-scale", "3", "--seed", "11", "--out", str(tmp_path / "imgs")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    eager = maskbit.generate(*models, labels=[1, 7], num_steps=STEPS, guidance_scale=3.0, seed=11)
    files = sorted((tmp_path / "imgs").iterdir())
    assert len(files) == 2
    for path, expected in zip(files, eager.images):
        assert np.abs(np.asarray(Image.open(path)).astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("extra, message", [
    (["--aoti-device", "cpu"], "--aoti-device applies to AOTInductor packages"),
    (["--backend", "aoti", "--engine-precision", "fp16"], "--backend aoti supports --engine-precision fp32 or bf16"),
])
def test_export_options_of_packages_are_checked_before_exporting(tmp_path, extra, message):
    result = CliRunner().invoke(export_cli, ["build-engines", "--tokenizer", "missing.safetensors", "--out",
                                             str(tmp_path / "b"), *extra])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "b").exists()


def test_a_tampered_package_is_refused_in_one_line(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    with open(copy / "step.pt2", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with Pipeline.load(copy, backend="aoti", trust_native_code=True) as pipe, \
            pytest.raises(BundleError, match="does not match its sha256"):
        pipe.generate(labels=[1], num_steps=2)
    result = CliRunner().invoke(run_cli, ["generate", "--bundle", str(copy), "--backend", "aoti",
                                          "--trust-native-code", "--labels", "1", "--num-steps", "2",
                                          "--out", str(tmp_path / "x.png")])
    lines = [line for line in re.split(r"[\r\n]", result.output) if line.strip()]   # after the progress bar
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert lines[-1].startswith("Error: ") and "sha256" in lines[-1] and sum("Error" in s for s in lines) == 1


@pytest.mark.parametrize("changes, options, expected", [
    ({"torch_version": "2.0.0"}, {}, f"with torch 2.0.0, but this is cpu with torch {torch.__version__}"),
    ({"package_device": "cuda"}, {"device": "cpu"}, "compiled for cuda with torch"),
])
def test_packages_for_another_torch_or_device_are_refused(bundle, tmp_path, changes, options, expected):
    copy = _copy(bundle, tmp_path)
    _edit_manifest(copy, "decoder", **changes)
    with pytest.raises(BackendError, match="rebuild with maskbit-export build-engines --backend aoti") as error:
        Pipeline.load(copy, backend="aoti", trust_native_code=True, **options)
    assert expected in str(error.value) and len(str(error.value).splitlines()) == 1


def test_a_package_of_another_component_is_refused(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    shutil.copyfile(copy / "combine.pt2", copy / "decoder.pt2")
    _edit_manifest(copy, "decoder", package_sha256=sha256_file(copy / "decoder.pt2"))
    with Pipeline.load(copy, backend="aoti", trust_native_code=True) as pipe, \
            pytest.raises(BackendError, match="holds component 'combine'"):
        pipe.decode(np.zeros((1, 8, 8), np.int64))


def test_manifest_parser_needs_the_package_record(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    _edit_manifest(copy, "step", package_device=None)
    with pytest.raises(BundleError, match="a package needs package_precision, package_device, torch_version"):
        Manifest.load(copy)
    _edit_manifest(copy, "step", package_device="cpu", package="../step.pt2")
    with pytest.raises(BundleError, match="not a plain file name"):
        Manifest.load(copy)


def test_an_onnx_only_bundle_says_how_to_build_packages(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    data = json.loads((copy / MANIFEST).read_text())
    for entry in data["components"].values():
        for key in ("package", "package_sha256", "package_precision", "package_device", "torch_version"):
            entry.pop(key)
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BackendError, match="no AOTInductor package for encoder, decoder, step, step_unguided, combine"):
        Pipeline.load(copy, backend="aoti", trust_native_code=True)


def test_bf16_transformer_meets_the_distribution_gate(models, tmp_path):
    """Only the transformer's matmuls run in bf16 (autocast); its logits come back float32 for the sampler."""
    tok, gen = models
    build_bundle(tmp_path / "b", tok, gen, options=ExportOptions(max_batch=4, verify=False, with_transformer=True))
    manifest = build_aoti(tmp_path / "b", tok, gen, precision="bf16", components=("transformer",))
    entry = manifest.components["transformer"]
    assert entry.package_precision == "bf16" and manifest.components["step"].package is None
    runner = torch._inductor.aoti_load_package(str(manifest.file("transformer", "package")))

    def logits(tokens, labels, drop):
        out = runner(*(torch.from_numpy(a) for a in (tokens, labels, drop)))
        return out.numpy()

    report = distribution_report(gen, logits, [1, 7], _gate_plan(gen), "bf16")
    assert report["passed"], report
    assert report["tv_mean"] > 1e-6, report      # the package really computed in bf16, not float32


@pytest.mark.slow
def test_bf16_bundle_generates_valid_tokens(models, tmp_path):
    tok, gen = models
    build_bundle(tmp_path / "b", tok, gen, options=ExportOptions(max_batch=2, verify=False))
    build_aoti(tmp_path / "b", tok, gen, precision="bf16")
    with Pipeline.load(tmp_path / "b", backend="aoti", trust_native_code=True) as pipe:
        out = pipe.generate(labels=LABELS, num_steps=STEPS, guidance_scale=3.0, seed=11)
    assert out.tokens.min() >= 0 and out.tokens.max() < tok.config.codebook_size


class RecordedLoads:
    """A stand-in of torch._inductor.aoti_load_package (same signature) that records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, path, run_single_threaded=False, device_index=-1):
        self.calls.append({"run_single_threaded": run_single_threaded, "device_index": device_index})
        component = path.rsplit("/", 1)[-1].removesuffix(".pt2")
        return types.SimpleNamespace(get_metadata=lambda: {COMPONENT_KEY: component})


def _cuda_manifest(root):
    """A stand-in manifest whose step has a package compiled for cuda by this torch."""
    entry = types.SimpleNamespace(package="step.pt2", torch_version=torch.__version__, package_device="cuda")
    return types.SimpleNamespace(root=root, components={"step": entry}, file=lambda name, key: root / f"{name}.pt2")


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_packages_replayed_in_cuda_graphs_load_single_threaded(monkeypatch, tmp_path, cuda_graphs):
    """PR #148601: the threaded runtime queries a CUDA event inside capture, so graphed packages must load with
    run_single_threaded=True; without graphs the runtime's own waits are counted and info says so."""
    loads = RecordedLoads()
    monkeypatch.setattr(torch._inductor, "aoti_load_package", loads)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in GPU")
    primitives = AotiPrimitives(_cuda_manifest(tmp_path), device="cuda", cuda_graphs=cuda_graphs)
    runner = primitives.package("step")
    assert loads.calls == [{"run_single_threaded": cuda_graphs, "device_index": 0}]
    assert isinstance(runner, WaitCounter) and (runner.event is None) == cuda_graphs
    info = primitives.describe()
    assert info["run_single_threaded"] == cuda_graphs and info["host_syncs"].startswith("the host's waits")
    assert ("threaded package" in info["host_syncs"]) != cuda_graphs


class ScriptedEvent:
    """A stand-in of torch.cuda.Event whose query() answers from a script (True: the recorded work finished)."""
    answers: list = []

    def record(self):
        pass

    def query(self):
        return self.answers.pop(0)


@pytest.mark.parametrize("threaded, answers, expected", [
    (True, [False, True, False], 3),         # constant folding, then the calls whose previous one was pending
    (False, [], 1),                          # single-threaded: only the constant folding of the first call
])
def test_the_package_runtimes_own_host_waits_are_counted(monkeypatch, threaded, answers, expected):
    monkeypatch.setattr(ScriptedEvent, "answers", list(answers))
    transfers, calls = Transfers(), []
    counter = WaitCounter(lambda *inputs: calls.append(inputs), transfers, ScriptedEvent if threaded else None)
    for i in range(4):
        counter(i)
    assert calls == [(0,), (1,), (2,), (3,)] and transfers.host_syncs == expected and not ScriptedEvent.answers


@pytest.fixture(scope="module")
def cuda_bundle(tmp_path_factory):
    from aoti_cuda import cuda_bundle
    return cuda_bundle(tmp_path_factory)[0]


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING is not None, reason=GPU_MISSING or "")
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_cuda_packages_equal_eager_on_cuda(cuda_bundle, cuda_graphs):
    from aoti_cuda import cuda_models
    tok, gen = cuda_models()
    eager = maskbit.generate(tok, gen, labels=LABELS, num_steps=STEPS, guidance_scale=3.0, seed=11)
    with Pipeline.load(cuda_bundle, backend="aoti", trust_native_code=True, cuda_graphs=cuda_graphs) as pipe:
        assert pipe.info()["runtime"]["device"].startswith("cuda")
        out = pipe.generate(labels=LABELS, num_steps=STEPS, guidance_scale=3.0, seed=11)
        again = pipe.generate(labels=LABELS, num_steps=STEPS, guidance_scale=3.0, seed=11)   # replays the graphs
    np.testing.assert_array_equal(out.tokens, eager.tokens)
    np.testing.assert_array_equal(again.tokens, eager.tokens)
