"""Measure the scheduler's design choices on a bundle (default: the demo), side by side in one process.

1. Compacting vs padding: the time of one step over n occupied rows, against the time over the full capacity that
   a padded batch would pay every step (compaction costs one device copy per freed row, once).
2. Guidance-0 rows in their own (unguided) call vs in the guided call: one iteration with g guided and u unguided
   rows runs two calls; folding them into one guided call would run g + u rows through both halves.

    python benchmarks/scheduler_choices.py [--bundle B] [--repeats 5] [--out results.json]

Prints JSON with the CPU's instruction sets and load average. Each figure is the median of `repeats` timings of
`iterations` scheduler iterations (each iteration includes the host's per-step work: noise, settings, uploads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from maskbit_runtime import Pipeline
from maskbit_runtime.cli_common import DEMO_BUNDLE
from maskbit_runtime.machine import cpu_info
from maskbit_runtime.sampling import MAX_STEPS
from maskbit_runtime.scheduler import ImageJob, Scheduler


def iteration_ms(pipe: Pipeline, guided: int, unguided: int, capacity: int, iterations: int, repeats: int) -> float:
    """Median milliseconds of one scheduler iteration with `guided` + `unguided` rows held mid-generation."""
    settings = pipe.sampling.with_overrides(num_steps=MAX_STEPS)
    jobs = [ImageJob(j % pipe.num_classes, 0, j, settings) for j in range(guided)]
    jobs += [ImageJob(j % pipe.num_classes, 0, guided + j, settings.with_overrides(guidance_scale=0.0))
             for j in range(unguided)]
    scheduler = Scheduler(pipe.backend, capacity)
    scheduler.submit(jobs)
    scheduler.iterate()                                  # admits every row and makes the bindings
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            scheduler.iterate()
        timings.append((time.perf_counter() - start) / iterations * 1000)
    for job in jobs:                                     # free the slots for the next measurement
        scheduler.cancel(job)
    scheduler.iterate()
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(DEMO_BUNDLE))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    with Pipeline.load(args.bundle) as pipe:
        capacity = pipe.manifest.max_batch("step")
        run = lambda g, u: iteration_ms(pipe, g, u, capacity, args.iterations, args.repeats)
        run(1, 0)                                        # warm-up
        rows = sorted({1, 2, 4, 8, 16, capacity} - {n for n in (2, 4, 8, 16) if n > capacity})
        step = {n: run(n, 0) for n in rows}
        half = max(capacity // 4, 1)
        split, folded = run(half, half), run(2 * half, 0)
    info = cpu_info()
    report = {
        "bundle": args.bundle, "capacity": capacity, "repeats": args.repeats, "iterations": args.iterations,
        "cpu": info, "load_average": os.getloadavg(),
        "compacting_vs_padding": {str(n): {"ms_per_step": round(ms, 2),
                                           "padded_ms_per_step": round(step[capacity], 2),
                                           "padding_costs_x": round(step[capacity] / ms, 2)}
                                  for n, ms in step.items()},
        "guidance0_rows": {"guided_rows": half, "unguided_rows": half,
                           "two_calls_ms": round(split, 2), "one_guided_call_ms": round(folded, 2),
                           "two_calls_vs_one": round(split / folded, 3)},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
