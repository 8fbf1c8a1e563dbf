"""Engine building at the CPU tier: what `build_engines` asks of TensorRT (precision flags, profile, timing cache),
recorded by a stand-in with TensorRT's Python API shape, and, where TensorRT is installed, that every attribute
this project uses exists in it. The real builds are in tests/test_tensorrt.py (GPU tier)."""

import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import maskbit
from maskbit_export import tensorrt as trt_export
from maskbit_export.cli import main as export_cli
from maskbit_runtime.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "export" / "tensorrt.py", ROOT / "runtime" / "backends" / "tensorrt.py")


class _Flags:
    TF32, FP16, BF16, PREFER_PRECISION_CONSTRAINTS = "TF32", "FP16", "BF16", "PREFER_PRECISION_CONSTRAINTS"


class FakeCache:
    def __init__(self, data: bytes):
        self.data = bytes(data)

    def serialize(self):
        return self.data + b"|timed"


class FakeConfig:
    def __init__(self, log):
        self.flags, self.log, self.cache = {"TF32"}, log, None     # TensorRT sets TF32 by default

    def set_memory_pool_limit(self, pool, size):
        self.log.append(("pool", pool, size))

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def create_timing_cache(self, data):
        data = bytes(data)
        return None if data.startswith(b"garbage") else FakeCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return not cache.data.startswith(b"other-gpu")

    def add_optimization_profile(self, profile):
        self.profile = profile


class FakeNetwork:
    def __init__(self, inputs):
        self.inputs = list(inputs)
        self.num_inputs = len(self.inputs)
        self.num_layers = 0

    def get_input(self, i):
        return SimpleNamespace(name=self.inputs[i])


class FakeBuilder:
    def __init__(self, fake):
        self.fake = fake

    def create_network(self, flags):
        return FakeNetwork(self.fake.inputs)

    def create_builder_config(self):
        return FakeConfig(self.fake.log)

    def create_optimization_profile(self):
        shapes = {}
        return SimpleNamespace(set_shape=lambda name, *s: shapes.__setitem__(name, s), shapes=shapes)

    def build_serialized_network(self, network, config):
        self.fake.builds.append(SimpleNamespace(flags=set(config.flags), cache=config.cache,
                                                shapes=config.profile.shapes))
        return b"plan"


def fake_tensorrt(inputs, has_reduced_flags=True):
    """A module with the parts of TensorRT's Python API `build_engines` uses; builds are recorded."""
    fake = SimpleNamespace(__version__="10.99.0", log=[], builds=[], inputs=inputs)
    flags = _Flags if has_reduced_flags else SimpleNamespace(TF32="TF32", PREFER_PRECISION_CONSTRAINTS="P")
    fake.BuilderFlag = flags
    fake.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    fake.LayerType = SimpleNamespace(NORMALIZATION="NORMALIZATION")
    fake.float32 = "float32"
    fake.Builder = lambda logger: FakeBuilder(fake)
    fake.OnnxParser = lambda network, logger: SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
    return fake


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny ONNX bundle (max batch 4, engines tuned for batch 2), exported by the CLI without verification."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("trt")
    preset = maskbit.get_preset("tiny_lfq10")
    maskbit.save_tokenizer(maskbit.build_tokenizer("tiny_lfq10"), root / "tok.safetensors", preset)
    maskbit.save_generator(maskbit.build_generator("tiny_lfq10"), root / "gen.safetensors", preset)
    result = CliRunner().invoke(export_cli, [
        "build-engines", "--tokenizer", str(root / "tok.safetensors"), "--generator", str(root / "gen.safetensors"),
        "--config", "tiny_lfq10", "--out", str(root / "bundle"), "--max-batch", "4", "--opt-batch", "2",
        "--no-verify"])
    assert result.exit_code == 0, result.output
    return root / "bundle"


@pytest.fixture
def fake(monkeypatch, bundle):
    names = {t.name for entry in Manifest.load(bundle).components.values() for t in entry.inputs}
    fake = fake_tensorrt(names)
    monkeypatch.setattr(trt_export, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_export, "gpu_info", lambda device: {"name": "Fake GPU", "compute_capability": "9.0"})
    monkeypatch.setattr(trt_export, "collecting_logger", lambda trt: SimpleNamespace(errors=[], warnings=[]))
    return fake


