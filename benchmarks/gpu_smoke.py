"""The GPU suite's first part: versions, then one eager CUDA generation that must equal the CPU's, token for token.

    python benchmarks/gpu_smoke.py --out "$OUT"        # on the lent H200 (scripts/gpu_suite.sh --part smoke)
    python benchmarks/gpu_smoke.py --dry-run           # imports only

The tiny_lfq10 models (seed 0, sharpened logits as in tests/test_gpu_device.py) generate three images in 6 steps
on the CPU and on CUDA with TF32 off; tokens must be equal and pixels within 1. Writes gpu_smoke.json under --out
(default $OUT): the versions, the GPU, and the comparison. Exit status 1 when they differ, 2 without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

LABELS = [1, 7, 282]
STEPS = 6
MODULES = ("numpy", "torch", "onnx", "onnxscript", "onnxruntime", "tensorrt", "cuda.bindings", "cupy", "triton",
           "pytest", "click", "PIL", "safetensors", "torchvision")


def versions() -> dict:
    """Each module's version, or why it cannot be imported (reported, never fatal: the parts say what they skip)."""
    found = {"python": platform.python_version()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # click 8.2+ deprecates __version__; a warning here is noise
        for name in MODULES:
            try:
                found[name] = getattr(importlib.import_module(name), "__version__", "(no __version__)")
            except Exception as exc:  # any import failure is a finding
                found[name] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return found


def generation_matches() -> dict:
    """Eager tiny generation on the CPU and on CUDA (TF32 off): equal tokens, pixels within 1."""
    import numpy as np
    import torch

    import maskbit
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    tok, gen = maskbit.build_tokenizer("tiny_lfq10"), maskbit.build_generator("tiny_lfq10")
    with torch.no_grad():
        gen.prediction_layer.weight.mul_(20.0)
    cpu = maskbit.generate(tok, gen, labels=LABELS, num_steps=STEPS, seed=3)
    start = time.perf_counter()
    gpu = maskbit.generate(tok.cuda(), gen.cuda(), labels=LABELS, num_steps=STEPS, seed=3)
    seconds = time.perf_counter() - start
    pixels = int(np.abs(gpu.images.astype(int) - cpu.images.astype(int)).max())
    tokens_equal = bool(np.array_equal(gpu.tokens, cpu.tokens))
    return {"tokens_equal": tokens_equal, "max_pixel_diff": pixels, "cuda_seconds_first_call": seconds,
            "passed": tokens_equal and pixels <= 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    parser.add_argument("--dry-run", action="store_true", help="import what the check uses; run nothing")
    args = parser.parse_args()
    if args.dry_run:
        import maskbit  # noqa: F401
        import numpy  # noqa: F401
        import torch  # noqa: F401
        print("gpu_smoke dry run: maskbit, numpy and torch import")
        return 0
    import torch
    report = {"versions": versions(), "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)
        report["generation"] = generation_matches()
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_smoke.json").write_text(json.dumps(report, indent=2))
    if not torch.cuda.is_available():
        print("gpu_smoke: PyTorch sees no CUDA GPU", file=sys.stderr)
        return 2
    return 0 if report["generation"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
