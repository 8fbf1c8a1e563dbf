"""Training on a device: where every state tensor lives, checkpoints moved between devices, and the GPU tier's
training script (benchmarks/gpu_training.py).

CPU tier: after a real run every state tensor (model, EMA shadow, optimiser moments, discriminator, LeCAM buffers,
perceptual network, frozen tokenizer) is on the run's device; a checkpoint as a CUDA run writes it (a CUDA-free
stand-in: its storages tagged cuda:0, as torch.save tags them on a GPU) resumes bit-exactly on the CPU; the training
script runs every case at tiny size on the CPU, and without a GPU skips each CUDA case with the reason. The `gpu`
tests run the placement checks with cuda and the script's checks on CUDA (scripts/gpu_suite.sh selects them).
"""

import importlib.util
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maskbit
from maskbit.train import RunOptions, checkpointing, runner, train_generator, train_tokenizer
from maskbit.train.checkpointing import checkpoint_dirs
from maskbit.train.metrics import read_metrics

pytest.importorskip("torchvision", reason="maskbit-train needs torchvision: pip install 'maskbit[train]'")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_training.py"
TINY = "tiny_lfq10"
GPU_MISSING = None if torch.cuda.is_available() else "PyTorch sees no CUDA GPU"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                               pytest.mark.skipif(GPU_MISSING is not None, reason=str(GPU_MISSING))])]

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module's tiny training runs use one thread; the setting is restored after it, so the rest of the
    pytest process (other modules, the GPU tier's compiles) keeps all its threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gpu_training():
    spec = importlib.util.spec_from_file_location("gpu_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return gpu_training().make_images(tmp_path_factory.mktemp("images"), 40, per_class=2)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.safetensors"
    return maskbit.save_tokenizer(maskbit.build_tokenizer(TINY), path, maskbit.get_preset(TINY))


def run_and_capture(train, options: RunOptions):
    """(stage, ema) of a real run as the runner holds them when it writes its last checkpoint."""
    seen = []
    save = runner._save

    def recording(stage, ema, *args):
        seen.append((stage, ema))
        return save(stage, ema, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "_save", recording)
        train(options)
    return seen[-1]


def state_tensors(stage, ema) -> dict[str, torch.Tensor]:
    """Every tensor a run holds: its modules' parameters and buffers, optimiser states, EMA shadow."""
    out = {}
    for attr, value in vars(stage).items():
        if isinstance(value, torch.nn.Module):
            for name, tensor in itertools.chain(value.named_parameters(), value.named_buffers()):
                out[f"{attr}.{name}"] = tensor
    for name, opt in stage.optimizers.items():
        for index, state in enumerate(opt.state.values()):
            out.update({f"optimizer.{name}.{index}.{key}": t for key, t in state.items() if torch.is_tensor(t)})
    out.update({f"buffers.{name}": t for name, t in stage.buffers.items()})
    out.update({f"ema.{name}": t for name, t in ema.shadow.items()})
    return out


def misplaced(tensors: dict[str, torch.Tensor], device: torch.device) -> list[str]:
    """Names of tensors off `device`. AdamW keeps its `step` counters on the CPU (unless fused or capturable)."""
    return sorted(name for name, t in tensors.items()
                  if t.device != (torch.device("cpu") if name.endswith(".step") else device))


def run_device(device: str) -> torch.device:
    return torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")


def options(images, out, device, **kwargs) -> RunOptions:
    fields = dict(config=TINY, data=str(images), output_dir=str(out), max_steps=1, batch_size=2, eval_every=0,
                  save_every=0, log_every=1, device=device)
    return RunOptions(**{**fields, **kwargs})


@pytest.fixture(scope="module")
def tokenizer_run(images, tmp_path_factory):
    """One CPU tokenizer step with every part on: discriminator, LeCAM, a (random) perceptual network."""
    return run_and_capture(train_tokenizer, options(
        images, tmp_path_factory.mktemp("tok"), "cpu", random_perceptual=True,
        overrides=("discriminator.hidden_channels=32", "losses.discriminator_start=0")))


def assert_complete(stage, ema, tensors) -> None:
    """The census holds every parameter of every optimiser with its AdamW moments, and the whole EMA."""
    assert {f"ema.{name}" for name, _ in stage.model.named_parameters()} <= set(tensors)
    for name, opt in stage.optimizers.items():
        params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        assert len(opt.state) == len(params) > 0, name
        assert all({"exp_avg", "exp_avg_sq", "step"} <= set(state) for state in opt.state.values()), name


@pytest.mark.parametrize("device", DEVICES)
def test_every_tokenizer_state_tensor_is_on_the_run_device(device, images, tmp_path, tokenizer_run):
    stage, ema = tokenizer_run if device == "cpu" else run_and_capture(train_tokenizer, options(
        images, tmp_path, device, random_perceptual=True,
        overrides=("discriminator.hidden_channels=32", "losses.discriminator_start=0")))
    tensors = state_tensors(stage, ema)
    assert misplaced(tensors, run_device(device)) == []
    assert_complete(stage, ema, tensors)
    for part in ("loss.discriminator.", "loss.perceptual_loss.", "loss.ema_real_logits_mean",
                 "optimizer.discriminator."):
        assert any(name.startswith(part) for name in tensors), part


@pytest.mark.parametrize("device", DEVICES)
def test_every_generator_state_tensor_is_on_the_run_device(device, images, tokenizer_file, tmp_path):
    # log_every=1: the step's host scalars (masked accuracy, masked CE) are averaged with its device tensors
    stage, ema = run_and_capture(train_generator, options(images, tmp_path, device, tokenizer=str(tokenizer_file)))
    tensors = state_tensors(stage, ema)
    assert misplaced(tensors, run_device(device)) == []
    assert_complete(stage, ema, tensors)
    assert any(name.startswith("tokenizer.") for name in tensors)          # the frozen tokenizer too
    logged = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert logged and 0 <= logged[0]["masked_accuracy"] <= 1


def test_the_device_census_reports_a_misplaced_tensor(tokenizer_run):
    stage, ema = tokenizer_run
    tensors = state_tensors(stage, ema)
    moment = next(name for name in tensors if name.endswith(".exp_avg"))
    shadow = next(name for name in tensors if name.startswith("ema."))
    planted = {**tensors, moment: tensors[moment].to("meta"), shadow: tensors[shadow].to("meta")}
    assert misplaced(planted, torch.device("cpu")) == sorted([moment, shadow])


def test_a_checkpoint_written_on_cuda_resumes_exactly_on_the_cpu(images, tmp_path):
    """The resumed run's last checkpoint (weights, EMA, loss module, optimisers) and its log equal an uninterrupted
    run's, bit for bit, although every tensor of the state file was stored as a CUDA tensor."""
    run = dict(max_steps=6, save_every=3, batch_size=2, seed=5,
               overrides=("losses.perceptual_weight=0", "discriminator.hidden_channels=32",
                          "losses.discriminator_start=2", "lr_scheduler.params.warmup_steps=2"))
    full = tmp_path / "full"
    train_tokenizer(options(images, full, "cpu", **run))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    (resumed / "tokenizer.safetensors").unlink()
    state_file = resumed / "checkpoints" / "step-00000003" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["rng"][0]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]          # a CUDA run stores its generator too
    with pytest.MonkeyPatch.context() as patch:                             # storages tagged as on a GPU
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, state_file)
    if GPU_MISSING:   # the stand-in is faithful: without map_location this file needs a GPU
        with pytest.raises(RuntimeError, match="CUDA device but torch.cuda.is_available"):
            torch.load(state_file, weights_only=True)
    loaded = checkpointing.load(state_file.parent)[1]
    moments = [t for s in loaded["optimizers"]["model"]["state"].values() for t in s.values()]
    assert moments and all(t.device.type == "cpu" for t in moments)

    result = train_tokenizer(options(images, resumed, "cpu", resume=True, **run))
    assert (result.resumed_from, result.steps) == (3, 6)
    a, b = checkpoint_dirs(full / "checkpoints")[-1], checkpoint_dirs(resumed / "checkpoints")[-1]
    for name in ("model", "ema", "loss"):
        assert (a / f"{name}.safetensors").read_bytes() == (b / f"{name}.safetensors").read_bytes(), name
    state_a, state_b = checkpointing.load(a)[1], checkpointing.load(b)[1]
    for opt in ("model", "discriminator"):
        for index, entries in state_a["optimizers"][opt]["state"].items():
            for key, value in entries.items():
                assert torch.equal(value, state_b["optimizers"][opt]["state"][index][key]), (opt, index, key)
    assert read_metrics(full) == read_metrics(resumed)


