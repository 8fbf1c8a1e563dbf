"""Reduced-precision export (`--precision int8`): quantized graphs, the distribution gate, the runtime."""

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import maskbit
from maskbit_export import PRECISIONS, ExportOptions, VerificationError, build_bundle
from maskbit_export import quality
from maskbit_export.cli import main as export_cli
from maskbit_export.quantize import weight_matmuls
from maskbit_export.verify import teacher_forced_agreement
from maskbit_runtime import Pipeline
from maskbit_runtime.schedules import plan_steps

PRESET = "tiny_lfq10"


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return maskbit.build_tokenizer(PRESET), maskbit.build_generator(PRESET)


@pytest.fixture(scope="module")
def int8_bundle(models, tmp_path_factory):
    tok, gen = models
    path = tmp_path_factory.mktemp("int8") / "bundle"
    build_bundle(path, tok, gen, options=ExportOptions(max_batch=2, precision="int8"))
    return path


def test_int8_is_an_export_option():
    assert "int8" in PRECISIONS
    result = CliRunner().invoke(export_cli, ["build-engines", "--help"])
    assert "int8" in result.output


def test_int8_bundle_quantizes_the_generator_and_keeps_the_sensitive_layers(int8_bundle):
    manifest = Pipeline.load(int8_bundle).manifest
    precisions = {name: entry.precision for name, entry in manifest.components.items()}
    assert precisions == {"encoder": "fp32", "decoder": "fp32", "step": "int8", "step_unguided": "int8",
                          "combine": "fp32"}                 # the gate's transformer graph is not kept
    assert not (int8_bundle / "transformer.onnx").exists()
    model = onnx.load(str(int8_bundle / "step.onnx"))     # reads the shared generator.weights too
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger"}
    assert len(weight_matmuls(model)) == 3          # input projection, last layer and prediction layer stay float32


def test_int8_verification_records_the_distribution_gate(int8_bundle):
    report = Pipeline.load(int8_bundle).manifest.verification
    gate = report["distribution"]
    assert gate["passed"] and gate["gate"] == quality.GATES["int8"]
    assert 0 < gate["tv_mean"] <= gate["gate"]["tv_mean"] and gate["tv_worst_step"] >= gate["tv_mean"]
    assert gate["num_steps"] == 8 and gate["drawn_groups"] > 0 and "avx2" in gate["cpu_flags"]
    assert 0 < report["agreement"]["agreement"] <= 1                   # still reported, no longer gated


def test_int8_bundle_generates(int8_bundle):
    with Pipeline.load(int8_bundle) as pipe:
        out = pipe.generate([1, 2, 3], seed=0)
    assert out.images.shape == (3, 32, 32, 3) and out.images.dtype == np.uint8


def test_agreement_counts_only_drawn_groups(models, int8_bundle):
    _, gen = models
    step = maskbit.GenerationStep(gen).eval()
    plan = plan_steps(4, gen.config.num_tokens * gen.config.codebook_splits, guidance_scale=2.0)

    class Wrong:                                     # always draws another class than float32
        def run(self, names, feeds):
            sampled = step(*(torch.from_numpy(np.array(feeds[k])) for k in feeds))[1].numpy()
            keep = feeds["tokens"] != gen.config.mask_token
            return [np.where(keep, sampled, (sampled + 1) % gen.config.mask_token)]

    assert teacher_forced_agreement(step, Wrong(), [1], plan, seed=0)["agreement"] == 0.0


def test_distances_are_zero_for_equal_models_and_grow_with_the_difference():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 6, 2, 8)).astype(np.float32)          # doubled batch of 2
    p = quality.guided_probs(logits, 2, 3.0, 1.0)
    np.testing.assert_allclose(p.sum(-1), 1.0)
    drawn = np.ones((2, 6, 2), bool)
    tv, kl = quality.distances(p, p, drawn)
    assert tv.max() == 0 and abs(kl).max() < 1e-12
    far = quality.guided_probs(logits + rng.standard_normal(logits.shape).astype(np.float32), 2, 3.0, 1.0)
    near = quality.guided_probs(logits + 0.01 * rng.standard_normal(logits.shape).astype(np.float32), 2, 3.0, 1.0)
    assert 0 < quality.distances(p, near, drawn)[0].mean() < quality.distances(p, far, drawn)[0].mean() <= 1
    one_hot = np.eye(8)[None, None, None].repeat(2, 0).repeat(6, 1).repeat(2, 2)[..., 0, :]
    assert quality.distances(one_hot, np.roll(one_hot, 1, -1), drawn)[0].min() == 1.0   # disjoint: TV = 1


def test_build_fails_when_the_distribution_gate_fails(models, tmp_path, monkeypatch):
    tok, gen = models
    monkeypatch.setitem(quality.GATES, "int8", {"tv_mean": 1e-9, "tv_worst_step": 1e-9})
    with pytest.raises(VerificationError, match="sampling distributions are too far from float32's"):
        build_bundle(tmp_path / "b", tok, gen, options=ExportOptions(max_batch=2, precision="int8"))
    assert list(tmp_path.iterdir()) == []                 # nothing half-written is left
