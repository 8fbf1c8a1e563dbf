"""Interleaved timing for pytest-benchmark, the machine's description, targets, FLOP counts and the GEMM peak.

The development machines are shared and noisy, so the cases of one group are never timed one after another:
`Group` runs every case round-robin (round 1: A B C, round 2: A B C, ...) and hands each test its own
durations. A slow minute then slows every case alike and the ratios between cases stay meaningful. The GEMM
peak is itself a case of the step group, so it is measured under the same load as the steps it is compared with.

pytest-benchmark receives those durations through its public `timer` option: every benchmark test is marked
`@pytest.mark.benchmark(timer=REPLAY)`, and `record` replays the interleaved durations through
`benchmark.pedantic` on a no-op, so each round's start/end readings differ by exactly one measured duration.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from maskbit_runtime.machine import cpu_info

# CPU time used by *other* processes while a group was timed, in cores (busy time of the whole machine from
# /proc/stat minus this process's own CPU time, per wall second). An idle machine shows < 0.1; above the limit
# the machine was shared and ratios between cases are not trustworthy (contention inflated them 1.5-2x before).
# The load average is recorded too, but it counts this process's own threads and lags by minutes.
LOAD_LIMIT = 0.25

# speed-up targets over eager fp32 per (group, case); int8 depends on the CPU's int8 dot-product instructions
TARGETS = {("step", "ort_fp32"): {"any": 1.15},
           ("step", "ort_int8"): {"avx512_vnni": 3.0, "avx2": 1.8}}


class SharedMachineWarning(UserWarning):
    """The load average says other work ran while timing: the figures are not an idle machine's."""


def target_for(group: str, case: str, isa: list[str]) -> float | None:
    """The speed-up target of a case on a CPU with these instruction sets (the best-equipped rule that applies)."""
    rules = TARGETS.get((group, case), {})
    for flag in ("avx512_vnni", "avx2", "any"):
        if flag in rules and (flag == "any" or flag in isa):
            return rules[flag]
    return None


class CpuUsage:
    """How many cores other processes kept busy since construction (machine busy time minus ours, per second)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        own = os.times()
        return busy, own.user + own.system, time.monotonic()

    def others(self) -> float:
        busy, own, wall = (b - a for a, b in zip(self.start, self._sample()))
        return max(0.0, (busy - own) / wall) if wall > 0 else float("nan")


class ReplayClock:
    """A clock for pytest-benchmark's `timer` option that replays durations measured elsewhere."""

    def __init__(self):
        self.now, self.pending, self.started = 0.0, [], False

    def load(self, durations: list[float]) -> None:
        self.pending, self.started = list(durations), False

    def __call__(self) -> float:
        if self.started:                                   # the end of a round: one measured duration later
            self.now += self.pending.pop(0)
        self.started = not self.started
        return self.now


REPLAY = ReplayClock()


class Group:
    """The cases of one benchmark group, timed round-robin on first use."""

    def __init__(self, cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1):
        self.cases = cases
        self.rounds = rounds
        self.warmup = warmup
        self._times: dict[str, list[float]] | None = None

    def times(self, name: str) -> list[float]:
        if self._times is None:
            self._times = {n: [] for n in self.cases}
            for _ in range(self.warmup):
                for fn in self.cases.values():
                    fn()
            self.load_before = os.getloadavg()[0]
            usage = CpuUsage()
            for _ in range(self.rounds):
                for n, fn in self.cases.items():
                    start = time.perf_counter()
                    fn()
                    self._times[n].append(time.perf_counter() - start)
            self.other_cores = usage.others()
            self.load_after = os.getloadavg()[0]
        return self._times[name]

    def median(self, name: str) -> float:
        return float(np.median(self.times(name)))


def record(benchmark, group: Group, name: str, **extra) -> dict:
    """Give pytest-benchmark this case's interleaved durations; with --benchmark-disable run the case once."""
    if benchmark.disabled:
        benchmark(group.cases[name])
        return {}
    times = group.times(name)
    REPLAY.load(times)
    benchmark.pedantic(lambda: None, rounds=len(times), iterations=1, warmup_rounds=0)
    info = {"median_ms": 1e3 * float(np.median(times)), "p90_ms": 1e3 * float(np.percentile(times, 90)),
            "rounds": len(times), "load_average_1min": [group.load_before, group.load_after],
            "other_processes_cores": group.other_cores, "shared_machine": not group.other_cores <= LOAD_LIMIT, **extra}
    if info["shared_machine"]:
        warnings.warn(SharedMachineWarning(
            f"{benchmark.group}/{name}: other processes kept {group.other_cores:.2f} cores busy (> {LOAD_LIMIT}) "
            f"while timing; these figures are not an idle machine's"), stacklevel=2)
    benchmark.extra_info.update(info)
    return info


