"""A larger random bundle for the serving benchmark: the demo's tokenizer and grid (64x64 images, 16x16 tokens of
10 bits in 2 groups) with a wider and deeper generator (seeded random weights), so one guided step of one image
takes well over 50 ms on a 2-core CPU. Quality means nothing here; only the cost of a step does.

    python benchmarks/serve_bundle.py /tmp/serve_bundle [--hidden 384 --depth 8 --max-batch 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path


def build(out: Path, hidden: int, depth: int, max_batch: int) -> Path:
    import torch

    import maskbit
    from maskbit_export import ExportOptions, build_bundle
    config = maskbit.resolve_config("demo64")
    generator = dataclasses.replace(config.generator, hidden_dim=hidden, depth=depth, heads=hidden // 64,
                                    mlp_dim=4 * hidden)
    config = dataclasses.replace(config, generator=generator, name=f"random_h{hidden}_d{depth}")
    torch.manual_seed(0)
    tokenizer, model = maskbit.build_tokenizer(config), maskbit.build_generator(config)
    return build_bundle(out, tokenizer.eval(), model.eval(), options=ExportOptions(max_batch=max_batch)).root


def step_ms(bundle: Path, batch: int, steps: int = 8) -> float:
    """Milliseconds per guided step of `batch` images (a whole generation of `steps` steps, decode included)."""
    from maskbit_runtime import Pipeline
    with Pipeline.load(bundle) as pipe:
        pipe.generate([0] * batch, num_steps=2)
        start = time.perf_counter()
        pipe.generate(list(range(batch)), num_steps=steps)
        return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    root = build(args.out, args.hidden, args.depth, args.max_batch)
    print(f"{root}: {step_ms(root, 1):.1f} ms per guided step of 1 image, "
          f"{step_ms(root, args.max_batch):.1f} ms of {args.max_batch}")


if __name__ == "__main__":
    main()
