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
from maskbit_runtime.errors import InputError
from maskbit_runtime.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "export" / "tensorrt.py", ROOT / "runtime" / "backends" / "tensorrt.py")


class _Flags:
    TF32, FP16, BF16 = "TF32", "FP16", "BF16"


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
        self.fake.network_flags.append(flags)
        return FakeNetwork(self.fake.inputs)

    def create_builder_config(self):
        return FakeConfig(self.fake.log)

    def create_optimization_profile(self):
        shapes = {}
        return SimpleNamespace(set_shape=lambda name, *s: shapes.__setitem__(name, s), shapes=shapes)

    def build_serialized_network(self, network, config):
        self.fake.builds.append(SimpleNamespace(
            flags=set(config.flags), cache=config.cache, shapes=config.profile.shapes,
            strongly_typed=self.fake.network_flags[-1]))
        return b"plan"


def fake_tensorrt(inputs, strongly_typed_flag=True):
    """A module with the parts of TensorRT's Python API `build_engines` uses; builds are recorded. Without
    `strongly_typed_flag` it has no STRONGLY_TYPED creation flag (a TensorRT that dropped it)."""
    fake = SimpleNamespace(__version__="10.99.0", log=[], builds=[], inputs=inputs, network_flags=[])
    fake.BuilderFlag = _Flags
    fake.NetworkDefinitionCreationFlag = SimpleNamespace(**({"STRONGLY_TYPED": 3} if strongly_typed_flag else {}))
    fake.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
    fake.Builder = lambda logger: FakeBuilder(fake)
    fake.OnnxParser = lambda network, logger: SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
    return fake


def _export(root, *extra):
    """A tiny ONNX bundle (max batch 4, engines tuned for batch 2), exported by the CLI without verification."""
    torch.manual_seed(0)
    preset = maskbit.get_preset("tiny_lfq10")
    maskbit.save_tokenizer(maskbit.build_tokenizer("tiny_lfq10"), root / "tok.safetensors", preset)
    maskbit.save_generator(maskbit.build_generator("tiny_lfq10"), root / "gen.safetensors", preset)
    result = CliRunner().invoke(export_cli, [
        "build-engines", "--tokenizer", str(root / "tok.safetensors"), "--generator", str(root / "gen.safetensors"),
        "--config", "tiny_lfq10", "--out", str(root / "bundle"), "--max-batch", "4", "--opt-batch", "2",
        "--no-verify", *extra])
    assert result.exit_code == 0, result.output
    return root / "bundle"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("trt"))


@pytest.fixture(scope="module")
def reduced_bundles(tmp_path_factory):
    """Bundles whose generator graphs were exported in fp16 / bf16 / int8."""
    return {p: _export(tmp_path_factory.mktemp(p), "--precision", p) for p in ("fp16", "bf16", "int8")}


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


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("tf32", True), ("fp16", True), ("bf16", True)])
def test_networks_are_strongly_typed_and_tf32_is_set_as_asked(bundle, reduced_bundles, fake, precision, tf32):
    """The graphs' types decide the precision; TF32 only for tf32 and the float32 (tokenizer) parts of fp16/bf16
    builds; TensorRT 10's weakly typed FP16/BF16 flags are never set."""
    root = reduced_bundles[precision] if precision in ("fp16", "bf16") else bundle
    manifest = trt_export.build_engines(root, precision)
    assert len(fake.builds) == len(manifest.components)
    assert all(b.strongly_typed == 1 << 3 for b in fake.builds)
    assert all(("TF32" in b.flags) == tf32 and not {"FP16", "BF16"} & b.flags for b in fake.builds)
    expected = {name: (precision if name in ("step", "step_unguided") or precision in ("fp32", "tf32") else "tf32")
                for name in manifest.components}
    assert {n: e.engine_precision for n, e in manifest.components.items()} == expected


def test_a_tensorrt_without_the_strongly_typed_flag_builds_with_none(bundle, monkeypatch, fake):
    """TensorRT 11 is always strongly typed; should the deprecated flag go, networks are created with no flags."""
    plain = fake_tensorrt(fake.inputs, strongly_typed_flag=False)
    monkeypatch.setattr(trt_export, "import_tensorrt", lambda: plain)
    trt_export.build_engines(bundle, "fp32")
    assert plain.network_flags and set(plain.network_flags) == {0}


@pytest.mark.parametrize("graphs, engine, message", [
    ("fp32", "fp16", "--engine-precision fp16 needs fp16 step graphs, but this bundle's are fp32: export the "
                     "bundle with --precision fp16"),
    ("fp16", "fp32", "--engine-precision fp32 needs fp32 step graphs, but this bundle's are fp16"),
    ("fp16", "bf16", "needs bf16 step graphs, but this bundle's are fp16"),
    ("int8", "tf32", "int8 graphs hold ONNX Runtime's quantization operators, which TensorRT cannot parse"),
])
def test_engines_of_another_precision_than_the_graphs_are_refused_first(bundle, reduced_bundles, fake, graphs,
                                                                         engine, message):
    root = bundle if graphs == "fp32" else reduced_bundles[graphs]
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    with pytest.raises(InputError, match=re.escape(message)):
        trt_export.build_engines(root, engine)
    assert not fake.builds and not fake.network_flags
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before


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
    assert not missing, f"TensorRT {trt.__version__} lacks {missing}"
