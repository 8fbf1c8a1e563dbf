"""Distribution distance (TV, KL) of reduced precisions from float32, the measurement behind the export gate.

For a generator (a preset with seeded random weights, or the shipped demo model), along a teacher-forced float32
trajectory of the preset's sampling settings, compares the sampling distributions of: ONNX Runtime fp32 (a
second float32 backend: the floor), ONNX Runtime int8 (the bundle's `--precision int8`), and eager bfloat16
autocast, each against eager float32. Also prints the old "agreement" figure for int8 for comparison.

    python benchmarks/distribution_study.py --model demo
    python benchmarks/distribution_study.py --model tiny_lfq10 --model maskbit_generator_14bit --steps 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from maskbit_runtime.machine import cpu_info


def models(name: str):
    import maskbit
    if name == "demo":
        root = Path(maskbit.__file__).parent / "demo"
        return (maskbit.load_tokenizer(root / "tokenizer.safetensors", "demo64"),
                maskbit.load_generator(root / "generator.safetensors", "demo64"))
    torch.manual_seed(0)
    return maskbit.build_tokenizer(name), maskbit.build_generator(name)


def study(name: str, steps: int | None, images: int) -> dict:
    from maskbit_export import ExportOptions, build_bundle
    from maskbit_export.verify import (distribution_report, eager_logits, session_logits,
                                       teacher_forced_agreement)
    from maskbit_runtime.backends.ort import import_ort

    from maskbit.step import GenerationStep
    tokenizer, generator = models(name)
    cfg, sampling = generator.config, generator.sampling_config
    plan = sampling.with_overrides(num_steps=steps).plan(cfg.num_tokens * cfg.codebook_splits)
    labels = np.random.default_rng(0).integers(0, cfg.num_classes, images).tolist()
    ort = import_ort()
    report = {"model": name, "num_steps": len(plan), "images": images, "cpu_flags": cpu_info()["isa"],
              "load_average": os.getloadavg(), "python": platform.python_version(), "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "int8"):
            path = Path(tmp) / precision
            build_bundle(path, tokenizer, generator, options=ExportOptions(
                max_batch=max(2, images), precision=precision, verify=False, with_transformer=True))
            transformer = ort.InferenceSession(str(path / "transformer.onnx"), providers=["CPUExecutionProvider"])
            report["results"][f"ort_{precision}"] = distribution_report(generator, session_logits(transformer),
                                                                        labels, plan, precision)
            if precision == "int8":
                session = ort.InferenceSession(str(path / "step.onnx"), providers=["CPUExecutionProvider"])
                agreement = teacher_forced_agreement(GenerationStep(generator).eval(), session, labels, plan, 4321)
                report["results"]["ort_int8"]["agreement"] = agreement["agreement"]
        report["results"]["eager_bf16"] = distribution_report(generator, eager_logits(generator, bf16=True), labels,
                                                              plan, "bf16")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="demo or a preset name (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="teacher-forced steps (default: the preset's)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the reports here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reports = []
    print(f"cpu flags: {' '.join(cpu_info()['isa'])}; load average before: {os.getloadavg()}")
    print(f"{'model':<26} {'candidate':<11} {'TV mean':>9} {'TV p99':>8} {'TV worst step':>13} {'KL mean':>9} "
          f"{'agreement':>9}")
    for name in args.model or ["demo"]:
        report = study(name, args.steps, args.images)
        reports.append(report)
        for candidate, r in report["results"].items():
            agreement = f"{r['agreement']:.3f}" if "agreement" in r else ""
            print(f"{name:<26} {candidate:<11} {r['tv_mean']:9.2e} {r['tv_p99']:8.2e} {r['tv_worst_step']:13.2e} "
                  f"{r['kl_mean']:9.2e} {agreement:>9}")
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
