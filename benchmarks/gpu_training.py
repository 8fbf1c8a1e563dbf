"""maskbit-train on a GPU, proven: fp32 on CUDA against the CPU, bf16, checkpoints resumed across devices, torchrun
with one process over NCCL, and training throughput; for the GPU tier (`scripts/gpu_suite.sh`) and, at tiny size,
as a CPU smoke in CI (there the device is the CPU: its runs must agree exactly; TF32, NCCL and cross-device cases
are skipped with the reason, as is every case on a machine asked for CUDA that has none).

    python benchmarks/gpu_training.py --device cuda --size full --out "$OUT"           # the lent H200, ~2 min
    python benchmarks/gpu_training.py --device cpu --size tiny --steps 8 --threads 1   # CI

The checks drive the real training code (`maskbit.train.runner.run` with the stage classes, and the maskbit-train
command line under torchrun) on synthetic images: the tiny preset, batch 4, --steps steps, a checkpoint half way.
  <stage>_fp32     the device run (TF32 off) against a CPU run of the same seed, by TOLERANCES (the generator
                   without dropout: CUDA and the CPU draw dropout masks from different generators)
  <stage>_bf16     bf16 autocast on the device: losses finite, the last quarter's mean <= FALL_RATIO x the first's
  resume_<a>_to_<b>  the fp32 tokenizer run's half-way checkpoint from device a resumes on b: every restored tensor
                   (weights, loss module, optimiser states) equals the checkpoint bitwise and lives on b; the first
                   resumed step matches a's (on one device: every step and the final weights, bit for bit)
  torchrun         `torch.distributed.run --nproc_per_node 1` of maskbit-train (NCCL on CUDA, gloo on the CPU)
                   against the single-process run
Throughput: --throughput-steps steps (the stage's train_step + EMA update, as in the runner's loop, after 2 warm-up
steps) on one batch held on the device, fp32 / TF32 / bf16: steps/s, images/s, peak memory; `--size full` is the
256x256 14-bit tokenizer at batch 16 and the 14-bit generator at batch 32 (the official per-GPU batches). The data
pipeline (synchronous, in the training process) is timed per batch on its own. Writes gpu_training.json under --out
(default $OUT), rewritten after every case, and prints tables; --dry-run imports and resolves only. Exit status 1
when a check failed, 3 with --fail-on-skip when a case was skipped. The runs, the settings and the throughput
measurement live in gpu_training_runs.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_throughput import set_tf32  # noqa: E402  (one definition of the TF32 switch)
from gpu_training_runs import (  # noqa: E402
    BATCH, FALL_KEY, FALL_RATIO, LOSS_KEYS, PRECISIONS, SEED, SIZES, TOLERANCES, Runs, first_line, measure_throughput,
    stage_class, throughput_options)
from gpu_training_runs import make_images  # noqa: E402, F401  (tests/test_train_devices.py reaches it here)

GROUPS = ("parity", "bf16", "resume", "torchrun", "throughput")


def train_log(out: Path) -> list[dict]:
    from maskbit.train.metrics import read_metrics
    return [r for r in read_metrics(out) if r["kind"] == "train"]


def step_diffs(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> list[float]:
    """Per step, the largest relative difference over the losses both runs logged."""
    if [r["step"] for r in a] != [r["step"] for r in b]:
        raise AssertionError(f"the runs logged different steps: {[r['step'] for r in a]} vs {[r['step'] for r in b]}")
    out = []
    for x, y in zip(a, b):
        pairs = [(x[k], y[k]) for k in keys if k in x and k in y]
        out.append(max(abs(p - q) / max(abs(p), abs(q), 1e-12) for p, q in pairs))
    return out


def tail_rel(a: list[dict], b: list[dict], key: str) -> float:
    n = max(1, len(a) // 3)
    mean_a, mean_b = np.mean([r[key] for r in a[-n:]]), np.mean([r[key] for r in b[-n:]])
    return float(abs(mean_a - mean_b) / abs(mean_b))


def agreement(stage: str, test: list[dict], reference: list[dict], same_device: bool) -> tuple[bool, dict]:
    """Whether `test` matches `reference` by TOLERANCES (exactly on one device), with the figures."""
    diffs = step_diffs(test, reference, LOSS_KEYS[stage])
    figures = {"first_step_rel_diff": diffs[0], "max_rel_diff": max(diffs),
               "tail_rel_diff": tail_rel(test, reference, FALL_KEY[stage]), "steps": len(diffs)}
    if same_device:
        ok = max(diffs) == 0.0
    elif stage == "tokenizer":
        ok = diffs[0] <= TOLERANCES["first_step_rtol"] and figures["tail_rel_diff"] <= TOLERANCES["tokenizer_tail_rtol"]
    else:
        ok = diffs[0] <= TOLERANCES["first_step_rtol"] and max(diffs) <= TOLERANCES["generator_rtol"]
    return ok, figures


# ---- checks ---------------------------------------------------------------------------------------------------


def check_parity(runs: Runs, stage: str, device: str) -> dict:
    test, reference = train_log(runs.get(stage, device)), train_log(runs.reference(stage))
    ok, figures = agreement(stage, test, reference, same_device=device == "cpu")
    return {"status": "passed" if ok else "failed", "devices": [device, "cpu"], **figures,
            FALL_KEY[stage]: {"device": [r[FALL_KEY[stage]] for r in test],
                              "cpu": [r[FALL_KEY[stage]] for r in reference]}}


def check_falls(runs: Runs, stage: str, device: str) -> dict:
    log = train_log(runs.get(stage, device, bf16=True))
    values = [r[FALL_KEY[stage]] for r in log]
    n = max(1, len(values) // 4)
    first, last = float(np.mean(values[:n])), float(np.mean(values[-n:]))
    finite = all(math.isfinite(v) for r in log for v in r.values() if isinstance(v, float))
    ok = finite and last <= FALL_RATIO[stage] * first
    return {"status": "passed" if ok else "failed", "device": device, "key": FALL_KEY[stage], "first_mean": first,
            "last_mean": last, "ratio": last / first, "required_ratio": FALL_RATIO[stage], "finite": finite,
            "values": values}


def restored_state(stage, weights: dict, state: dict, step: int) -> dict:
    """Compare a stage just restored by --resume with the checkpoint it read: bitwise, and on the run's device
    (AdamW keeps its `step` counts on the CPU unless it is fused or capturable)."""
    device, mismatched, misplaced, compared = stage.dist.device, [], [], 0

    def visit(name: str, value: torch.Tensor, saved: torch.Tensor, on_device: bool = True) -> None:
        nonlocal compared
        compared += 1
        if on_device and value.device != device:
            misplaced.append(f"{name} on {value.device}")
        if value.dtype != saved.dtype or not torch.equal(value.detach().cpu(), saved):
            mismatched.append(name)

    for name, module in stage.modules.items():
        current = module.state_dict()
        if set(current) != set(weights[name]):
            mismatched.append(f"{name}: keys differ")
        for key in set(current) & set(weights[name]):
            visit(f"{name}.{key}", current[key], weights[name][key])
    for name, opt in stage.optimizers.items():
        current, saved = opt.state_dict(), state["optimizers"][name]
        if set(current["state"]) != set(saved["state"]) or current["param_groups"] != saved["param_groups"]:
            mismatched.append(f"optimizer {name}: parameters or param_groups differ")
        for index in set(current["state"]) & set(saved["state"]):
            for key, value in current["state"][index].items():
                visit(f"optimizer.{name}.{index}.{key}", value, saved["state"][index][key], on_device=key != "step")
    mismatched += [f"scheduler {name}" for name, s in stage.schedulers.items()
                   if s.state_dict() != state["schedulers"][name]]
    if step != state["step"]:
        mismatched.append(f"resumed at step {step}, the checkpoint is step {state['step']}")
    return {"exact": not mismatched, "on_device": not misplaced, "tensors_compared": compared,
            "mismatched": mismatched[:8], "misplaced": misplaced[:8]}


def probe(stage_cls, checkpoint: Path, report: dict):
    """`stage_cls` that fills `report` with `restored_state` when its first step starts."""
    from maskbit.train import checkpointing
    weights, state, _ = checkpointing.load(checkpoint)

    class Probe(stage_cls):
        def train_step(self, images, labels, step):
            if not report:
                report.update(restored_state(self, weights, state, step))
            return super().train_step(images, labels, step)
    return Probe


def check_resume(runs: Runs, source: str, target: str) -> dict:
    """The half-way checkpoint of the fp32 tokenizer run on `source` resumes on `target`."""
    from maskbit.train.checkpointing import PREFIX, checkpoint_dirs
    full = runs.reference("tokenizer") if source == "cpu" else runs.get("tokenizer", source)
    out = runs.work / f"resume_{source}_to_{target}".replace(":", "")
    shutil.copytree(full, out)
    half = runs.steps // 2
    for folder in checkpoint_dirs(out / "checkpoints"):
        if int(folder.name[len(PREFIX):]) > half:
            shutil.rmtree(folder)
    (out / "tokenizer.safetensors").unlink()
    restored: dict = {}
    checkpoint = out / "checkpoints" / f"{PREFIX}{half:08d}"
    result = runs.train("tokenizer", runs.options("tokenizer", target, out, resume=True),
                        probe(stage_class("tokenizer"), checkpoint, restored))
    resumed, uninterrupted = train_log(out)[half:], train_log(full)[half:]
    same = source == target
    diffs = step_diffs(resumed, uninterrupted, LOSS_KEYS["tokenizer"])
    ok = result.resumed_from == half and restored.get("exact", False) and restored.get("on_device", False)
    ok = ok and (max(diffs) == 0.0 if same else diffs[0] <= TOLERANCES["first_step_rtol"])
    record = {"devices": [source, target], "resumed_from": result.resumed_from, **restored,
              "first_step_rel_diff": diffs[0], "max_rel_diff": max(diffs)}
    if same:                # one device: the continuation ends with the same weights, EMA and loss module
        record["final_weights_equal"] = final_weights(out) == final_weights(full)
        ok = ok and record["final_weights_equal"]
    return {"status": "passed" if ok else "failed", **record}


def final_weights(out: Path) -> dict[str, bytes]:
    from maskbit.train.checkpointing import checkpoint_dirs
    final = checkpoint_dirs(out / "checkpoints")[-1]
    return {p.name: p.read_bytes() for p in sorted(final.glob("*.safetensors"))}


def check_torchrun(runs: Runs, device: str) -> dict:
    """maskbit-train under `torch.distributed.run --nproc_per_node 1` against the single-process run."""
    options = runs.options("tokenizer", device, runs.work / f"torchrun_{device.replace(':', '')}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(Path(__file__).resolve()), "train-cli", "tokenizer", *cli_args(options, runs.threads)]
    env = dict(os.environ, NCCL_DEBUG="INFO") if device.startswith("cuda") else dict(os.environ)
    if runs.threads:
        env["OMP_NUM_THREADS"] = str(runs.threads)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"status": "failed", "error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    out = Path(options["output_dir"])
    from maskbit.train.checkpointing import checkpoint_dirs
    meta = json.loads((checkpoint_dirs(out / "checkpoints")[-1] / "meta.json").read_text())
    expected = "nccl" if device.startswith("cuda") else "gloo"
    ok, figures = agreement("tokenizer", train_log(out), train_log(runs.get("tokenizer", device)),
                            same_device=device == "cpu")
    record = {"backend": meta.get("backend"), "world_size": meta.get("world_size"), "seconds": seconds, **figures}
    if expected == "nccl":   # NCCL_DEBUG=INFO prints NCCL's banner once a communicator exists (reported, not required)
        record["nccl_initialised"] = "NCCL INFO" in proc.stdout + proc.stderr
    ok = ok and record["backend"] == expected and record["world_size"] == 1
    return {"status": "passed" if ok else "failed", **record}


def cli_args(options: dict, threads: int | None) -> list[str]:
    """`maskbit-train` flags for RunOptions fields (the flags are the field names)."""
    args = []
    for name, value in options.items():
        if name == "overrides" or value is None or value is False:
            continue
        args += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return args + (["--threads", str(threads)] if threads else []) + ["--quiet", *options["overrides"]]


# ---- the run --------------------------------------------------------------------------------------------------


CHECKS = {"parity": check_parity, "bf16": check_falls, "resume": check_resume, "torchrun": check_torchrun}


def plan(device: str, groups: list[str]) -> list[tuple[str, str, tuple]]:
    """(group, case name, arguments) of every case, in order."""
    cases = []
    if "parity" in groups:
        cases += [("parity", f"{stage}_fp32", (stage, device)) for stage in ("tokenizer", "generator")]
    if "bf16" in groups:
        cases += [("bf16", f"{stage}_bf16", (stage, device)) for stage in ("tokenizer", "generator")]
    if "resume" in groups:
        pairs = [("cpu", "cpu")] if device == "cpu" else [(device, "cpu"), ("cpu", device)]
        cases += [("resume", f"resume_{a}_to_{b}".replace(":0", ""), (a, b)) for a, b in pairs]
    if "torchrun" in groups:
        cases.append(("torchrun", "torchrun", (device,)))
    if "throughput" in groups:
        cases += [("throughput", f"throughput_{stage}_{precision}", (stage, precision, device))
                  for stage in ("tokenizer", "generator") for precision in PRECISIONS]
    return cases


def skip_reason(group: str, args: tuple, device: str) -> str | None:
    """Why this machine cannot run a case (None: it can)."""
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)"
    if group == "throughput" and args[1] == "tf32" and not cuda:
        return "TF32 exists only on CUDA"
    if (group == "bf16" or group == "throughput" and args[1] == "bf16") and cuda and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if group == "torchrun" and not torch.distributed.is_available():
        return "this PyTorch build has no torch.distributed"
    if group == "torchrun" and cuda and not torch.distributed.is_nccl_available():
        return "this PyTorch build has no NCCL"
    return None


def validate(runs: Runs, size: str) -> None:
    """Resolve the config and training settings of every run (cheap): a bad preset or override fails here, also
    where every case is skipped."""
    from maskbit.train import RunOptions
    from maskbit.train.runner import prepare
    for stage in ("tokenizer", "generator"):
        for bf16 in (False, True):
            prepare(RunOptions(**runs.options(stage, "cpu", runs.work / "unused", bf16)), stage)
        for precision in PRECISIONS:
            prepare(throughput_options(stage, precision, size, "cpu", runs.work, runs.work / "unused"), stage)


def dry_run(args) -> str:
    """Import what every case uses and resolve every run's settings, without training."""
    import torchvision  # noqa: F401  (maskbit-train's data pipeline and perceptual network)
    from maskbit.train import distributed, loop_generator, loop_tokenizer, runner  # noqa: F401
    from maskbit.train.cli import main as train_main  # noqa: F401  (torchrun's worker)
    from maskbit.train.data import BatchStream, ImageSource, scan  # noqa: F401
    from maskbit.train.ema import EMA  # noqa: F401
    from maskbit_runtime.machine import cpu_info  # noqa: F401
    with tempfile.TemporaryDirectory(prefix="gpu_training.") as tmp:
        validate(Runs(Path(tmp), args.steps, args.threads), args.size)
    names = [name for _, name, _ in plan(args.device, args.groups)]
    return f"gpu_training dry run: {len(names)} cases ({', '.join(names)}): imports and settings resolve"


