"""Latency against load from `serve_load.py` JSON reports: one row of panels per report (bundle), one panel per
workload (open-loop p50 and p99 latency against the offered rate, one line per policy), and a markdown table.

    python benchmarks/plot_serve_load.py benchmarks/results/serve_load.json benchmarks/results/serve_load_large.json \\
        --png benchmarks/results/serve_load.png --markdown benchmarks/results/serve_load_table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STYLE = {"step": ("C0", "step-level (FIFO)"), "step:shortest": ("C2", "step-level (shortest first)"),
         "request": ("C1", "dynamic batches"), "single": ("C3", "one at a time")}


def label(report: dict, path: Path) -> str:
    bundle = report["config"].get("bundle") or "demo bundle"
    return f"{Path(bundle).name} ({path.stem})"


def plot(reports: list[tuple[Path, dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    workloads = sorted({r["workload"] for _, rep in reports for r in rep["runs"]})
    fig, axes = plt.subplots(len(reports), len(workloads), figsize=(5.5 * len(workloads), 4 * len(reports)),
                             squeeze=False)
    for row, (path, report) in enumerate(reports):
        for col, name in enumerate(workloads):
            ax = axes[row][col]
            runs = [r for r in report["runs"] if r["workload"] == name and r["mode"] == "open" and r["p99"]]
            if not runs:                        # this report did not run the workload
                ax.set_visible(False)
                continue
            for policy in STYLE:
                points = sorted((r["rate"], r["p50"], r["p99"]) for r in runs if r["policy"] == policy)
                if not points:
                    continue
                color, text = STYLE[policy]
                rates, p50, p99 = zip(*points)
                ax.plot(rates, p99, "-o", color=color, label=f"{text} p99")
                ax.plot(rates, p50, "--", color=color, alpha=0.6, label=f"{text} p50")
            probed = report.get("capacity_probe", {}).get(name)
            if probed:
                ax.axvline(0.7 * probed, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{label(report, path)}: {name} workload", fontsize=9)
            ax.set_xlabel("offered load, requests/s (dotted: 0.7 of the dynamic batcher's capacity)", fontsize=8)
            ax.set_ylabel("latency, s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def table(reports: list[tuple[Path, dict]]) -> str:
    lines = ["| bundle | workload | load | policy | p50 s | p99 s | first preview p50 s | queued / computing s "
             "| images/s | occupancy |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path, report in reports:
        for r in report["runs"]:
            load = f"{r['rate']:.2f} req/s" if r["mode"] == "open" else f"{r['concurrency']} clients"
            cell = lambda v, fmt="{:.2f}": "-" if v is None else fmt.format(v)
            lines.append(f"| {label(report, path)} | {r['workload']} | {load} | {r['policy']} | {cell(r['p50'])} | "
                         f"{cell(r['p99'])} | {cell(r['ttfp_p50'])} | {cell(r['queued_mean'])} / "
                         f"{cell(r['computing_mean'])} | {cell(r['images_per_s'], '{:.3f}')} | "
                         f"{cell(r['occupancy'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    reports = [(path, json.loads(path.read_text())) for path in args.reports]
    plot(reports, args.png)
    if args.markdown:
        args.markdown.write_text(table(reports))


if __name__ == "__main__":
    main()
