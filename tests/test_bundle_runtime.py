"""Bundles built by maskbit_export and run by maskbit_runtime: parity with eager, integrity checks, errors."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import maskbit
from maskbit_export import ExportOptions, build_bundle
from maskbit_runtime import BundleError, InputError, Pipeline
from maskbit_runtime.manifest import MANIFEST

from bundle_support import sharpened_models

GENERATOR_PRESETS = ["tiny_lfq10", "tiny_lfq6_g1", "tiny_lfq9_g3", "tiny_lfq8_prenorm"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """One bundle per generator preset (max batch 2, so three labels are split), built once."""
    root = tmp_path_factory.mktemp("bundles")
    built = {}
    for preset in GENERATOR_PRESETS:
        tok, gen = sharpened_models(preset)
        build_bundle(root / preset, tok, gen, options=ExportOptions(max_batch=2, verify=preset == "tiny_lfq10"))
        built[preset] = (root / preset, tok, gen)
    return built


@pytest.mark.parametrize("preset", GENERATOR_PRESETS)
def test_runtime_generation_equals_eager(bundles, preset):
    path, tok, gen = bundles[preset]
    labels = [1, 7, 282]
    eager = maskbit.generate(tok, gen, labels=labels, num_steps=6, guidance_scale=3.0, seed=11)
    with Pipeline.load(path) as pipe:
        out = pipe.generate(labels=labels, num_steps=6, guidance_scale=3.0, seed=11)
    assert out.tokens.dtype == np.int64 and out.tokens.shape == eager.tokens.shape
    np.testing.assert_array_equal(out.tokens, eager.tokens)
    assert out.images.dtype == np.uint8 and out.images.shape == eager.images.shape
    diff = np.abs(out.images.astype(int) - eager.images.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01      # x255 rounding may flip where floats differ ~1e-6


def test_verification_is_recorded_in_the_manifest(bundles):
    path, _, _ = bundles["tiny_lfq10"]
    data = json.loads((path / MANIFEST).read_text())
    report = data["verification"]
    assert report["performed"] and report["generation"]["passed"] and report["generation"]["mismatch_fraction"] == 0
    assert set(report["components"]) == {"encoder", "decoder", "step", "step_unguided", "combine"}
    assert report["generation_unguided"]["passed"] and report["generation_unguided"]["guidance_scale"] == 0
    assert all(c["passed"] for c in report["components"].values())
    step = data["components"]["step"]
    assert step["batch_profile"] == {"min": 1, "opt": 2, "max": 2}      # engines are tuned for the largest batch
    assert [t["name"] for t in step["inputs"]][:3] == ["tokens", "labels", "noise"]
    assert step["inputs"][0]["shape"] == ["batch", 64, 2] and len(step["file_sha256"]) == 64
    assert data["sampling"]["num_steps"] == 8 and "torch" in data["provenance"]["tools"]


def test_batches_larger_than_the_profile_are_split_without_changing_images(bundles):
    path, _, _ = bundles["tiny_lfq6_g1"]
    with Pipeline.load(path) as pipe:
        whole = pipe.generate(labels=[3, 4, 5, 6, 7], num_steps=4, seed=2)          # max batch 2: 2 + 2 + 1
        single = pipe.generate(labels=[3, 4, 5, 6, 7], num_steps=4, seed=2, batch_size=1)
    np.testing.assert_array_equal(whole.tokens, single.tokens)
    np.testing.assert_array_equal(whole.images, single.images)


def test_encode_decode_match_eager(bundles):
    path, tok, _ = bundles["tiny_lfq10"]
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with Pipeline.load(path) as pipe:
        indices = pipe.encode(images)
        decoded = pipe.decode(indices)
        with pytest.raises(ValueError, match="token indices must be in"):
            pipe.decode(np.full((1, 8, 8), 1024))
        with pytest.raises(ValueError, match="images must be"):
            pipe.encode(images[:, :16])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        np.testing.assert_array_equal(indices, tok.encode(x).numpy())
        eager = maskbit.tokenizer.images_to_uint8(tok.decode_tokens(torch.from_numpy(indices))).numpy()
    assert np.abs(decoded.astype(int) - eager.astype(int)).max() <= 1


def test_labels_out_of_range_are_refused(bundles):
    path, _, _ = bundles["tiny_lfq10"]
    with Pipeline.load(path) as pipe, pytest.raises(ValueError, match="label 1000 is out of range"):
        pipe.generate(labels=[1, 1000])


def test_generation_never_imports_torch_or_onnx(bundles):
    path, _, _ = bundles["tiny_lfq10"]
    code = textwrap.dedent(f"""
        import sys
        from maskbit_runtime import Pipeline
        with Pipeline.load({str(path)!r}) as pipe:
            out = pipe.generate(labels=[1, 2, 3], num_steps=3, seed=0)
            pipe.decode(pipe.encode(out.images))
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx'))
        print(out.images.shape, bad)
        sys.exit(1 if bad else 0)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(3, 32, 32, 3) []" in result.stdout


# ---- integrity -----------------------------------------------------------------------------------------------


