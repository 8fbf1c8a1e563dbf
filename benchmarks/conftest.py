"""Benchmark fixtures: random-weight models at a chosen size, bundles per runtime precision, run settings.

    pytest benchmarks --benchmark-only                        # tiny models, a quick run
    pytest benchmarks --benchmark-only --size full            # the 14-bit generator (305M) and 256x256 tokenizer
    pytest benchmarks --benchmark-disable                     # smoke: every case runs once (CI)

Weights are random (seeded): speed does not depend on them. Bundles are built into a temporary directory
without export verification; instead every timed case checks its own output (tokens equal to eager's, or the
distribution gate for reduced precision), so a fast wrong result fails the run. The machine's CPU model,
instruction sets and load average go into the JSON's machine_info, and a loud warning closes any run whose
load average says the machine was shared.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))     # harness.py, official_loop.py

SIZES = {"tiny": "tiny_lfq10", "demo": "demo64", "full": "maskbit_generator_14bit"}   # demo: the demo's shapes
PRECISIONS = ("fp32", "int8")


@dataclasses.dataclass
class Settings:
    size: str
    rounds: int
    generate_steps: int
    overhead_steps: int    # steps of the loop-overhead loops (cheap: no transformer layers)
    agreement_steps: int
    batch: int             # images per step; the transformer runs 2 x batch sequences (guidance)
    threads: int


def pytest_addoption(parser):
    group = parser.getgroup("maskbit benchmarks")
    group.addoption("--size", choices=sorted(SIZES), default="tiny", help="model size (default tiny)")
    group.addoption("--rounds", type=int, default=None, help="timed rounds per case (default: tiny 10, full 5)")
    group.addoption("--generate-steps", type=int, default=None,
                    help="steps of the timed generations (default: tiny 8 = its preset, full 4)")
    group.addoption("--agreement-steps", type=int, default=8,
                    help="teacher-forced steps of the distribution gate (the preset's schedule, compressed)")
    group.addoption("--images", type=int, default=1, help="images per step (the transformer batch is twice this)")
    group.addoption("--threads", type=int, default=2, help="intra-op threads for torch and ONNX Runtime")


def pytest_benchmark_update_machine_info(config, machine_info):
    """pytest-benchmark's hook: add the CPU's instruction sets and the load average to the results JSON."""
    from harness import cpu_info
    machine_info.update(cpu_info())


def pytest_report_header(config):
    from harness import LOAD_LIMIT, cpu_info
    info = cpu_info()
    header = [f"cpu: {info['cpu_model']} x{info['cpu_count']}, isa: {' '.join(info['isa']) or 'none of interest'}, "
              f"load average: {' '.join(f'{x:.2f}' for x in info['load_average'])}"]
    if info["load_average"][0] > 2 * LOAD_LIMIT:
        header.append(f"WARNING: load average {info['load_average'][0]:.2f} before the run: this machine is busy; "
                      f"timings will not be an idle machine's (each group measures other processes' CPU use)")
    return header


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Targets per instruction set, and a loud line when any group was timed on a shared machine."""
    from harness import LOAD_LIMIT, cpu_info
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in (session.benchmarks if session else []) if getattr(b, "extra_info", None)]
    rows = [(b.group, b.name, b.extra_info) for b in benches if "target" in b.extra_info]
    if rows:
        terminalreporter.section("speed-up targets (isa: " + " ".join(cpu_info()["isa"]) + ")")
        for group, name, info in rows:
            verdict = "met" if info["target_met"] else "NOT MET"
            terminalreporter.write_line(f"{group:<10} {name:<40} {info['speedup_vs_eager']:.2f}x "
                                        f"(target {info['target']:.2f}x): {verdict}")
    shared = [b for b in benches if b.extra_info.get("shared_machine")]
    if shared:
        terminalreporter.section("SHARED MACHINE", sep="!")
        worst = max(b.extra_info["other_processes_cores"] for b in shared)
        terminalreporter.write_line(f"{len(shared)} case(s) were timed while other processes kept up to {worst:.2f} "
                                    f"cores busy (> {LOAD_LIMIT}): do not report these figures as an idle machine's.")


@pytest.fixture(scope="session")
def settings(request) -> Settings:
    opt = request.config.getoption
    size = opt("--size")
    return Settings(size=size, rounds=opt("--rounds") or (10 if size == "tiny" else 5),
                    generate_steps=opt("--generate-steps") or (8 if size == "tiny" else 4),
                    overhead_steps=max(16, opt("--generate-steps") or 0),
                    agreement_steps=opt("--agreement-steps"), batch=opt("--images"), threads=opt("--threads"))


@pytest.fixture(scope="session")
def models(settings):
    """(config, tokenizer, generator) with seeded random weights, in eval mode, torch at `threads` threads."""
    import maskbit
    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    config = maskbit.resolve_config(SIZES[settings.size])
    return config, maskbit.build_tokenizer(config), maskbit.build_generator(config)


