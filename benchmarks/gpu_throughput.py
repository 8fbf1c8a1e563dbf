"""Generation throughput on one device: eager fp32, eager TF32, eager bf16 autocast, and AOTInductor bf16 packages
(with CUDA graphs on a GPU), for the GPU tier (`scripts/gpu_suite.sh`) and as a CPU smoke at tiny size.

    python benchmarks/gpu_throughput.py --size full --batch 64 --steps 64 --out "$OUT"     # on the lent H200
    python benchmarks/gpu_throughput.py --size tiny --batch 2 --steps 2 --device cpu       # smoke (CI)

Weights are random (seeded). Per case: images/s and ms/step of whole generations (labels -> uint8 images), the
decoder's ms per batch, peak device memory, and the host synchronisations per generation, counted with
`torch.cuda.set_sync_debug_mode("warn")` (each synchronising CUDA call warns once; on CPU there is nothing to
count). Cases that the machine cannot run are skipped with a printed reason, never failed. Writes
`gpu_throughput.json` under --out (default $OUT when set) and prints a table.
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
    """Median seconds of `rounds` calls after one warm-up, synchronising the device around each call."""
    result = fn()
    times = []
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
    """(generation, decode) callables of the eager sampler at a precision."""
    from maskbit.bits import combine_groups
    from maskbit.sampling import generate_groups
    from maskbit.tokenizer import images_to_uint8
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    side = generator.config.latent_size
    indices = torch.randint(0, tokenizer.config.codebook_size, (len(labels), side, side), device=device)

    def decode(idx=indices):
        with torch.inference_mode(), autocast:
            return images_to_uint8(tokenizer.decode_tokens(idx).float())

    def generate():
        with autocast:
            groups = generate_groups(generator, labels, settings, seed=0)
        return decode(combine_groups(groups, generator.config.num_bits).view(-1, side, side)).cpu()
    return generate, decode


def aoti_case(tokenizer, generator, labels, settings, device, work: Path) -> tuple[Callable, Callable]:
    """(generation, decode) callables of the runtime on AOTInductor bf16 packages (CUDA graphs on a GPU)."""
    from maskbit_export import ExportOptions, build_bundle
    from maskbit_export.aoti import build_aoti
    from maskbit_runtime import Pipeline
    bundle = work / "bundle"
    build_bundle(bundle, tokenizer, generator, options=ExportOptions(max_batch=len(labels), verify=False))
    build_aoti(bundle, tokenizer, generator, device=device.type, precision="bf16", verify=False)
    pipe = Pipeline.load(bundle, backend="aoti", device=device.type, cuda_graphs=device.type == "cuda")
    side = generator.config.latent_size
    indices = np.random.default_rng(0).integers(0, tokenizer.config.codebook_size, (len(labels), side, side))
    return (lambda: pipe.generate(labels, seed=0, **settings.to_dict()).images), (lambda: pipe.decode(indices))


def run(args) -> dict:
    import maskbit
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = maskbit.resolve_config(SIZES[args.size])
    tokenizer = maskbit.build_tokenizer(config).to(device).eval()
    generator = maskbit.build_generator(config).to(device).eval()
    settings = generator.sampling_config.with_overrides(num_steps=args.steps)
    labels = np.random.default_rng(0).integers(0, generator.config.num_classes, args.batch).tolist()
    report = {"size": args.size, "batch": args.batch, "steps": args.steps, "device": str(device),
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "cases": {}, "skipped": {}}
    for case in args.cases:
        if case == "eager_tf32" and device.type != "cuda":
            report["skipped"][case] = "TF32 exists only on CUDA"
            continue
        if case == "eager_bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            report["skipped"][case] = "this GPU has no bf16"
            continue
        set_tf32(case == "eager_tf32")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with tempfile.TemporaryDirectory() as work:
                if case == "aoti_bf16":
                    generate, decode = aoti_case(tokenizer, generator, labels, settings, device, Path(work))
                else:
                    generate, decode = eager_case(tokenizer, generator, labels, settings, device, case.split("_")[1])
                seconds, _ = timed(generate, device, args.rounds)
                decoder_seconds, _ = timed(decode, device, args.rounds)
                syncs = count_syncs(generate, device)
        except Exception as exc:  # report what this machine cannot run; the table says why
            report["skipped"][case] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        report["cases"][case] = {
            "images_per_s": args.batch / seconds, "ms_per_step": 1e3 * seconds / args.steps,
            "decoder_ms": 1e3 * decoder_seconds, "host_syncs_per_generation": syncs,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
    set_tf32(False)
    base = report["cases"].get("eager_fp32", {}).get("images_per_s")
    for result in report["cases"].values():
        result["vs_eager_fp32"] = result["images_per_s"] / base if base else None
    return report


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
    args = parser.parse_args()
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    report = run(args)
    print(table(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_throughput.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out / 'gpu_throughput.json'}")


if __name__ == "__main__":
    main()
