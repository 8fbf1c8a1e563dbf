"""How int8's teacher-forced agreement with float32 depends on depth and on how peaked the logits are.

Random-weight generators predict near-uniform distributions over the C classes of a group. The inverse-CDF
draw then flips wherever a logit error moves a class boundary across the uniform, so agreement measures the
weights as much as the quantization. This study quantizes generators of the 14-bit model's width at a few
depths and sharpens their logits (prediction layer weights x s, which keeps every layer below unchanged),
then measures the agreement the export gate measures.

    python benchmarks/agreement_study.py --depths 2 --sharpen 1 4 16
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch


def peakedness(generator, step, labels: np.ndarray) -> tuple[float, float]:
    """Mean entropy (nats) and mean top probability of the first step's guided distributions."""
    from maskbit.step import guided_logits
    cfg = generator.config
    tokens = torch.full((len(labels), cfg.num_tokens, cfg.codebook_splits), cfg.mask_token)
    with torch.inference_mode():
        probs = torch.softmax(guided_logits(generator, tokens, torch.from_numpy(labels), torch.tensor(1.0)), -1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
    return float(entropy), float(probs.max(-1).values.mean())


class EagerBf16:
    """The eager step under bfloat16 autocast, with the `session.run` interface the agreement function uses."""

    def __init__(self, step):
        self.step = step

    def run(self, names, feeds):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return [self.step(*(torch.from_numpy(np.array(v)) for v in feeds.values()))[1].numpy()]


def measure(preset: str, depth: int, sharpen: float, steps: int, workdir: Path, bf16: bool = False) -> dict:
    import maskbit
    from maskbit_export.graphs import dims_of, sample_inputs
    from maskbit_export.onnx_export import export_onnx
    from maskbit_export.quantize import quantize_int8
    from maskbit_export.verify import teacher_forced_agreement
    from maskbit_runtime.backends.ort import import_ort
    from maskbit_runtime.specs import STEP
    from cases import sampling_plan

    config = maskbit.resolve_config(preset)
    config = dataclasses.replace(config, generator=dataclasses.replace(config.generator, depth=depth))
    torch.manual_seed(0)
    generator, tokenizer = maskbit.build_generator(config), maskbit.build_tokenizer(config)
    with torch.no_grad():
        generator.prediction_layer.weight.mul_(sharpen)
    step = maskbit.GenerationStep(generator).eval()
    path = workdir / f"step_{depth}_{sharpen}.onnx"
    sample = sample_inputs(STEP, dims_of(tokenizer, generator), 1, seed=0, codebook_size=2 ** config.generator.num_bits)
    export_onnx(step, STEP, sample, path, max_batch=2)
    quantize_int8(path)
    session = import_ort().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels = np.array([207], dtype=np.int64)
    plan, _ = sampling_plan(generator, steps)
    result = teacher_forced_agreement(step, session, labels.tolist(), plan, seed=4321)
    entropy, top = peakedness(generator, step, labels)
    row = {"preset": preset, "depth": depth, "sharpen": sharpen, "entropy": entropy, "top_probability": top,
           "agreement": result["agreement"], "worst_step": result["worst_step_agreement"]}
    if bf16:
        row["bf16"] = teacher_forced_agreement(step, EagerBf16(step), labels.tolist(), plan, seed=4321)["agreement"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="maskbit_generator_14bit")
    parser.add_argument("--depths", type=int, nargs="+", default=[2])
    parser.add_argument("--sharpen", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also measure eager bfloat16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| generator | depth | logits x | entropy (nats) | top p | int8 agreement | worst step |"
          + (" eager bf16 agreement |" if args.bf16 else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if args.bf16 else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            for sharpen in args.sharpen:
                r = measure(args.preset, depth, sharpen, args.steps, Path(tmp), args.bf16)
                print(f"| {r['preset']} | {r['depth']} | {r['sharpen']:g} | {r['entropy']:.2f} | "
                      f"{r['top_probability']:.3f} | {r['agreement']:.2%} | {r['worst_step']:.2%} |"
                      + (f" {r['bf16']:.2%} |" if args.bf16 else ""), flush=True)


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
