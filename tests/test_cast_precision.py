"""fp16/bf16 generator graphs (`--precision fp16|bf16`, export/cast.py) at the CPU tier: the cast module, the types in
the exported graphs (weights reduced, norms/logits/sampler float32), the bfloat16 emulation that lets ONNX Runtime's
CPU provider run them, the distribution gate at export, and what the runtime does with them on the CPU. The engines
built from these graphs are checked in tests/test_tensorrt.py (GPU tier)."""

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import maskbit
from maskbit.step import GenerationStep
from maskbit_export import ExportOptions, build_bundle
from maskbit_export import quality
from maskbit_export.cast import CastGenerator, cpu_session, emulate_in_float32, graph_types
from maskbit_export.graphs import dims_of, random_inputs
from maskbit_export.onnx_export import export_onnx
from maskbit_runtime import Pipeline
from maskbit_runtime.backends import BackendError
from maskbit_runtime.manifest import Manifest
from maskbit_runtime.specs import COMPONENTS, STEP

PRESET = "tiny_lfq10"
LABELS = [1, 2]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return maskbit.build_tokenizer(PRESET), maskbit.build_generator(PRESET).eval()


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def bundle(request, models, tmp_path_factory):
    tok, gen = models
    path = tmp_path_factory.mktemp(request.param) / "bundle"
    build_bundle(path, tok, gen, options=ExportOptions(max_batch=2, precision=request.param))
    return request.param, path


def _transformer_inputs(models, batch=3):
    tok, gen = models
    spec = COMPONENTS["transformer"]
    sample = random_inputs(spec, dims_of(tok, gen), batch, seed=5, codebook_size=tok.config.codebook_size,
                           num_classes=gen.config.num_classes)
    return spec, sample, [torch.from_numpy(np.array(sample[t.name])) for t in spec.inputs]


