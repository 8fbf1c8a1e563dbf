"""Generation throughput on one device: eager fp32, eager TF32, eager bf16 autocast, and AOTInductor bf16 packages
(with CUDA graphs on a GPU), for the GPU tier (`scripts/gpu_suite.sh`) and as a CPU smoke at tiny size.

    python benchmarks/gpu_throughput.py --size full --batch 64 --steps 64 --out "$OUT"     # on the lent H200
    python benchmarks/gpu_throughput.py --size tiny --batch 2 --steps 2 --device cpu       # smoke (CI)

Weights are random (seeded). Per case: images/s and ms/step of whole generations (labels -> uint8 images), the
decoder's ms per batch, peak device memory, and the host waits per generation (None on the CPU: nothing to count):
eager cases count them with `torch.cuda.set_sync_debug_mode("warn")` (each synchronising CUDA call of PyTorch
warns once); the AOTInductor case takes the runtime's own count (`Pipeline.last_transfers.host_syncs`, which
includes the package runtime's waits that PyTorch's sync debug mode cannot see; `maskbit-run info` says how).
Each case warms up with a 2-step generation (kernels loaded, CUDA graphs of both ping-pong parities captured),
then times --rounds generations of --steps steps. Cases the machine cannot run are skipped with the reason, never
failed. `gpu_throughput.json` under --out (default $OUT when set) is rewritten after every case, so a run cut
short keeps what it measured. --cache DIR keeps the AOTInductor bundle there, one compiled package at a time, and
a later run reuses what it finds (same size, batch and torch). --dry-run imports everything the cases use and
resolves the model, without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SIZES = {"tiny": "tiny_lfq10", "full": "maskbit_generator_14bit"}
CASES = ("eager_fp32", "eager_tf32", "eager_bf16", "aoti_bf16")


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def timed(fn: Callable[[], object], device: torch.device, rounds: int) -> tuple[float, object]:
    """Median seconds of `rounds` calls, synchronising the device around each call."""
    result, times = None, []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def count_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Synchronising CUDA calls made by one call of `fn` (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def eager_case(tokenizer, generator, labels, settings, device, precision: str) -> tuple[Callable, Callable]:
    """(generation, decode) callables of the eager sampler at a precision; generation(settings) runs others."""
    from maskbit.bits import combine_groups
    from maskbit.sampling import generate_groups
    from maskbit.tokenizer import images_to_uint8
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    side = generator.config.latent_size
    indices = torch.randint(0, tokenizer.config.codebook_size, (len(labels), side, side), device=device)

    def decode(idx=indices):
        with torch.inference_mode(), autocast:
            return images_to_uint8(tokenizer.decode_tokens(idx).float())

    def generate(plan=settings):
        with autocast:
            groups = generate_groups(generator, labels, plan, seed=0)
        return decode(combine_groups(groups, generator.config.num_bits).view(-1, side, side)).cpu()
    return generate, decode


def aoti_bundle(tokenizer, generator, batch: int, device: torch.device, folder: Path) -> Path:
    """An ONNX bundle (its manifest) with bf16 AOTInductor packages for `device` in `folder`: what is already
    there is kept, and each missing package is compiled and written on its own, so an interrupted build resumes."""
    from maskbit_export import ExportOptions, build_bundle
    from maskbit_export.aoti import build_aoti
    from maskbit_runtime.manifest import Manifest
    if not (folder / "manifest.json").is_file():
        build_bundle(folder, tokenizer, generator, options=ExportOptions(max_batch=batch, verify=False),
                     force=folder.exists())
    for name, entry in Manifest.load(folder).components.items():
        if entry.package is None or entry.package_device != device.type or entry.torch_version != torch.__version__:
            build_aoti(folder, tokenizer, generator, device=device.type, precision="bf16", components=(name,),
                       verify=False)
    return folder


def aoti_case(tokenizer, generator, labels, settings, device, folder: Path) -> tuple[Callable, Callable, Callable]:
    """(generation, decode, host waits of the last generation) of the runtime on AOTInductor bf16 packages, with
    CUDA graphs on a GPU; generation(settings) runs other settings."""
    from maskbit_runtime import Pipeline
    bundle = aoti_bundle(tokenizer, generator, len(labels), device, folder)
    pipe = Pipeline.load(bundle, backend="aoti", device=device.type, cuda_graphs=device.type == "cuda",
                         trust_native_code=True)          # packages this script compiled itself
    side = generator.config.latent_size
    indices = np.random.default_rng(0).integers(0, tokenizer.config.codebook_size, (len(labels), side, side))
    generate = lambda plan=settings: pipe.generate(labels, seed=0, **plan.to_dict()).images
    return generate, (lambda: pipe.decode(indices)), (lambda: pipe.last_transfers.host_syncs)


def skip_reason(case: str, device: torch.device) -> str | None:
    if case == "eager_tf32" and device.type != "cuda":
        return "TF32 exists only on CUDA"
    if case in ("eager_bf16", "aoti_bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


def measure(case: str, models, labels, settings, device, args, work: Path) -> dict:
    """One case's figures: a 2-step warm-up generation, then timed generations, the decoder, the host waits."""
    tokenizer, generator = models
    if case == "aoti_bf16":
        folder = args.cache / f"{args.size}-b{args.batch}-torch{torch.__version__}" if args.cache else work / "b"
        generate, decode, last_syncs = aoti_case(tokenizer, generator, labels, settings, device, folder)
        method = "the runtime's count (Pipeline.last_transfers.host_syncs; maskbit-run info says how)"
    else:
        generate, decode = eager_case(tokenizer, generator, labels, settings, device, case.split("_")[1])
        last_syncs, method = None, 'torch.cuda.set_sync_debug_mode("warn")'
    generate(settings.with_overrides(num_steps=2))           # warm-up: kernels, workspaces, graph capture
    seconds, _ = timed(generate, device, args.rounds)
    decode()
    decoder_seconds, _ = timed(decode, device, args.rounds)
    syncs = (last_syncs() if last_syncs else count_syncs(generate, device)) if device.type == "cuda" else None
    return {"images_per_s": args.batch / seconds, "ms_per_step": 1e3 * seconds / args.steps,
            "decoder_ms": 1e3 * decoder_seconds, "host_syncs_per_generation": syncs,
            "host_syncs_counted_by": method if device.type == "cuda" else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}


