"""Process-level guarantees: SIGKILL + --resume equals an uninterrupted run; torchrun x2 matches one process."""

import contextlib
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from train_support import FAST, REPO, cli, env, make_photo_folder

from maskbit.train.checkpointing import checkpoint_dirs
from maskbit.train.metrics import read_metrics

COMMON = ("--config", "tiny_lfq10", "--batch-size", "4", "--seed", "7", "--eval-every", "0", "--threads", "1",
          "--quiet", *FAST, "losses.discriminator_start=8")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"), per_photo=4)


def _lines(path):
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):     # a line being written
            out.append(json.loads(line))
    return out


def _weights(out):
    final = checkpoint_dirs(out / "checkpoints")[-1]
    return {name: load_file(str(final / f"{name}.safetensors")) for name in ("model", "ema", "loss")}


def test_sigkill_between_checkpoints_then_resume_is_exact(photos, tmp_path):
    steps = ("--max-steps", "24", "--save-every", "5", "--keep", "2")
    cli("tokenizer", "--data", str(photos), "--output-dir", str(tmp_path / "full"), *steps, *COMMON)

    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "maskbit.train.cli", "tokenizer", "--data", str(photos), "--output-dir", str(killed),
            *steps, *COMMON]
    proc = subprocess.Popen(args, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:      # kill once step 12 is logged: between 10 and 15
        if (killed / "metrics.jsonl").exists() and any(r["step"] >= 12 for r in _lines(killed / "metrics.jsonl")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    last = checkpoint_dirs(killed / "checkpoints")[-1]
    assert not (killed / "tokenizer.safetensors").exists()
    killed_at = max(r["step"] for r in read_metrics(killed))
    assert int(last.name.split("-")[1]) < killed_at < 24        # steps after the checkpoint were lost

    done = cli("tokenizer", "--data", str(photos), "--output-dir", str(killed), *steps, *COMMON, "--resume")
    assert json.loads(done.stdout)["resumed_from"] == int(last.name.split("-")[1])
    full, resumed = _weights(tmp_path / "full"), _weights(killed)
    for name in full:
        assert full[name].keys() == resumed[name].keys()
        for key in full[name]:
            assert torch.equal(full[name][key], resumed[name][key]), (name, key)
    a = load_file(str(tmp_path / "full" / "tokenizer.safetensors"))
    b = load_file(str(killed / "tokenizer.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs_a = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "train"]
    logs_b = [r for r in read_metrics(killed) if r["kind"] == "train"]
    assert [r["step"] for r in logs_b] == list(range(1, 25))    # lines written after the checkpoint were dropped
    assert logs_a == logs_b
    print(f"killed after step {killed_at}, resumed from {last.name}")


def test_torchrun_two_processes_match_one_process(photos, tmp_path):
    steps = ("--max-steps", "12", "--save-every", "6")
    one = ("--config", "tiny_lfq10", "--seed", "7", "--eval-every", "0", "--threads", "1", "--quiet", *FAST,
           "losses.discriminator_start=6")
    cli("tokenizer", "--data", str(photos), "--output-dir", str(tmp_path / "single"), "--batch-size", "8",
        *steps, *one)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "maskbit.train.cli", "tokenizer", "--data", str(photos), "--output-dir", str(tmp_path / "ddp"),
         "--batch-size", "4", *steps, *one], env=env(), cwd=REPO, capture_output=True, text=True, timeout=300,
        check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = [r for r in read_metrics(tmp_path / "single") if r["kind"] == "train"]
    ddp = [r for r in read_metrics(tmp_path / "ddp") if r["kind"] == "train"]
    assert [r["step"] for r in ddp] == list(range(1, 13))
    # step 1: the same 8 images, the same initial weights -> the same loss up to float summation order
    assert ddp[0]["reconstruction_loss"] == pytest.approx(single[0]["reconstruction_loss"], rel=1e-5)
    print("single", [round(r["reconstruction_loss"], 5) for r in single])
    print("ddp   ", [round(r["reconstruction_loss"], 5) for r in ddp])
    for a, b in zip(single, ddp):
        assert b["reconstruction_loss"] == pytest.approx(a["reconstruction_loss"], rel=0.03), (a["step"], a, b)
        assert b["commitment_loss"] == pytest.approx(a["commitment_loss"], rel=0.05)
    assert "lecam_loss" in ddp[-1]
    assert (tmp_path / "ddp" / "tokenizer.safetensors").exists()
    assert checkpoint_dirs(tmp_path / "ddp" / "checkpoints")
