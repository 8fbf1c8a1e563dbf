"""Hostile situations for `maskbit-train`: another run's output directory, resuming at or past --max-steps, a
truncated newest checkpoint, decompression bombs in the data, failing checkpoint writes. Tiny preset, few steps."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_hardening_inputs import forged_png
from train_support import FAST, make_photo_folder

from maskbit.train import checkpointing
from maskbit.train.checkpointing import checkpoint_dirs
from maskbit.train.cli import main

BASE = ("--config", "tiny_lfq10", "--batch-size", "4", "--eval-every", "0", "--quiet", *FAST)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"), per_photo=2, size=32)


@pytest.fixture(scope="module")
def finished(photos, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = _train(photos, out, "--max-steps", "4", "--save-every", "2", "--seed", "7")
    assert result.exit_code == 0, result.output
    return out


def _train(photos, out, *args):
    return CliRunner().invoke(main, ["tokenizer", "--data", str(photos), "--output-dir", str(out), *BASE, *args])


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(result, text):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], result.output


def _copy(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


def test_new_run_in_a_finished_runs_directory_is_refused(photos, finished, tmp_path):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    same = _train(photos, out, "--max-steps", "4", "--save-every", "2", "--seed", "7")
    _one_line_error(same, f"--output-dir {out} already holds this run's checkpoints (newest step-00000004); "
                          f"pass --resume to continue it")
    other_seed = _train(photos, out, "--max-steps", "4", "--save-every", "2", "--seed", "8")
    _one_line_error(other_seed, f"--output-dir {out} holds another run (differs in training.seed: 7 -> 8)")
    other_model = _train(photos, out, "--max-steps", "4", "--seed", "7", "tokenizer.hidden_channels=64")
    _one_line_error(other_model, "holds another run (differs in tokenizer.hidden_channels: 32 -> 64)")
    assert _snapshot(out) == before


def test_resume_of_another_run_names_the_difference(photos, finished, tmp_path):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    result = _train(photos, out, "--max-steps", "6", "--seed", "8", "--resume")
    _one_line_error(result, f"--resume: step-00000004 in {out} belongs to another run (differs in training.seed: "
                            f"7 -> 8)")
    result = _train(photos, out, "--max-steps", "6", "--seed", "7", "--resume", "optimizer.params.beta1=0.5")
    _one_line_error(result, "belongs to another run (differs in optimizer.params.beta1: 0.9 -> 0.5)")
    assert _snapshot(out) == before


@pytest.mark.parametrize("max_steps", ["4", "3"])
def test_resume_at_or_past_max_steps_trains_and_exports_nothing(photos, finished, tmp_path, max_steps):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    result = CliRunner().invoke(main, [
        "tokenizer", "--data", str(photos), "--output-dir", str(out), *BASE, "--seed", "7", "--max-steps", max_steps,
        "--resume"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (f"warning: the run in {out} is already at step 4, at or past --max-steps; "
                                     f"nothing was trained or exported")
    summary = json.loads(result.stdout)
    assert (summary["steps"], summary["resumed_from"], summary["already_done"]) == (4, 4, True)
    assert summary["export"] == str(out / "tokenizer.safetensors")
    assert _snapshot(out) == before                     # no checkpoint, metrics line or export written


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(photos, finished, tmp_path):
    out = _copy(finished, tmp_path)
    newest = out / "checkpoints" / "step-00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    result = CliRunner().invoke(main, [
        "tokenizer", "--data", str(photos), "--output-dir", str(out), *BASE, "--seed", "7", "--max-steps", "5",
        "--save-every", "2", "--resume"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: step-00000004 is unreadable: ")
    assert warnings[0].endswith("; resuming from the older step-00000002")
    summary = json.loads(result.stdout)
    assert (summary["resumed_from"], summary["steps"]) == (2, 5)
    assert summary["skipped_checkpoints"] == [str(out / "checkpoints" / "step-00000004")]
    assert [d.name for d in checkpoint_dirs(out / "checkpoints")] == ["step-00000002", "step-00000004",
                                                                      "step-00000005"]
    assert checkpointing.load(out / "checkpoints" / "step-00000004")[1]["step"] == 4   # rewritten, intact again


def test_no_intact_checkpoint_is_one_line(photos, finished, tmp_path):
    out = _copy(finished, tmp_path)
    for folder in checkpoint_dirs(out / "checkpoints"):
        (folder / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    result = _train(photos, out, "--seed", "7", "--max-steps", "6", "--resume")
    _one_line_error(result, f"--resume: none of the 2 checkpoints in {out / 'checkpoints'} is usable; newest: "
                            f"step-00000004 is unreadable")


def test_bombs_and_unreadable_images_in_the_data_are_skipped_and_counted(photos, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    forged_png(data / "0_astronaut" / "bomb.png", 100_000, 100_000)       # Pillow's own bomb error
    forged_png(data / "1_chelsea" / "big.png", 9000, 9000)                # above our pixel limit
    (data / "2_coffee" / "junk.png").write_bytes(b"not an image at all")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(data / "3_rocket" / "deep.png")   # 16-bit: usable
    result = CliRunner().invoke(main, [
        "tokenizer", "--data", str(data), "--output-dir", str(tmp_path / "o"), *BASE, "--max-steps", "4",
        "--batch-size", "6", "--save-every", "0"])
    assert result.exit_code == 0, result.output
    prefix = "warning: skipped corrupt image "
    skipped = sorted(line[len(prefix):].split(": ")[0].rsplit("/", 1)[-1] for line in result.stderr.splitlines()
                     if line.startswith(prefix))
    assert skipped == ["big.png", "bomb.png", "junk.png"], result.stderr
    assert "9000x9000 = 81,000,000 pixels, above the limit" in result.stderr
    assert "is a decompression bomb" in result.stderr
    assert json.loads(result.stdout)["corrupt_images"] == 3


def test_failed_checkpoint_write_leaves_no_temporary_folder(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    checkpointing.save(root, 1, {"model": {"w": torch.zeros(2)}}, {"step": 1}, {}, keep=3)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpointing.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpointing.save(root, 2, {"model": {"w": torch.ones(2)}}, {"step": 2}, {}, keep=3)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
