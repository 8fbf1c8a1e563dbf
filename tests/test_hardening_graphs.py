"""Component graphs that pass every declared check (names, dtypes, fixed axes, sha256 updated in the manifest) but
compute the wrong thing: refused in one line when the ONNX Runtime backend opens them (runtime/backends/probe.py),
not mid-generation with ONNX Runtime's traceback, and never silently."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from maskbit_runtime.backends.base import BackendError
from maskbit_runtime.cli import main as run_cli
from maskbit_runtime.cli_common import DEMO_BUNDLE
from maskbit_runtime.manifest import MANIFEST, sha256_file
from maskbit_runtime.pipeline import Pipeline

from bundle_support import edit

DEMO = json.loads((DEMO_BUNDLE / MANIFEST).read_text())
CLASSES = DEMO["num_classes"]


def rehash(root: Path, *components: str) -> None:
    def update(d):
        for c in components:
            d["components"][c]["file_sha256"] = sha256_file(root / d["components"][c]["file"])
    edit(root, update)


def generate(root: Path, out: Path, *args):
    return CliRunner().invoke(run_cli, ["generate", "--bundle", str(root), "--labels", "1", "--num-steps", "2",
                                        "--out", str(out), *map(str, args)])


def one_line(result, fragment: str) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)      # not an uncaught exception
    errors = [line for line in result.output.splitlines() if "Error:" in line]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert "Traceback" not in result.output
    return errors[0]


def data_dependent_combine(root: Path, shape: list[int]) -> None:
    """combine.onnx whose Reshape target depends on the input's values (x 0), so neither ONNX's shape inference nor
    ONNX Runtime's sees it: the graph still declares indices [batch, 16, 16]."""
    model = onnx.load(root / "combine.onnx")
    (reshape,) = [n for n in model.graph.node if n.op_type == "Reshape"]
    target = reshape.input[1]
    model.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), "probe_shape"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "probe_zero"))
    model.graph.node.insert(0, helper.make_node("ReduceMin", ["groups"], ["probe_min"], keepdims=0))
    model.graph.node.insert(1, helper.make_node("Mul", ["probe_min", "probe_zero"], ["probe_nothing"]))
    model.graph.node.insert(2, helper.make_node("Add", ["probe_shape", "probe_nothing"], [target + "_data"]))
    reshape.input[1] = target + "_data"
    onnx.save(model, root / "combine.onnx")
    rehash(root, "combine")


def test_combine_with_a_data_dependent_wrong_output_shape_is_one_line(bundle, tmp_path):
    """Old code: the RuntimeError traceback 'The output OrtValue provided for output indices ... has shape
    {1,16,16} but the computed output shape for this run is {1,8,32}', after the whole generation."""
    data_dependent_combine(bundle, [-1, 8, 32])
    assert onnx.load(bundle / "combine.onnx").graph.output[0].type.tensor_type.shape.dim[2].dim_value == 16
    message = one_line(generate(bundle, tmp_path / "g.png"), "combine.onnx makes indices of shape [1, 8, 32]")
    assert "but the manifest's dims give [1, 16, 16]" in message and "does not belong to this bundle" in message
    assert not (tmp_path / "g.png").exists()


def test_combine_that_orders_the_groups_the_other_way_is_refused(bundle):
    """Right shapes, wrong tokens (group 1 taken as the low bits): old code decoded other images without a word."""
    model = onnx.load(bundle / "combine.onnx")
    for init in model.graph.initializer:
        if init.name == "pow_1":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[::-1].copy(), "pow_1"))
    onnx.save(model, bundle / "combine.onnx")
    rehash(bundle, "combine")
    with Pipeline.load(bundle) as pipe, pytest.raises(BackendError, match=r"combine.onnx does not turn groups into "
                                                                          r"this bundle's token indices \(\d+ of 256"):
        pipe.generate(labels=[1], num_steps=2, seed=0)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.integers(1, 5000))
