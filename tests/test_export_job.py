"""The export job (export/job.py): every rule between `maskbit-export build-engines` options is refused when the job
is made, in one line, before a checkpoint is read or anything is written. The checkpoints named here do not exist:
a rule that let the export start would fail on them with another message."""

import dataclasses
import re

import pytest
from click.testing import CliRunner

from maskbit_export import tensorrt as trt_export
from maskbit_export.cli import main as export_cli
from maskbit_export.job import ExportJob, ExportRuleError
from maskbit_runtime.errors import InputError

GEN = "--generator"
RULES = [
    (["--max-batch", "4", "--opt-batch", "8", GEN], "the optimum batch must be an integer in [1, max batch 4], got 8"),
    (["--engine-precision", "bf16", GEN], "--engine-precision applies to engines: add --backend tensorrt or aoti"),
    (["--aoti-device", "cpu", GEN], "--aoti-device applies to AOTInductor packages: add --backend aoti"),
    (["--backend", "aoti", "--engine-precision", "tf32", GEN], "--backend aoti supports --engine-precision fp32 or "
                                                              "bf16, not tf32"),
    (["--backend", "tensorrt", "--engine-precision", "fp16", "--precision", "fp32", GEN],
     "--engine-precision fp16 builds from fp16 graphs; drop --precision fp32 or pass --precision fp16"),
    (["--backend", "tensorrt", "--engine-precision", "tf32", "--precision", "bf16", GEN],
     "--engine-precision tf32 builds from fp32 graphs; drop --precision bf16 or pass --precision fp32"),
    (["--backend", "tensorrt", "--precision", "int8", GEN],
     "--engine-precision fp32 builds from fp32 graphs; drop --precision int8 or pass --precision fp32"),
    (["--precision", "int8"], "--precision applies to the generator, and this export has no --generator"),
    (["--precision", "fp16", "--backend", "tensorrt", "--engine-precision", "fp16"],
     "--precision applies to the generator, and this export has no --generator"),
    (["--with-transformer", "--class-names", "a,b"],
     "--with-transformer and --class-names apply to the generator, and this export has no --generator: add one or "
     "drop --with-transformer and --class-names"),
]


def _args(tmp_path, args):
    """The command line, with GEN standing for `--generator <a checkpoint that does not exist>`."""
    generator = [GEN, str(tmp_path / "missing-gen.safetensors")] if GEN in args else []
    return ["build-engines", "--tokenizer", str(tmp_path / "missing-tok.safetensors"), "--out", str(tmp_path / "b"),
            *generator, *(a for a in args if a != GEN)]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("args, message", RULES)
def test_each_rule_fails_in_one_line_before_anything_is_read_or_written(tmp_path, args, message):
    before = _tree(tmp_path)
    result = CliRunner().invoke(export_cli, _args(tmp_path, args))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: ") and message in lines[0]
    assert _tree(tmp_path) == before                 # no --out, no lock, no partial folder


def _job(tmp_path, **fields):
    return ExportJob(tokenizer=str(tmp_path / "tok.safetensors"), out=tmp_path / "b", **fields)


@pytest.mark.parametrize("fields, message", [
    ({"backend": "onnx2"}, "--backend must be one of onnx, tensorrt, aoti, got 'onnx2'"),
    ({"precision": "fp8", "generator": "g"}, "--precision must be one of fp32, int8, fp16, bf16, got 'fp8'"),
    ({"engine_precision": "int4", "backend": "tensorrt"}, "--engine-precision must be one of"),
    ({"aoti_device": "tpu", "backend": "aoti"}, "--aoti-device must be one of cpu, cuda, got 'tpu'"),
    ({"opset": 16}, "--opset must be an integer >= 17, got 16"),
    ({"max_batch": 0}, "max batch must be an integer in [1, 4096], got 0"),
    ({"max_batch": 4097}, "max batch must be an integer in [1, 4096], got 4097"),
    ({"class_names": ("a",)}, "--class-names applies to the generator"),
])
def test_values_out_of_range_are_refused_by_the_job_itself(tmp_path, fields, message):
    """Python callers get the same checks as the command line, whose option types already refuse most of these."""
    with pytest.raises(ExportRuleError, match=re.escape(message)):
        _job(tmp_path, **fields)
    assert not (tmp_path / "b").exists()