def speedup_info(group: str, case: str, speedup: float) -> dict:
    """The speed-up, this CPU's target for it (if any) and whether it was met."""
    target = target_for(group, case, cpu_info()["isa"])
    return {"speedup_vs_eager": speedup, **({"target": target, "target_met": speedup >= target} if target else {})}


def generator_flops(cfg, batch: int) -> float:
    """Forward FLOPs of the generator for `batch` sequences (MASKBIT_SPEC 9: linear layers + attention matmuls)."""
    L, D, F = cfg.num_tokens + 1, cfg.hidden_dim, cfg.mlp_dim
    per_layer = 2 * L * D * 3 * D + 2 * 2 * L * L * D + 2 * L * D * D + 2 * 2 * L * D * F
    head = 2 * cfg.num_tokens * cfg.num_bits * D + 2 * L * D * D + 2 * L * D * cfg.codebook_splits * cfg.group_classes
    return float(batch * (cfg.depth * per_layer + head))


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs (2 x MACs) of the convolutions and matmuls of an eager call, counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def gemm_cases(cfg, rows: int, threads: int) -> tuple[dict[str, Callable[[], object]], float]:
    """fp32 GEMMs of one transformer layer's weight shapes at `rows` rows in torch, numpy and ONNX Runtime (MLAS),
    and their FLOPs. The best of the three is the machine's measured fp32 GEMM peak. Beside them, the same GEMMs
    in int8 (ONNX Runtime, quantized as bundles are) and bf16 (torch): the ceilings of the int8 and bf16 steps'
    speed-ups on this machine (`gemm_ort` / `gemm_ort_int8`, `gemm_torch` / `gemm_torch_bf16`)."""
    D, F = cfg.hidden_dim, cfg.mlp_dim
    rng = np.random.default_rng(0)
    shapes = [(D, 3 * D), (D, D), (D, F), (F, D)]
    weights = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    acts = [rng.standard_normal((rows, s[0]), dtype=np.float32) for s in shapes]
    t_weights, t_acts = [torch.from_numpy(w) for w in weights], [torch.from_numpy(a) for a in acts]
    flops = float(sum(2 * rows * k * n for k, n in shapes))
    session, feeds = _ort_gemms(weights, acts, threads)
    session_int8, _ = _ort_gemms(weights, acts, threads, int8=True)
    # bf16 as autocast runs a layer: F.linear on [out, in] weights (oneDNN's bf16 kernels want that layout)
    b_acts, b_weights = [a.bfloat16() for a in t_acts], [w.t().contiguous().bfloat16() for w in t_weights]

    def torch_gemm():
        for a, w in zip(t_acts, t_weights):
            torch.mm(a, w)

    def numpy_gemm():
        for a, w in zip(acts, weights):
            a @ w
    def torch_bf16_gemm():
        for a, w in zip(b_acts, b_weights):
            torch.nn.functional.linear(a, w)
    return {"gemm_torch": torch_gemm, "gemm_numpy": numpy_gemm, "gemm_ort": lambda: session.run(None, feeds),
            "gemm_ort_int8": lambda: session_int8.run(None, feeds), "gemm_torch_bf16": torch_bf16_gemm}, flops


def _ort_gemms(weights: list[np.ndarray], acts: list[np.ndarray], threads: int, int8: bool = False):
    """An ONNX graph of independent MatMuls with constant weights, as the runtime's graphs have them (int8:
    quantized with the arguments of int8 bundles)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, list(a.shape)) for i, a in enumerate(acts)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(acts))]
    nodes = [helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]) for i in range(len(acts))]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    model = helper.make_model(helper.make_graph(nodes, "gemms", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    data = model.SerializeToString()
    if int8:
        import tempfile

        from onnxruntime.quantization import quantize_dynamic

        from maskbit_export.quantize import dynamic_int8_options
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "f.onnx").write_bytes(data)
            quantize_dynamic(str(Path(tmp) / "f.onnx"), str(Path(tmp) / "q.onnx"), **dynamic_int8_options())
            data = (Path(tmp) / "q.onnx").read_bytes()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session, {f"x{i}": a for i, a in enumerate(acts)}
