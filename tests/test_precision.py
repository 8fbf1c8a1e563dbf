"""Reduced-precision export (`--precision int8`): quantized graphs, the teacher-forced agreement gate, the runtime."""

import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import maskbit
from maskbit_export import PRECISIONS, VerificationError, build_bundle
from maskbit_export import bundle as bundle_module
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
    build_bundle(path, tok, gen, maskbit.get_preset(PRESET), max_batch=2, precision="int8")
    return path


def test_int8_is_an_export_option():
    assert "int8" in PRECISIONS
    result = CliRunner().invoke(export_cli, ["build-engines", "--help"])
    assert "int8" in result.output


def test_int8_bundle_quantizes_the_generator_and_keeps_the_sensitive_layers(int8_bundle):
    manifest = Pipeline.load(int8_bundle).manifest
    precisions = {name: entry["precision"] for name, entry in manifest.components.items()}
    assert precisions == {"encoder": "fp32", "decoder": "fp32", "step": "int8", "transformer": "int8",
                          "combine": "fp32"}
    model = onnx.load(str(int8_bundle / "step.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulInteger"}
    assert len(weight_matmuls(model)) == 3          # input projection, last layer and prediction layer stay float32


def test_int8_verification_records_the_agreement_gate(int8_bundle):
    report = Pipeline.load(int8_bundle).manifest.data["verification"]
    agreement = report["agreement"]
    assert agreement["passed"] and agreement["agreement"] >= agreement["minimum"] == 0.99
    assert agreement["num_steps"] == 64 and agreement["drawn_groups"] > 0


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


def test_build_fails_below_the_agreement_minimum(int8_bundle, models, tmp_path, monkeypatch):
    tok, gen = models
    copy = tmp_path / "bundle"
    shutil.copytree(int8_bundle, copy)
    monkeypatch.setitem(bundle_module.MIN_AGREEMENT, "int8", 1.01)
    monkeypatch.setattr(bundle_module, "AGREEMENT_STEPS", 4)
    with pytest.raises(VerificationError, match="float32 group"):
        bundle_module._verify_all(copy, ["step"], tok, gen, bundle_module.dims_of(tok, gen), tok.config.codebook_size,
                                  gen.config.num_classes, "int8", 2, lambda message: None)