def test_agreement_rules_reject_differences_beyond_the_tolerances():
    gt = gpu_training()
    log = lambda values, key: [{"step": i + 1, key: v} for i, v in enumerate(values)]
    tok = [0.5, 0.4, 0.3, 0.25, 0.2, 0.18]
    close = [0.5 * (1 + 5e-5), 0.41, 0.31, 0.24, 0.21, 0.185]
    assert gt.agreement("tokenizer", log(close, "reconstruction_loss"), log(tok, "reconstruction_loss"), False)[0]
    first_off = [0.5 * (1 + 3e-4)] + tok[1:]
    assert not gt.agreement("tokenizer", log(first_off, "reconstruction_loss"), log(tok, "reconstruction_loss"),
                            False)[0]
    tail_off = tok[:4] + [0.25, 0.22]
    assert not gt.agreement("tokenizer", log(tail_off, "reconstruction_loss"), log(tok, "reconstruction_loss"),
                            False)[0]
    assert not gt.agreement("tokenizer", log(close, "reconstruction_loss"), log(tok, "reconstruction_loss"), True)[0]
    gen = [3.48, 3.45, 3.40, 3.30]
    assert gt.agreement("generator", log(gen[:3] + [3.30 * 1.001], "loss"), log(gen, "loss"), False)[0]
    assert not gt.agreement("generator", log(gen[:3] + [3.30 * 1.003], "loss"), log(gen, "loss"), False)[0]
    assert not gt.agreement("generator", log([3.48 * 1.0002] + gen[1:], "loss"), log(gen, "loss"), False)[0]