@pytest.fixture(scope="session")
def bundles(models, settings, tmp_path_factory) -> dict[str, Path]:
    """One bundle per runtime precision (with the transformer graph: the loop-overhead and gate cases use it)."""
    from maskbit_export import ExportOptions, build_bundle
    config, tokenizer, generator = models
    root = tmp_path_factory.mktemp("bundles")
    return {p: build_bundle(root / p, tokenizer, generator, options=ExportOptions(
                max_batch=max(2, settings.batch), precision=p, verify=False, with_transformer=True)).root
            for p in PRECISIONS}


@pytest.fixture(scope="session")
def pipelines(bundles, settings):
    from maskbit_runtime import Pipeline
    pipes = {p: Pipeline.load(path, backend="ort", providers=["CPUExecutionProvider"], threads=settings.threads)
             for p, path in bundles.items()}
    yield pipes
    for pipe in pipes.values():
        pipe.close()


@pytest.fixture(scope="session")
def labels(settings, models) -> np.ndarray:
    return np.random.default_rng(0).integers(0, models[2].config.num_classes, settings.batch)


# ---- the groups, each timed round-robin on first use ------------------------------------------------------

@pytest.fixture(scope="session")
def step_group(models, pipelines, labels, settings):
    from cases import step_cases
    from harness import Group, gemm_cases, generator_flops
    generator = models[2]
    gemms, gemm_flops = gemm_cases(generator.config, 2 * len(labels) * (generator.config.num_tokens + 1),
                                   settings.threads)
    group = Group({**step_cases(generator, pipelines, labels), **gemms}, settings.rounds)
    group.flops = {name: gemm_flops if name in gemms else generator_flops(generator.config, 2 * len(labels))
                   for name in group.cases}
    return group


@pytest.fixture(scope="session")
def generate_group(models, pipelines, labels, settings):
    from cases import generate_cases
    from harness import Group
    _, tokenizer, generator = models
    rounds = max(2, settings.rounds // 2)
    return Group(generate_cases(tokenizer, generator, pipelines, labels, settings.generate_steps), rounds)


@pytest.fixture(scope="session")
def overhead_group(models, labels, settings, tmp_path_factory):
    """A model with the full model's dims but no transformer layers, as an fp32 bundle and eager."""
    import maskbit
    from cases import overhead_cases
    from harness import Group
    from maskbit_export import ExportOptions, build_bundle
    from maskbit_runtime import Pipeline
    config, tokenizer, generator = models
    hollow_cfg = dataclasses.replace(config, generator=dataclasses.replace(config.generator, depth=0))
    if settings.size == "full":          # a small tokenizer with the same 16x16 grid: only the generator matters
        small = maskbit.TokenizerConfig(token_size=14, codebook_size=2 ** 14, hidden_channels=32,
                                        channel_mult=(1, 1, 2), num_resolutions=3, resolution=64)
        hollow_cfg = dataclasses.replace(hollow_cfg, tokenizer=small)
    torch.manual_seed(0)
    hollow, small_tokenizer = maskbit.build_generator(hollow_cfg), maskbit.build_tokenizer(hollow_cfg)
    path = build_bundle(tmp_path_factory.mktemp("hollow") / "fp32", small_tokenizer, hollow, options=ExportOptions(
        max_batch=max(2, settings.batch), verify=False, with_transformer=True)).root
    pipe = Pipeline.load(path, backend="ort", providers=["CPUExecutionProvider"], threads=settings.threads)
    yield Group(overhead_cases(hollow, pipe, labels, settings.overhead_steps), settings.rounds)
    pipe.close()


@pytest.fixture(scope="session")
def codec_groups(models, pipelines, settings):
    from cases import codec_cases
    from harness import Group, counted_flops
    _, tokenizer, _ = models
    groups = {}
    for component in ("decoder", "encoder"):
        groups[component] = Group(codec_cases(tokenizer, pipelines["fp32"], component, settings.batch),
                                  max(3, settings.rounds // 2))
        groups[component].flops = counted_flops(groups[component].cases["eager_fp32"])
    return groups


@pytest.fixture(scope="session")
def distribution_gate(models, pipelines, labels, settings):
    """Teacher-forced TV/KL of int8 (ONNX Runtime) and bf16 (eager autocast) against eager fp32, over
    `--agreement-steps` steps of the preset's schedule: the check that reduced-precision cases are right."""
    from cases import gate_results
    return gate_results(models[2], pipelines, labels, settings.agreement_steps)


@pytest.fixture(scope="session")
def step_checks(models, pipelines, labels, distribution_gate):
    from cases import step_checks
    return step_checks(models[2], pipelines, labels, distribution_gate)


@pytest.fixture(scope="session")
def generate_checks(models, pipelines, labels, settings, distribution_gate):
    from cases import generate_checks
    _, tokenizer, generator = models
    return generate_checks(tokenizer, generator, pipelines, labels, settings.generate_steps, distribution_gate)
