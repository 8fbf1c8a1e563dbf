"""maskbit-export against careless use: --force removes only what the tool wrote, a half-precision overflow is refused
before anything is written (with or without --no-verify), and what killed exports leave is cleaned by the next one."""

import hashlib
import json
import os
import re
import string
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import maskbit
from maskbit_export.bundle import _check_target
from maskbit_runtime.errors import InputError
from maskbit_runtime.manifest import MANIFEST, Manifest


def export(checkpoints: Path, *args):
    from maskbit_export.cli import main as export_cli
    return CliRunner().invoke(export_cli, ["build-engines", "--tokenizer", str(checkpoints / "tok.safetensors"),
                                           "--max-batch", "2", "--no-verify", *map(str, args)])


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (f"-> {os.readlink(p)}" if p.is_symlink() else
                                       hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def one_line_error(result, fragment: str) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert "Traceback" not in result.output
    return errors[0]


@pytest.fixture(scope="module")
def built(checkpoints, tmp_path_factory):
    """A tokenizer-only bundle as the export wrote it (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("built") / "B"
    assert export(checkpoints, "--out", out).exit_code == 0
    return out


def fresh(built: Path, tmp_path: Path) -> Path:
    import shutil
    return Path(shutil.copytree(built, tmp_path / "B", symlinks=True))


# ---------------------------------------------------------------------------------------------------------------
# --force removes only what this tool wrote


@pytest.mark.parametrize("make", ["file", "folder", "hidden", "link", "unnamed onnx"])
def test_force_refuses_a_bundle_that_holds_user_files(checkpoints, built, tmp_path, make):
    """Old code: any folder whose manifest.json had the right "format" was replaced and the user's files deleted."""
    out = fresh(built, tmp_path)
    if make == "file":
        (out / "thesis.tex").write_text("years of work")
    elif make == "folder":
        (out / "notes").mkdir()
        (out / "notes" / "a.txt").write_text("mine")
    elif make == "hidden":
        (out / ".git").write_text("gitdir: elsewhere")
    elif make == "link":
        (out / "data").symlink_to(tmp_path)
    else:                                      # a name the manifest does not give (a tokenizer-only bundle)
        (out / "step.onnx").write_bytes(b"my own graph")
    before = tree(tmp_path)
    message = one_line_error(export(checkpoints, "--force", "--out", out),
                             "--force replaces only what maskbit-export wrote, and")
    assert "which its manifest does not name; move them out first; nothing was changed" in message
    assert tree(tmp_path) == before                          # no lock, no partial folder, nothing removed


def test_force_replaces_a_bundle_with_its_own_files_and_temporaries(checkpoints, built, tmp_path):
    """Control: what the tool wrote (files named by the manifest, a killed writer's temporaries, the TensorRT
    timing cache) is replaced; the new bundle loads."""
    out = fresh(built, tmp_path)
    (out / ".manifest.json.k2j4x.tmp").write_text("{")
    (out / ".decoder.onnx.abc.tmp.onnx").write_bytes(b"half")
    (out / "tensorrt.timing-cache").write_bytes(b"cache")
    result = export(checkpoints, "--force", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", MANIFEST]
    assert Manifest.load(out).complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(string.ascii_letters + string.digits + "._- ~", min_size=1, max_size=24))
def test_force_check_refuses_any_file_it_did_not_write(built, tmp_path_factory, name):
    """Any other plain file name (hidden, like a bundle file, with .tmp in it) makes --force refuse; names of the
    manifest's own files and of their temporaries (`.<name>.<random>.tmp[.ext]`) do not."""
    out = fresh(built, tmp_path_factory.mktemp("f"))
    ours = {"encoder.onnx", "decoder.onnx", MANIFEST, "tensorrt.timing-cache"}
    temporary = re.fullmatch(r"\.(encoder\.onnx|decoder\.onnx|manifest\.json|tensorrt\.timing-cache)\..*\.tmp(\..*)?",
                             name)
    if name in (".", "..") or name in ours:
        return
    (out / name).write_bytes(b"x")
    if temporary:
        _check_target(out, force=True)
    else:
        with pytest.raises(InputError, match="--force replaces only what maskbit-export wrote"):
            _check_target(out, force=True)


# ---------------------------------------------------------------------------------------------------------------
# Half precision that overflows


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """tiny_lfq10 whose linear weights are 10^4 times larger: finite in float32 (logits up to ~5e3), NaN in fp16."""
    root = tmp_path_factory.mktemp("big")
    config = maskbit.resolve_config("tiny_lfq10")
    generator = maskbit.build_generator("tiny_lfq10")
    with torch.no_grad():
        for name, p in generator.named_parameters():
            if p.dim() == 2 and "emb" not in name:
                p.mul_(1e4)
    maskbit.save_tokenizer(maskbit.build_tokenizer("tiny_lfq10"), root / "tok.safetensors", config)
    maskbit.save_generator(generator, root / "gen.safetensors", config)
    return root


@pytest.mark.parametrize("verify", [False, True])
def test_fp16_overflow_is_refused_before_anything_is_written(overflowing, tmp_path, verify):
    """Old code with --no-verify: a complete bundle that draws garbage tokens from NaN logits, without a word."""
    args = ["--generator", overflowing / "gen.safetensors", "--precision", "fp16", "--out", tmp_path / "b"]
    result = export(overflowing, *args) if not verify else _export_verified(overflowing, *args)
    message = one_line_error(result, "the fp16 generator's logits are NaN or infinite on a sample input")
    assert "its activations overflow fp16; export --precision fp32 or bf16" in message
    assert list(tmp_path.iterdir()) == []


def _export_verified(checkpoints: Path, *args):
    from maskbit_export.cli import main as export_cli
    return CliRunner().invoke(export_cli, ["build-engines", "--tokenizer", str(checkpoints / "tok.safetensors"),
                                           "--max-batch", "2", *map(str, args)])


def test_fp16_of_ordinary_weights_still_exports_without_verification(checkpoints, tmp_path):
    """Control: the random tiny generator's fp16 logits are finite; the bundle is written and says fp16."""
    result = export(checkpoints, "--generator", checkpoints / "gen.safetensors", "--precision", "fp16", "--out",
                    tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / MANIFEST).read_text())["components"]["step"]["precision"] == "fp16"