def run(args, on_case=lambda report: None) -> dict:
    """Every case in order; `on_case(report)` after each one (the script writes the JSON there)."""
    from maskbit_runtime.machine import cpu_info
    device = args.device
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    report = {"device": device, "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
              "cuda": torch.version.cuda, "size": args.size, "steps": args.steps, "batch": BATCH, "seed": SEED,
              "tf32_in_checks": False, "tolerances": TOLERANCES, "fall_ratio": FALL_RATIO, "machine": cpu_info(),
              "checks": {}, "throughput": {}, "skipped": {}}
    if "resume" in args.groups and not device.startswith("cuda"):
        report["skipped"].update({f"resume_{pair}": "needs a CUDA GPU" for pair in ("cuda_to_cpu", "cpu_to_cuda")})
    if "torchrun" in args.groups and not device.startswith("cuda"):
        report["skipped"]["torchrun_nccl"] = "NCCL needs a CUDA GPU; torchrun ran with gloo (checks.torchrun)"
    missing = None
    try:
        import torchvision  # noqa: F401  (maskbit-train's data pipeline and perceptual network)
    except ImportError:
        missing = "torchvision is not installed (pip install 'maskbit[train]'); maskbit-train needs it"
    with tempfile.TemporaryDirectory(prefix="gpu_training.") as tmp:
        runs = Runs(Path(tmp), args.steps, args.threads)
        validate(runs, args.size)
        for group, name, case_args in plan(device, args.groups):
            reason = missing or skip_reason(group, case_args, device)
            if reason:
                report["skipped"][name] = reason
                continue
            start = time.perf_counter()
            try:
                if group == "throughput":
                    record = measure_throughput(runs, *case_args, args.size, args.throughput_steps)
                else:
                    record = CHECKS[group](runs, *case_args)
                    record["seconds"] = time.perf_counter() - start
            except Exception as exc:  # one broken case must not hide the others: recorded, and the exit status fails
                traceback.print_exc()
                record = {"status": "failed", "error": first_line(exc)}
            finally:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            report["throughput" if group == "throughput" else "checks"][name] = record
            on_case(report)
    return report


