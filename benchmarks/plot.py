"""Render a benchmark JSON (pytest --benchmark-json) as one PNG and a markdown table.

    python benchmarks/plot.py results.json --png benchmarks/results.png --markdown benchmarks/table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GROUPS = ("step", "generate", "decoder", "encoder", "loop overhead")
COLUMNS = (("median ms", "median_ms", "{:.1f}"), ("p90 ms", "p90_ms", "{:.1f}"), ("images/s", "images_per_s", "{:.3g}"),
           ("GFLOP/s", "gflops", "{:.3g}"), ("of GEMM peak", "peak_fraction", "{:.0%}"),
           ("vs eager fp32", "speedup_vs_eager", "{:.2f}x"), ("target", "target", "{:.2f}x"),
           ("met", "target_met", "{}"))


def case_name(bench: dict) -> str:
    params = bench.get("params") or {}
    return params.get("case") or bench["name"]


def load(path: Path) -> tuple[dict[str, list[dict]], dict]:
    """{group: [benchmark entries]} in the order of GROUPS (others after)."""
    data = json.loads(path.read_text())
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    order = [g for g in GROUPS if g in groups] + [g for g in groups if g not in GROUPS]
    return {g: groups[g] for g in order}, data


def markdown(groups: dict[str, list[dict]], data: dict) -> str:
    machine = data.get("machine_info", {})
    load = machine.get("load_average") or ["?"]
    lines = [f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cpu_count', '?')} logical CPUs, instruction "
             f"sets: {' '.join(machine.get('isa', [])) or '?'}; load average at start {load[0]}; Python "
             f"{machine.get('python_version', '?')}; {data.get('datetime', '')}", ""]
    shared = [b for bs in groups.values() for b in bs if b["extra_info"].get("shared_machine")]
    if shared:
        lines += [f"**Warning: {len(shared)} case(s) were timed while other processes used CPU "
                  f"(up to {max(b['extra_info']['other_processes_cores'] for b in shared):.2f} cores).**", ""]
    for group, benches in groups.items():
        if group == "distribution gate":
            lines += ["**Distribution gate** (teacher-forced, against eager fp32):", "",
                      "| case | TV mean | TV p99 | TV worst step | KL mean | gate (mean / worst) | passed |",
                      "|---|---|---|---|---|---|---|"]
            for b in benches:
                i = b["extra_info"]
                lines.append(f"| {case_name(b)} | {i['tv_mean']:.2e} | {i['tv_p99']:.2e} | {i['tv_worst_step']:.2e} | "
                             f"{i['kl_mean']:.2e} | {i['gate']['tv_mean']} / {i['gate']['tv_worst_step']} | "
                             f"{i['passed']} |")
            lines.append("")
            continue
        if group == "loop overhead":
            lines += ["**Loop overhead** per step (all but the transformer), as a share of a full-size step:", "",
                      "| loop | overhead ms/step | full step ms | share | bound (whole cheap step) |",
                      "|---|---|---|---|---|"]
            for b in benches:
                info = b["extra_info"]
                bound = info.get("loop_overhead_upper_bound")
                if case_name(b).endswith("_loop"):
                    lines.append(f"| {case_name(b)} | {info['loop_overhead_ms_per_step']:.2f} | "
                                 f"{info['full_step_ms']:.0f} | {info['loop_overhead_fraction']:.2%} | "
                                 f"{'n/a' if bound is None else f'{bound:.2%}'} |")
            lines.append("")
            continue
        ratios = [b for b in benches if "precision_step_ratio" in b["extra_info"]]
        if ratios:
            lines += [f"**{group}: what reduced precision pays on this machine** (fp32 time over the reduced "
                      "precision's; the ceiling is the same ratio for the step's GEMMs, same library and shapes):", "",
                      "| case | step speed-up over its fp32 | GEMM speed-up (ceiling) | share of the ceiling |",
                      "|---|---|---|---|"]
            for b in ratios:
                i = b["extra_info"]
                lines.append(f"| {case_name(b)} | {i['precision_step_ratio']:.2f}x | {i['precision_gemm_ratio']:.2f}x "
                             f"| {i['precision_step_ratio'] / i['precision_gemm_ratio']:.0%} |")
            lines.append("")
        lines += [f"**{group}**", "", "| case | " + " | ".join(c[0] for c in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        for b in sorted(benches, key=lambda b: b["extra_info"].get("median_ms", 0), reverse=True):
            info = b["extra_info"]
            cells = [fmt.format(info[key]) if key in info else "" for _, key, fmt in COLUMNS]
            lines.append(f"| {case_name(b)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(groups: dict[str, list[dict]], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    timed = {g: b for g, b in groups.items() if g not in ("distribution gate", "loop overhead")}
    if not timed:
        return
    fig, axes = plt.subplots(1, len(timed), figsize=(4.2 * len(timed), 4.2), squeeze=False)
    for ax, (group, benches) in zip(axes[0], timed.items()):
        benches = sorted(benches, key=lambda b: b["extra_info"]["median_ms"], reverse=True)
        names = [case_name(b) for b in benches]
        medians = [b["extra_info"]["median_ms"] for b in benches]
        p90 = [b["extra_info"]["p90_ms"] - m for b, m in zip(benches, medians)]
        colors = ["tab:gray" if n.startswith("eager") else "tab:olive" if n.startswith("gemm") else "tab:blue"
                  for n in names]
        ax.barh(names, medians, xerr=[[0] * len(p90), p90], color=colors)
        for y, b in enumerate(benches):
            info = b["extra_info"]
            label = f"{info['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in info else \
                f"{info.get('gflops', 0):.0f} GFLOP/s"
            ax.text(info["median_ms"], y, f" {label}", va="center", fontsize=8)
        ax.set_title(group)
        ax.set_xlabel("median ms (whisker: p90)")
        ax.set_xlim(0, max(medians) * 1.45)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--png", type=Path, default=Path("benchmarks/results.png"))
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here (default: print it)")
    parser.add_argument("--title", default="MaskBit: eager PyTorch vs the ONNX Runtime runtime (CPU)")
    args = parser.parse_args()
    groups, data = load(args.json)
    plot(groups, args.png, args.title)
    table = markdown(groups, data)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    else:
        print(table)


if __name__ == "__main__":
    main()