def test_num_classes_larger_than_the_class_embedding_is_one_line(tmp_path_factory, extra):
    """Old code: labels up to the graph's own num_classes ran (the first extra one silently as the unconditional
    label), higher ones died with 'Gather ... indices element out of data bounds' as a traceback."""
    root = Path(shutil.copytree(DEMO_BUNDLE, tmp_path_factory.mktemp("n") / "bundle"))
    classes = CLASSES + extra
    edit(root, lambda d: d.update(num_classes=classes, class_names=d["class_names"] + [f"x{i}" for i in range(extra)]))
    for scale in (0, 3):            # the unguided step and the guided one
        message = one_line(generate(root, root / "g.png", "--guidance-scale", scale),
                           f"cannot embed label {classes}, the unconditional one after the manifest's num_classes")
        assert "the manifest declares more classes than the graph has" in message
    with Pipeline.load(root) as pipe, pytest.raises(BackendError, match="its class embedding is smaller"):
        pipe.generate(labels=[classes - 1], num_steps=2, seed=0)
    assert not (root / "g.png").exists()


def swap_steps(root: Path) -> None:
    (root / "step.onnx").rename(root / "tmp.onnx")
    (root / "step_unguided.onnx").rename(root / "step.onnx")
    (root / "tmp.onnx").rename(root / "step_unguided.onnx")
    rehash(root, "step", "step_unguided")


def test_guided_and_unguided_steps_swapped_are_refused(bundle, tmp_path):
    """Old code: generated with and without guidance alike, without a word (hashes updated, tensors identical)."""
    swap_steps(bundle)
    one_line(generate(bundle, tmp_path / "g.png", "--guidance-scale", 3),      # opening step.onnx checks both
             "step_unguided.onnx applies guidance_scale, so it is a guided step, not step_unguided")
    one_line(generate(bundle, tmp_path / "g.png", "--guidance-scale", 0),
             "step_unguided.onnx applies guidance_scale, so it is a guided step, not step_unguided")
    assert not (tmp_path / "g.png").exists()


def test_unguided_step_copied_over_the_guided_one_is_refused(bundle):
    shutil.copy(bundle / "step_unguided.onnx", bundle / "step.onnx")
    rehash(bundle, "step")
    with Pipeline.load(bundle) as pipe, pytest.raises(BackendError, match="step.onnx ignores guidance_scale .* "
                                                                        "same file as step_unguided"):
        pipe.generate(labels=[1], num_steps=2, guidance_scale=3.0, seed=0)


def test_the_shipped_bundle_passes_every_probe_and_generates_as_without_them(monkeypatch):
    """Control: the demo bundle's three probed components open, and the probes change nothing the generation sees."""
    from maskbit_runtime.backends import ort as ort_backend

    def images():
        with Pipeline.load(DEMO_BUNDLE) as pipe:
            for component in ("combine", "step", "step_unguided"):
                pipe.backend.primitives.session(component)
            out = pipe.generate(labels=[1, 5], num_steps=4, guidance_scale=3.0, seed=7)
        return out.tokens, out.images

    probed = images()
    monkeypatch.setattr(ort_backend, "probe", lambda *args: None, raising=False)
    unprobed = images()
    assert all(np.array_equal(a, b) for a, b in zip(probed, unprobed))


def test_a_model_whose_guidance_has_no_effect_is_not_refused(tmp_path):
    """Control: without transformer layers the class token never reaches the image tokens, so guidance changes
    nothing; such a bundle (the benchmarks' overhead model) is ours and must load."""
    import dataclasses

    import maskbit
    from maskbit_export import ExportOptions, build_bundle
    config = maskbit.get_preset("tiny_lfq10")
    config = dataclasses.replace(config, generator=dataclasses.replace(config.generator, depth=0))
    build_bundle(tmp_path / "B", maskbit.build_tokenizer(config), maskbit.build_generator(config),
                 options=ExportOptions(max_batch=2, verify=False))
    with Pipeline.load(tmp_path / "B") as pipe:
        assert pipe.generate(labels=[1], num_steps=2, guidance_scale=3.0, seed=0).tokens.shape == (1, 8, 8)
