"""What the machine is, for records next to figures that depend on it (int8 kernels, benchmark timings)."""

from __future__ import annotations

import os
from pathlib import Path

# the instruction sets that decide which CPU kernels run (int8 dot products, bf16, fp32 GEMM width)
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_info() -> dict:
    """CPU model, the instruction sets of ISA_FLAGS it has, logical CPUs and the load average now (Linux)."""
    model, flags = "?", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    return {"cpu_model": model, "isa": [f for f in ISA_FLAGS if f in flags], "cpu_count": os.cpu_count(),
            "load_average": load}
