"""images/s of `maskbit-run sample` on the demo bundle: no Ray, Ray with 1 worker, Ray with 2 workers, and the
scheduling overhead per chunk (wall x workers - time inside generation, per chunk), plus a bare actor round trip.

    python benchmarks/sample_throughput.py            # 32 demo images, 16 steps, chunks of 4, each mode twice

Record the machine: the script prints the CPU's instruction sets and the load average before and after.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import ray
from maskbit_runtime.cli import DEMO_BUNDLE
from maskbit_runtime.machine import cpu_info
from maskbit_runtime.manifest import Manifest
from maskbit_runtime.run_spec import make_spec
from maskbit_runtime.runs import run_shard


def main() -> None:
    machine = cpu_info()
    print(f"cpus {machine['cpu_count']}, isa {' '.join(machine['isa'])}, load average before {os.getloadavg()}")
    spec = make_spec(Manifest.load(DEMO_BUNDLE), {"per_class": 4, "classes": list(range(8))}, seed=0, chunk_size=4)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    modes = [("no Ray", {}), ("Ray, 1 worker", {"ray_address": "local", "workers": 1}),
             ("Ray, 2 workers", {"ray_address": "local", "workers": 2})]
    for label, options in modes * 2:
        stats = run_shard(tempfile.mkdtemp(), spec, DEMO_BUNDLE, **options)
        overhead = (stats.wall_s * stats.workers - stats.compute_s) / len(stats.generated)
        print(f"{label:16s} {spec.num_images / stats.wall_s:6.2f} images/s  wall {stats.wall_s:6.2f} s  "
              f"scheduling overhead {overhead * 1e3:6.1f} ms/chunk", flush=True)

    @ray.remote(num_cpus=1)
    class Echo:
        def ping(self, payload=None):
            return payload

    actor = Echo.remote()
    ray.get(actor.ping.remote())
    for payload in (None, b"\0" * (4 * 64 * 64 * 3 + 4 * 256 * 8)):      # one chunk of 4 demo images + tokens
        start, count = time.perf_counter(), 200
        for _ in range(count):
            ray.get(actor.ping.remote(payload))
        size = "empty" if payload is None else f"{len(payload)} B"
        print(f"actor round trip ({size}): {(time.perf_counter() - start) / count * 1e3:.2f} ms")
    ray.shutdown()
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