def setup(args) -> tuple[tuple, list[int], object, dict]:
    """(models on the device, labels, sampling settings, report skeleton)."""
    import maskbit
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = maskbit.resolve_config(SIZES[args.size])
    tokenizer = maskbit.build_tokenizer(config).to(device).eval()
    generator = maskbit.build_generator(config).to(device).eval()
    settings = generator.sampling_config.with_overrides(num_steps=args.steps)
    labels = np.random.default_rng(0).integers(0, generator.config.num_classes, args.batch).tolist()
    report = {"size": args.size, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
              "device": str(device), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "cases": {}, "skipped": {}}
    return (tokenizer, generator), labels, settings, report


def run(args, on_case: Callable[[dict], None] = lambda report: None) -> dict:
    """Every case in order; `on_case(report)` after each one (the script writes the JSON there)."""
    models, labels, settings, report = setup(args)
    device = torch.device(args.device)
    for case in args.cases:
        reason = skip_reason(case, device)
        set_tf32(case == "eager_tf32")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            if reason is None:
                with tempfile.TemporaryDirectory() as work:
                    report["cases"][case] = measure(case, models, labels, settings, device, args, Path(work))
        except Exception as exc:  # report what this machine cannot run; the table says why
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            set_tf32(False)
        if reason is not None:
            report["skipped"][case] = reason
        relative(report)
        on_case(report)
    return report


def relative(report: dict) -> None:
    base = report["cases"].get("eager_fp32", {}).get("images_per_s")
    for result in report["cases"].values():
        result["vs_eager_fp32"] = result["images_per_s"] / base if base else None


def dry_run(args) -> str:
    """Import what every case uses and resolve the model, without building or running anything."""
    import maskbit
    import maskbit_export.aoti  # noqa: F401
    import maskbit_export.aoti_backend  # noqa: F401
    import maskbit_export.onnx_export as onnx_export
    import maskbit_runtime.pipeline  # noqa: F401
    from maskbit.bits import combine_groups  # noqa: F401
    from maskbit.sampling import generate_groups  # noqa: F401
    from maskbit.tokenizer import images_to_uint8  # noqa: F401
    from maskbit_export import ExportOptions, build_bundle  # noqa: F401
    from maskbit_runtime import Pipeline  # noqa: F401
    onnx_export.require_onnx()
    config = maskbit.resolve_config(SIZES[args.size])
    return (f"gpu_throughput dry run: {SIZES[args.size]} ({config.generator.depth} layers), batch {args.batch}, "
            f"{args.steps} steps, cases {', '.join(args.cases)}: every module they import is importable")


def table(report: dict) -> str:
    lines = [f"{report['size']} model, batch {report['batch']}, {report['steps']} steps, {report['device']} "
             f"{report['gpu'] or ''} (torch {report['torch']})",
             f"{'case':<12} {'images/s':>9} {'ms/step':>9} {'decoder ms':>10} {'syncs':>6} {'peak GiB':>8} "
             f"{'vs fp32':>8}"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    for case, r in report["cases"].items():
        lines.append(f"{case:<12} {r['images_per_s']:9.3f} {r['ms_per_step']:9.2f} {r['decoder_ms']:10.2f} "
                     f"{fmt(r['host_syncs_per_generation'], 'd'):>6} {fmt(r['peak_memory_gib'], '.2f'):>8} "
                     f"{fmt(r['vs_eager_fp32'], '.2f'):>8}")
    lines += [f"{case:<12} skipped: {reason}" for case, reason in report["skipped"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="timed generations per case (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", type=lambda s: [c for c in s.split(",") if c], default=list(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--cache", type=Path, default=None, help="keep (and reuse) the AOTInductor bundle here")
    parser.add_argument("--dry-run", action="store_true", help="import and resolve only; run nothing")
    args = parser.parse_args()
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    if args.dry_run:
        print(dry_run(args))
        return
    report = run(args, on_case=lambda report: write(report, args.out))
    print(table(report))
    if args.out:
        print(f"wrote {args.out / 'gpu_throughput.json'}")


def write(report: dict, out: Path | None) -> None:
    """The report so far, rewritten after every case (a run cut short keeps what it measured)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_throughput.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