@pytest.mark.parametrize("precision, dtype, tol", [("fp16", torch.float16, 0.02), ("bf16", torch.bfloat16, 0.15)])
def test_the_cast_generator_keeps_norms_and_logits_in_float32(models, precision, dtype, tol):
    _, gen = models
    cast = CastGenerator(gen, precision)
    norms = [m for m in cast.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    others = {p.dtype for n, p in cast.named_parameters() if ".norm." not in n and "first_layer" not in n
              and not n.startswith("inner.last_layer.2")}
    assert others == {dtype}
    _, _, args = _transformer_inputs(models)
    with torch.no_grad():
        reference, logits = gen(*args), cast(*args)
    assert logits.dtype == torch.float32
    error = (logits - reference).abs().max().item()
    assert 0 < error < tol                         # reduced, so not equal; close, so not broken
    assert all(p.dtype == torch.float32 for p in gen.parameters())      # the original is untouched


def test_bfloat16_emulation_rounds_where_values_are_produced(tmp_path):
    """x -> Cast(bf16) -> Mul(w) -> Cast(float): emulated in ONNX Runtime it equals bf16 arithmetic (round x, round
    the product), and differs from plain float32 (so the rounding is really there)."""
    w = np.array([1.0 + 2 ** -7, 3.0, 1.0 / 3.0], dtype=np.float32).astype(ml_dtypes.bfloat16)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
         helper.make_node("Mul", ["xb", "w"], ["yb"]),
         helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "g.onnx")
    x = np.array([1.0 + 2 ** -9, 1.2345678, 7.654321], dtype=np.float32)
    y = cpu_session(ort, tmp_path / "g.onnx").run(None, {"x": x})[0]
    expected = (x.astype(ml_dtypes.bfloat16).astype(np.float32) * w.astype(np.float32)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(y, expected.astype(np.float32))
    assert not np.array_equal(y, x * w.astype(np.float32))
    emulated = emulate_in_float32(model)
    assert not any(i.data_type == TensorProto.BFLOAT16 for i in emulated.graph.initializer)
    assert sum(n.op_type == "Cast" for n in emulated.graph.node) == 2 + 2 * 2   # a round trip per bf16 value


def test_the_emulated_bfloat16_graph_matches_its_eager_module(models, tmp_path):
    """The exported bf16 transformer, emulated in ONNX Runtime, against the same cast module in eager PyTorch (whose
    fused kernels round less often): close, and both clearly apart from float32 agreement."""
    _, gen = models
    spec, sample, args = _transformer_inputs(models)
    cast = CastGenerator(gen, "bf16").eval()
    export_onnx(cast, spec, sample, tmp_path / "t.onnx")
    out = cpu_session(ort, tmp_path / "t.onnx").run(None, sample)[0]
    with torch.no_grad():
        eager, reference = cast(*args).numpy(), gen(*args).numpy()
    assert np.abs(out - eager).max() < 0.15
    assert np.abs(out - reference).max() > 1e-3


def test_graphs_compute_in_their_precision_with_a_float32_sampler(bundle):
    precision, path = bundle
    for name in ("step", "step_unguided"):
        report = graph_types(onnx.load(str(path / f"{name}.onnx")), precision)
        assert report["problems"] == [], name
        assert set(report["weight_matmuls"]) == {precision.replace("fp", "float").replace("bf", "bfloat")}, name
        assert sum(report["weight_matmuls"].values()) >= 4
    assert {n: e.precision for n, e in Manifest.load(path).components.items()} == {
        "encoder": "fp32", "decoder": "fp32", "step": precision, "step_unguided": precision, "combine": "fp32"}


def test_graph_types_finds_a_reduced_precision_sampler(models, tmp_path):
    """The control: a cast generator whose logits stay in fp16 puts guidance and the sampler in fp16, and the
    fp32 graph has float32 weight matmuls; both are reported."""
    tok, gen = models

    class HalfLogits(CastGenerator):
        def forward(self, tokens, labels, drop):
            return self.inner(tokens, labels, drop)

    sample = random_inputs(STEP, dims_of(tok, gen), 2, seed=0, codebook_size=tok.config.codebook_size,
                           num_classes=gen.config.num_classes)
    export_onnx(GenerationStep(HalfLogits(gen, "fp16")).eval(), STEP, sample, tmp_path / "bad.onnx")
    problems = graph_types(onnx.load(str(tmp_path / "bad.onnx")), "fp16")["problems"]
    assert any("after the sampler's inputs is fp16" in p for p in problems)
    export_onnx(GenerationStep(gen).eval(), STEP, sample, tmp_path / "fp32.onnx")
    assert any("weight MatMul in FLOAT" in p for p in graph_types(onnx.load(str(tmp_path / "fp32.onnx")),
                                                                  "fp16")["problems"])


def test_export_verifies_the_distribution_gate(bundle):
    precision, path = bundle
    report = Manifest.load(path).verification
    gate = report["distribution"]
    assert gate["passed"] and gate["gate"] == quality.GATES[precision]
    assert 0 < gate["tv_mean"] <= gate["gate"]["tv_mean"] and gate["drawn_groups"] > 0
    assert report["components"]["step"]["passed"] and report["components"]["step_unguided"]["passed"]
    if precision == "bf16":
        assert report["generation"]["performed"] is False and "emulated" in report["generation"]["reason"]
    else:
        assert report["generation"]["num_steps"] > 0


def test_the_cpu_runtime_runs_fp16_and_refuses_bf16_in_one_line(bundle, models):
    precision, path = bundle
    if precision == "fp16":
        with Pipeline.load(path, backend="ort") as pipe:
            result = pipe.generate(LABELS, seed=0, num_steps=4)
        tok, gen = models
        assert result.tokens.shape == (2, tok.config.latent_size, tok.config.latent_size)
        assert result.tokens.min() >= 0 and result.tokens.max() < tok.config.codebook_size
        return
    with Pipeline.load(path, backend="ort") as pipe, pytest.raises(BackendError) as error:
        pipe.generate(LABELS, seed=0, num_steps=4)
    message = str(error.value)
    assert "\n" not in message and "bfloat16 graph" in message and "--precision fp16" in message