def tables(report: dict) -> str:
    fmt = lambda v, spec: f"{'n/a':>{spec[:-3]}}" if v is None else format(v, spec)
    lines = [f"training checks on {report['device']} {report['gpu'] or ''} against the cpu (torch {report['torch']}, "
             f"tiny preset, batch {report['batch']}, {report['steps']} steps, TF32 off)",
             f"{'check':<22} {'status':<7} {'1st step':>9} {'max step':>9} {'tail':>9}  notes"]
    for name, r in report["checks"].items():
        notes = r.get("error") or ", ".join(f"{k}={r[k]}" for k in ("backend", "ratio", "exact", "on_device",
                                                                      "final_weights_equal", "nccl_initialised")
                                            if k in r)
        lines.append(f"{name:<22} {r['status']:<7} {fmt(r.get('first_step_rel_diff'), '9.1e')} "
                     f"{fmt(r.get('max_rel_diff'), '9.1e')} {fmt(r.get('tail_rel_diff'), '9.1e')}  {notes}")
    if report["throughput"]:
        lines += ["", f"training throughput ({report['size']} size, {report['device']})",
                  f"{'case':<27} {'batch':>5} {'steps/s':>8} {'images/s':>9} {'ms/step':>9} {'peak GiB':>8} "
                  f"{'data ms':>8}"]
        for name, r in report["throughput"].items():
            if "error" in r:
                lines.append(f"{name:<27} failed: {r['error']}")
                continue
            lines.append(f"{name:<27} {r['batch']:>5} {r['steps_per_s']:8.3f} {r['images_per_s']:9.2f} "
                         f"{r['ms_per_step']:9.1f} {fmt(r['peak_memory_gib'], '8.2f')} {r['data_ms_per_batch']:8.1f}")
    lines += [f"{name:<27} skipped: {reason}" for name, reason in report["skipped"].items()]
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["train-cli"]:      # torchrun's worker: maskbit-train with TF32 off, like the other runs
        from maskbit.train.cli import main as train_main
        set_tf32(False)
        return train_main(sys.argv[2:], prog_name="maskbit-train")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="full" if torch.cuda.is_available() else "tiny",
                        help="model size of the throughput cases (the checks always use the tiny preset)")
    parser.add_argument("--steps", type=int, default=24, help="training steps of every check run (even, >= 8)")
    parser.add_argument("--throughput-steps", type=int, default=5, help="timed steps per throughput case")
    parser.add_argument("--groups", type=lambda s: [g for g in s.split(",") if g], default=list(GROUPS),
                        help=f"comma-separated subset of {','.join(GROUPS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--fail-on-skip", action="store_true", help="exit 3 when a case was skipped")
    parser.add_argument("--dry-run", action="store_true", help="import and resolve the settings only; train nothing")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = parser.parse_args()
    if set(args.groups) - set(GROUPS):
        parser.error(f"unknown group(s): {', '.join(sorted(set(args.groups) - set(GROUPS)))}")
    if args.steps < 8 or args.steps % 2:
        parser.error("--steps must be even and at least 8 (a checkpoint at half way, quarters for the bf16 check)")
    if args.device == "cuda":
        args.device = "cuda:0"
    if args.dry_run:
        print(dry_run(args))
        return 0
    report = run(args, on_case=lambda report: write(report, args.out))
    write(report, args.out)
    print(tables(report))
    if args.out:
        print(f"wrote {args.out / 'gpu_training.json'}")
    failed = [n for n, r in {**report["checks"], **report["throughput"]}.items() if r.get("status") == "failed"]
    if failed:
        print(f"gpu_training: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if args.fail_on_skip and report["skipped"]:
        print(f"gpu_training: skipped: {', '.join(report['skipped'])} (--fail-on-skip)", file=sys.stderr)
        return 3
    return 0


def write(report: dict, out: Path | None) -> None:
    """The report so far, rewritten after every case (a run cut short keeps what it measured)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_training.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
