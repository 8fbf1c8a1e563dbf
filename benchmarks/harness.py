"""Interleaved timing for pytest-benchmark, FLOP counts and the machine's measured fp32 GEMM peak.

The development machines are shared and noisy, so the cases of one group are never timed one after another:
`Group` runs every case round-robin (round 1: A B C, round 2: A B C, ...) and hands each test its own
durations, which `record` gives to pytest-benchmark. A slow minute then slows every case alike and the
ratios between cases stay meaningful. The GEMM peak is itself a case of the step group, so it is measured
under the same load as the steps it is compared with.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import torch


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
            self.load_before = os.getloadavg()[0]
            for _ in range(self.warmup):
                for fn in self.cases.values():
                    fn()
            for _ in range(self.rounds):
                for n, fn in self.cases.items():
                    start = time.perf_counter()
                    fn()
                    self._times[n].append(time.perf_counter() - start)
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
    # pytest-benchmark has no public call for externally timed rounds; this is what `pedantic` does inside.
    benchmark._mode = "interleaved"
    stats = benchmark._make_stats(1)
    for duration in times:
        stats.update(duration)
    info = {"median_ms": 1e3 * float(np.median(times)), "p90_ms": 1e3 * float(np.percentile(times, 90)),
            "rounds": len(times), "load_average_1min": [group.load_before, group.load_after], **extra}
    benchmark.extra_info.update(info)
    return info


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
    and their FLOPs. The best of the three is the machine's measured fp32 GEMM peak."""
    D, F = cfg.hidden_dim, cfg.mlp_dim
    rng = np.random.default_rng(0)
    shapes = [(D, 3 * D), (D, D), (D, F), (F, D)]
    weights = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    acts = [rng.standard_normal((rows, s[0]), dtype=np.float32) for s in shapes]
    t_weights, t_acts = [torch.from_numpy(w) for w in weights], [torch.from_numpy(a) for a in acts]
    flops = float(sum(2 * rows * k * n for k, n in shapes))
    session, feeds = _ort_gemms(weights, acts, threads)

    def torch_gemm():
        for a, w in zip(t_acts, t_weights):
            torch.mm(a, w)

    def numpy_gemm():
        for a, w in zip(acts, weights):
            a @ w
    return {"gemm_torch": torch_gemm, "gemm_numpy": numpy_gemm,
            "gemm_ort": lambda: session.run(None, feeds)}, flops


def _ort_gemms(weights: list[np.ndarray], acts: list[np.ndarray], threads: int):
    """An ONNX graph of independent MatMuls with constant weights, as the runtime's graphs have them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, list(a.shape)) for i, a in enumerate(acts)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(acts))]
    nodes = [helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]) for i in range(len(acts))]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    model = helper.make_model(helper.make_graph(nodes, "gemms", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, {f"x{i}": a for i, a in enumerate(acts)}