def run_script(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, check=False)


def test_gpu_training_runs_every_case_on_the_cpu_at_tiny_size(tmp_path):
    """The GPU tier's training script with every case at tiny size on the CPU: the device is the CPU, so runs must
    agree exactly; what needs CUDA (TF32, NCCL, resuming across devices) is skipped with the reason."""
    proc = run_script("--device", "cpu", "--size", "tiny", "--steps", "8", "--threads", "1", "--throughput-steps",
                      "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_training.json").read_text())
    checks = report["checks"]
    assert set(checks) == {"tokenizer_fp32", "generator_fp32", "tokenizer_bf16", "generator_bf16",
                           "resume_cpu_to_cpu", "torchrun"}
    assert all(r["status"] == "passed" for r in checks.values()), checks
    for name in ("tokenizer_fp32", "generator_fp32", "torchrun"):
        assert checks[name]["max_rel_diff"] == 0.0 and checks[name]["steps"] == 8, name
    assert checks["tokenizer_bf16"]["ratio"] <= 0.8 and checks["generator_bf16"]["ratio"] <= 0.98
    resume = checks["resume_cpu_to_cpu"]
    assert resume["exact"] and resume["on_device"] and resume["final_weights_equal"] and resume["resumed_from"] == 4
    assert resume["tensors_compared"] > 100
    assert (checks["torchrun"]["backend"], checks["torchrun"]["world_size"]) == ("gloo", 1)
    assert set(report["throughput"]) == {f"throughput_{stage}_{precision}" for stage in ("tokenizer", "generator")
                                         for precision in ("fp32", "bf16")}
    for case in report["throughput"].values():
        assert case["steps_per_s"] > 0 and case["images_per_s"] > 0 and case["peak_memory_gib"] is None
    assert report["skipped"] == {
        "resume_cuda_to_cpu": "needs a CUDA GPU", "resume_cpu_to_cuda": "needs a CUDA GPU",
        "torchrun_nccl": "NCCL needs a CUDA GPU; torchrun ran with gloo (checks.torchrun)",
        **dict.fromkeys(["throughput_tokenizer_tf32", "throughput_generator_tf32"], "TF32 exists only on CUDA")}


@pytest.mark.skipif(GPU_MISSING is None, reason="a GPU is present: this is the dry run of a machine without one")
def test_gpu_training_without_a_gpu_skips_every_case_with_the_reason(tmp_path):
    """What scripts/gpu_suite.sh runs on a machine without a GPU: nothing trains, every case says why, exit 0."""
    proc = run_script("--device", "cuda", "--out", str(tmp_path), "--fail-on-skip")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_training.json").read_text())
    assert report["checks"] == {} and report["throughput"] == {}
    reason = "PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)"
    expected = {"tokenizer_fp32", "generator_fp32", "tokenizer_bf16", "generator_bf16", "resume_cuda_to_cpu",
                "resume_cpu_to_cuda", "torchrun"} | {f"throughput_{s}_{p}" for s in ("tokenizer", "generator")
                                                      for p in ("fp32", "tf32", "bf16")}
    assert report["skipped"] == dict.fromkeys(expected, reason)
    assert run_script("--device", "cuda").returncode == 0


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING is not None, reason=str(GPU_MISSING))
def test_gpu_training_checks_pass_on_cuda(tmp_path):
    """fp32 against the CPU, bf16 falling, checkpoints resumed CUDA -> CPU and CPU -> CUDA (restored bitwise),
    torchrun over NCCL; the throughput cases run in scripts/gpu_suite.sh."""
    proc = run_script("--device", "cuda", "--steps", "8", "--groups", "parity,bf16,resume,torchrun",
                      "--fail-on-skip", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.loads((tmp_path / "gpu_training.json").read_text())["checks"]
    assert {"resume_cuda_to_cpu", "resume_cpu_to_cuda", "torchrun"} <= set(checks)
    for name in ("resume_cuda_to_cpu", "resume_cpu_to_cuda"):
        assert checks[name]["exact"] and checks[name]["on_device"], checks[name]
    assert (checks["torchrun"]["backend"], checks["torchrun"]["world_size"]) == ("nccl", 1)