def test_the_profile_optimum_is_the_batch_asked_for(bundle, fake):
    manifest = Manifest.load(bundle)
    assert {(e.batch_profile.min, e.batch_profile.opt, e.batch_profile.max) for e in manifest.components.values()} \
        == {(1, 2, 4)}
    trt_export.build_engines(bundle, "fp32")
    step = next(b for b in fake.builds if "noise" in b.shapes)
    low, opt, high = step.shapes["noise"]
    assert (low[0], opt[0], high[0]) == (1, 2, 4)


@pytest.mark.parametrize("precision, present, absent", [
    ("fp32", set(), {"TF32", "FP16", "BF16"}),
    ("tf32", {"TF32"}, {"FP16", "BF16"}),
    ("fp16", {"FP16", "PREFER_PRECISION_CONSTRAINTS"}, {"BF16"}),
    ("bf16", {"BF16", "PREFER_PRECISION_CONSTRAINTS"}, {"FP16"}),
])
def test_engine_precision_sets_exactly_its_builder_flags(bundle, fake, precision, present, absent):
    manifest = trt_export.build_engines(bundle, precision)
    assert fake.builds and all(present <= b.flags and not absent & b.flags for b in fake.builds)
    assert {e.engine_precision for e in manifest.components.values()} == {precision}


def test_reduced_precision_without_the_weak_flags_is_one_clear_error(bundle, monkeypatch, fake):
    weak = fake_tensorrt(fake.inputs, has_reduced_flags=False)
    monkeypatch.setattr(trt_export, "import_tensorrt", lambda: weak)
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(trt_export.EngineBuildError, match="TensorRT 11.*fp32 or tf32"):
        trt_export.build_engines(bundle, "fp16")
    assert (bundle / "manifest.json").read_bytes() == before
    assert not list(bundle.glob(".*partial*"))


def test_the_timing_cache_is_kept_beside_the_bundle_and_reused(bundle, fake):
    cache = bundle / trt_export.TIMING_CACHE
    cache.unlink(missing_ok=True)
    trt_export.build_engines(bundle, "fp32")
    assert cache.read_bytes() == b"|timed" and all(b.cache.data == b"" for b in fake.builds)
    fake.builds.clear()
    trt_export.build_engines(bundle, "fp32")
    assert all(b.cache.data == b"|timed" for b in fake.builds)          # the first build's timings
    assert cache.read_bytes() == b"|timed|timed"


@pytest.mark.parametrize("content", [b"other-gpu cache", b"garbage"])
def test_a_foreign_or_corrupt_timing_cache_is_replaced(bundle, fake, content):
    cache = bundle / trt_export.TIMING_CACHE
    cache.write_bytes(content)
    messages = []
    trt_export.build_engines(bundle, "fp32", on_progress=messages.append)
    assert all(b.cache.data == b"" for b in fake.builds)
    assert any("ignoring tensorrt.timing-cache" in m for m in messages)
    assert cache.read_bytes() == b"|timed"


def test_opt_batch_above_max_batch_is_refused_before_exporting(tmp_path):
    result = CliRunner().invoke(export_cli, [
        "build-engines", "--tokenizer", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "b"),
        "--max-batch", "4", "--opt-batch", "8"])
    assert result.exit_code != 0 and "--opt-batch 8 is larger than --max-batch 4" in result.output
    assert not (tmp_path / "b").exists()


def _attribute_chains() -> set[str]:
    chains = set()
    for path in SOURCES:
        chains |= set(re.findall(r"\btrt\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)", path.read_text()))
    return {c for c in chains if not c.startswith("__")}


def test_the_attribute_list_covers_the_sources():
    chains = _attribute_chains()
    assert {"Builder", "BuilderFlag.TF32", "OnnxParser", "Runtime"} <= chains      # the scan finds them
    classes = {m.split(".")[0] for m in trt_export.TENSORRT_METHODS}
    assert {"Builder", "IBuilderConfig", "IExecutionContext", "ICudaEngine", "ITimingCache"} <= classes


@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed here")
def test_every_tensorrt_attribute_used_exists_in_the_installed_package():
    import tensorrt as trt
    missing = []
    for chain in sorted(_attribute_chains() | set(trt_export.TENSORRT_METHODS)):
        obj = trt
        for part in chain.split("."):
            if not hasattr(obj, part):
                missing.append(chain)
                break
            obj = getattr(obj, part)
    # the weakly typed reduced-precision flags are optional: TensorRT 11 removed them, and fp16/bf16 then fail
    # with a clear error (test_reduced_precision_without_the_weak_flags_is_one_clear_error)
    missing = [m for m in missing if m not in {"BuilderFlag.PREFER_PRECISION_CONSTRAINTS"}]
    assert not missing, f"TensorRT {trt.__version__} lacks {missing}"