def test_an_existing_out_is_refused_when_the_job_is_made(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists; choose another --out or pass --force"):
        _job(tmp_path)
    with pytest.raises(InputError, match="--force replaces only a bundle directory"):
        _job(tmp_path, force=True)
    result = CliRunner().invoke(export_cli, _args(tmp_path, ["--force"]))
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"Error: --force replaces only a bundle directory, and {tmp_path / 'b'} is not one (no maskbit manifest); "
        f"nothing was changed"], result.output
    assert _tree(tmp_path) == ["b", "b/notes.txt"]


@pytest.mark.parametrize("fields, graphs", [
    ({}, "fp32"),
    ({"generator": "g", "precision": "int8"}, "int8"),
    ({"generator": "g", "backend": "aoti", "engine_precision": "bf16"}, "fp32"),
    ({"generator": "g", "backend": "tensorrt", "engine_precision": "tf32"}, "fp32"),
    ({"generator": "g", "backend": "tensorrt", "engine_precision": "bf16"}, "bf16"),
    ({"generator": "g", "backend": "tensorrt", "engine_precision": "fp16", "precision": "fp16"}, "fp16"),
    ({"backend": "tensorrt", "engine_precision": "fp16"}, "fp32"),      # tokenizer graphs are always float32
])
def test_the_graph_precision_follows_the_backend(tmp_path, fields, graphs):
    job = _job(tmp_path, max_batch=4, opt_batch=2, **fields)
    assert job.graph_precision == graphs and job.options.precision == graphs
    assert (job.options.max_batch, job.options.opt_batch) == (4, 2)


@pytest.mark.parametrize("engine, graphs", [("fp32", "fp32"), ("tf32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16")])
def test_one_rule_maps_engine_to_graph_precision(engine, graphs):
    """The job and the engine build (component_precisions) both ask tensorrt.graph_precision."""
    assert trt_export.graph_precision(engine) == graphs
    with pytest.raises(InputError, match="engine precision 'int8' is not supported"):
        trt_export.graph_precision("int8")


def test_the_job_is_a_frozen_value_named_like_the_flags(tmp_path):
    job = _job(tmp_path, generator="g", class_names=["a", "b"])
    assert job.class_names == ("a", "b") and job.out == tmp_path / "b"
    with pytest.raises(AttributeError):
        job.max_batch = 2
    flags = {p.name for p in export_cli.commands["build-engines"].params}
    assert flags == {f.name for f in dataclasses.fields(ExportJob)}


def test_run_keeps_the_onnx_bundle_when_the_package_build_fails(tmp_path, monkeypatch):
    """The job exports, then hands the bundle to the package build with its own options; a failed build is one line
    that says the ONNX bundle is complete."""
    import maskbit
    from maskbit_export import aoti
    from maskbit_runtime.manifest import Manifest

    preset = maskbit.get_preset("tiny_lfq10")
    maskbit.save_tokenizer(maskbit.build_tokenizer("tiny_lfq10"), tmp_path / "tok.safetensors", preset)
    maskbit.save_generator(maskbit.build_generator("tiny_lfq10"), tmp_path / "gen.safetensors", preset)
    calls = []

    def failing_build(out, tokenizer, generator, **kwargs):
        assert callable(kwargs.pop("on_progress"))
        calls.append((out, type(tokenizer).__name__, type(generator).__name__, kwargs))
        raise aoti.AotiBuildError("AOTInductor could not compile step\nsecond line")

    monkeypatch.setattr(aoti, "build_aoti", failing_build)
    result = CliRunner().invoke(export_cli, [
        "build-engines", "--tokenizer", str(tmp_path / "tok.safetensors"), "--generator",
        str(tmp_path / "gen.safetensors"), "--out", str(tmp_path / "b"), "--max-batch", "2", "--no-verify",
        "--backend", "aoti", "--engine-precision", "bf16"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (f"Error: AOTInductor could not compile step (the ONNX bundle "
                                                      f"{tmp_path / 'b'} is complete and runs with the ort backend)")
    assert calls == [(tmp_path / "b", "Tokenizer", "Generator", {"device": "cpu", "precision": "bf16",
                                                                  "verify": False})]
    manifest = Manifest.load(tmp_path / "b")
    assert manifest.complete and manifest.components["step"].precision == "fp32"