@pytest.fixture
def tokenizer_bundle(tmp_path):
    tok = maskbit.build_tokenizer("tiny_vq")
    build_bundle(tmp_path / "tb", tok, None, options=ExportOptions(max_batch=2))
    return tmp_path / "tb", tok


def test_tokenizer_only_bundle_encodes_but_cannot_generate(tokenizer_bundle):
    path, tok = tokenizer_bundle
    with Pipeline.load(path) as pipe:
        assert sorted(pipe.manifest.components) == ["decoder", "encoder"]
        images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        assert pipe.reconstruct(images).shape == images.shape
        with pytest.raises(BundleError, match="has no generator"):
            pipe.generate(labels=[0])


def test_tampered_file_is_refused_naming_it(tokenizer_bundle):
    path, _ = tokenizer_bundle
    data = bytearray((path / "decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (path / "decoder.onnx").write_bytes(bytes(data))
    with Pipeline.load(path) as pipe:                 # files are hashed when first used, not at load
        pipe.encode(np.zeros((1, 32, 32, 3), np.uint8))
        with pytest.raises(BundleError, match=r"decoder\.onnx does not match its sha256"):
            pipe.decode(np.zeros((1, 8, 8), np.int64))


def test_truncated_bundle_is_refused(tokenizer_bundle):
    path, _ = tokenizer_bundle
    (path / "encoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"incomplete: encoder\.onnx is missing"):
        Pipeline.load(path)
    (path / MANIFEST).unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Pipeline.load(path)


def test_unknown_format_version_is_refused(tokenizer_bundle):
    path, _ = tokenizer_bundle
    data = json.loads((path / MANIFEST).read_text())
    data["format_version"] = 99
    (path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format version 99; this runtime reads versions 1, 2"):
        Pipeline.load(path)


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import maskbit_export.bundle as bundle_module
    real = bundle_module.export_onnx

    def failing(module, spec, *args, **kwargs):
        if spec.name == "step":
            raise KeyboardInterrupt
        return real(module, spec, *args, **kwargs)

    monkeypatch.setattr(bundle_module, "export_onnx", failing)
    tok, gen = sharpened_models("tiny_lfq6_g1")
    with pytest.raises(KeyboardInterrupt):
        build_bundle(tmp_path / "b", tok, gen, options=ExportOptions(verify=False))
    assert list(tmp_path.iterdir()) == []          # neither the bundle nor its temporary directory


def test_existing_output_needs_force(tokenizer_bundle):
    path, tok = tokenizer_bundle
    with pytest.raises(InputError, match="--force"):
        build_bundle(path, tok, None)
    build_bundle(path, tok, None, options=ExportOptions(verify=False), force=True)
    assert Pipeline.load(path).manifest.verification == {"performed": False}
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_bitflip_needs_bit_tokens(tokenizer_bundle):
    path, _ = tokenizer_bundle
    with Pipeline.load(path) as pipe, pytest.raises(ValueError, match="VQ \\(lookup\\) tokenizer"):
        pipe.bitflip(np.zeros((32, 32, 3), np.uint8))


def test_bitflip_flips_exactly_one_bit_of_every_token(bundles):
    path, _, _ = bundles["tiny_lfq10"]
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with Pipeline.load(path) as pipe:
        grid = pipe.bitflip(image, [0, 9])
        indices = pipe.encode(image[None])
        expected = pipe.decode(np.concatenate([indices, indices ^ 1, indices ^ 512]))
        with pytest.raises(ValueError, match="bit 10 does not exist"):
            pipe.bitflip(image, [10])
    assert grid.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(grid[0], image)
    np.testing.assert_array_equal(grid[1:], expected)
    assert not np.array_equal(grid[1], grid[3])


def test_class_names_must_match_the_generator(tmp_path):
    tok, gen = sharpened_models("tiny_lfq6_g1")
    with pytest.raises(ValueError, match="2 class names for 1000 classes"):
        build_bundle(tmp_path / "b", tok, gen, class_names=["a", "b"])


def test_guidance_zero_runs_only_the_unguided_step_and_matches_eager(bundles):
    path, tok, gen = bundles["tiny_lfq9_g3"]
    eager = maskbit.generate(tok, gen, labels=[1, 2, 5], num_steps=5, guidance_scale=0.0, seed=3)
    with Pipeline.load(path) as pipe:
        out = pipe.generate(labels=[1, 2, 5], num_steps=5, guidance_scale=0.0, seed=3)
        assert {component for component, _ in pipe.backend.lanes} == {"step_unguided"}
    np.testing.assert_array_equal(out.tokens, eager.tokens)


def test_uint8_appears_only_as_graph_input_or_output():
    """TensorRT's ONNX parser refuses uint8 tensors inside a network: every Cast to uint8 must produce a graph
    output directly (the shipped demo bundle is checked, since every bundle is exported by the same code)."""
    import onnx
    from maskbit_runtime.cli import DEMO_BUNDLE
    for path in sorted(DEMO_BUNDLE.glob("*.onnx")):
        graph = onnx.load(str(path), load_external_data=False).graph
        outputs = {o.name for o in graph.output}
        for node in graph.node:
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if node.op_type == "Cast" and to == onnx.TensorProto.UINT8:
                assert set(node.output) <= outputs, f"{path.name}: {node.name} casts to uint8 inside the graph"
