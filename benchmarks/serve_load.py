"""Load benchmark of `maskbit-run serve` on loopback: step-level batching against request-level dynamic batching and
one request at a time, on the same server code and bundle (`--policy step|request|single`).

One server process per policy is started on 127.0.0.1 (all first, each idle until its turn). For each workload
(mixed: 16/32/64 steps, a quarter with guidance 0; uniform: 32 steps) it runs open-loop Poisson arrivals at each
rate and a closed-loop concurrency sweep, each point on every policy in turn with the same requests, so load that
drifts during the run biases no policy.
Every request is streamed with a preview every quarter of its steps, so the time to the first preview is measured
with the latency. Bounded: `--requests` per point, `--time-limit` seconds per point (open loop: after the last
arrival; what has not ended by then counts as unfinished). Output: JSON (`--out`, and a table on stderr).

    python benchmarks/serve_load.py --max-batch 8 --concurrency 1,4,8 --requests 16 --steps-scale 0.25 \\
        --time-limit 60 --out benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

WORKLOADS = {"mixed": ((16, 32, 64), 0.25), "uniform": ((32,), 0.0)}     # step counts, share with guidance 0


def start_server(args, policy: str):
    """One `maskbit-run serve` process; `policy` is step, step:shortest (shortest-first admission), request or
    single."""
    policy, _, admission = policy.partition(":")
    command = [sys.executable, "-c", "from maskbit_runtime.cli import main; main()", "serve", "--host", "127.0.0.1",
               "--port", "0", "--policy", policy, "--batch-wait", str(args.batch_wait), "--max-queue", "100000",
               "--request-timeout", str(args.time_limit), "--admission", admission or "fifo"]
    command += ["--bundle", args.bundle] if args.bundle else []
    command += ["--max-batch", str(args.max_batch)] if args.max_batch else []
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 120
    while not any("running on" in line for line in lines):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the server did not start:\n{''.join(lines)}")
        time.sleep(0.05)
    return process, re.search(r"running on (http://127\.0\.0\.1:\d+)", "".join(lines)).group(1)


def workload(name: str, count: int, num_classes: int, scale: float, seed: int, previews: bool = True) -> list[dict]:
    steps, unguided = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        num_steps = max(1, round(int(rng.choice(steps)) * scale))
        body = {"labels": [int(rng.integers(num_classes))], "seed": int(rng.integers(1 << 31)),
                "num_steps": num_steps, "stream": True,
                "preview_every": max(1, math.ceil(num_steps / 4)) if previews else 0}
        if rng.random() < unguided:
            body["guidance_scale"] = 0.0
        bodies.append(body)
    return bodies


async def one(client: httpx.AsyncClient, body: dict) -> dict:
    sent, first_preview = time.perf_counter(), None
    try:
        async with client.stream("POST", "/v1/generate", json=body) as response:
            if response.status_code != 200:
                return {"status": response.status_code}
            kind = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    if kind == "preview" and first_preview is None:
                        first_preview = time.perf_counter() - sent
                    elif kind in ("result", "error"):
                        data = json.loads(line[6:])
                        if kind == "error":
                            return {"status": data["status"]}
                        return {"status": 200, "latency": time.perf_counter() - sent, "ttfp": first_preview,
                                "queued": data["queued_seconds"], "computing": data["computing_seconds"],
                                "images": len(data["images"])}
    except httpx.HTTPError as exc:
        return {"status": type(exc).__name__}
    return {"status": "no result"}


async def open_loop(url: str, bodies: list[dict], rate: float, limit: float, seed: int) -> list[dict]:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=limit, limits=httpx.Limits(max_connections=1000)) as client:
        start, tasks = time.perf_counter(), []
        for body, at in zip(bodies, np.cumsum(gaps)):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, body)))
        done, pending = await asyncio.wait(tasks, timeout=limit)      # after the last arrival
        for task in pending:
            task.cancel()
        return [t.result() if t in done else {"status": "unfinished"} for t in tasks]


async def closed_loop(url: str, bodies: list[dict], concurrency: int, limit: float) -> list[dict]:
    queue, results = list(reversed(bodies)), []
    async with httpx.AsyncClient(base_url=url, timeout=limit, limits=httpx.Limits(max_connections=1000)) as client:
        async def worker():
            while queue:
                results.append(await one(client, queue.pop()))
        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        done, pending = await asyncio.wait(workers, timeout=limit)
        for task in pending:
            task.cancel()
    return results + [{"status": "unfinished"}] * (len(bodies) - len(results))


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    names = ("maskbit_slot_steps_total", "maskbit_step_seconds_count", "maskbit_step_seconds_sum", "maskbit_slots")
    return {n: float(re.search(rf"^{n} (\S+)$", text, re.M).group(1)) for n in names}


def summarize(results: list[dict], seconds: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if r["status"] == 200]
    pct = lambda key, q: round(float(np.percentile([r[key] for r in ok], q)), 4) if ok else None
    mean = lambda key: round(float(np.mean([r[key] for r in ok])), 4) if ok else None
    steps = after["maskbit_step_seconds_count"] - before["maskbit_step_seconds_count"]
    slot_steps = after["maskbit_slot_steps_total"] - before["maskbit_slot_steps_total"]
    ttfp = [r["ttfp"] for r in ok if r["ttfp"] is not None]
    return {"requests": len(results), "ok": len(ok),
            "failed": sorted({str(r["status"]) for r in results if r["status"] != 200}),
            "p50": pct("latency", 50), "p90": pct("latency", 90), "p99": pct("latency", 99), "mean": mean("latency"),
            "ttfp_p50": round(float(np.percentile(ttfp, 50)), 4) if ttfp else None,
            "ttfp_p90": round(float(np.percentile(ttfp, 90)), 4) if ttfp else None,
            "queued_mean": mean("queued"), "computing_mean": mean("computing"),
            "images_per_s": round(sum(r["images"] for r in ok) / seconds, 4), "seconds": round(seconds, 2),
            "occupancy": round(slot_steps / (steps * after["maskbit_slots"]), 4) if steps else None,
            "step_ms": round(1000 * (after["maskbit_step_seconds_sum"] - before["maskbit_step_seconds_sum"]) / steps, 2)
            if steps else None}


def overhead(url: str, bundle: str | None, repeats: int, num_steps: int = 32) -> dict:
    """HTTP + scheduling overhead: one image of `num_steps` served (plain JSON, no previews) against the same image
    made by `Pipeline.generate` in this process, interleaved; the median difference per step."""
    from maskbit_runtime import Pipeline
    from maskbit_runtime.cli_common import DEMO_BUNDLE
    served, offline = [], []
    with Pipeline.load(bundle or DEMO_BUNDLE) as pipe, httpx.Client(base_url=url, timeout=120) as client:
        pipe.generate([0], num_steps=2)
        for i in range(repeats):
            start = time.perf_counter()
            assert client.post("/v1/generate", json={"labels": [i % 2], "seed": i, "num_steps": num_steps}
                               ).status_code == 200
            served.append(time.perf_counter() - start)
            start = time.perf_counter()
            pipe.generate([i % 2], seed=i, num_steps=num_steps)
            offline.append(time.perf_counter() - start)
    step = float(np.median(offline)) / num_steps
    extra = (float(np.median(served)) - float(np.median(offline))) / num_steps
    return {"num_steps": num_steps, "repeats": repeats, "served_median_s": round(float(np.median(served)), 4),
            "offline_median_s": round(float(np.median(offline)), 4), "step_ms": round(1000 * step, 2),
            "overhead_ms_per_step": round(1000 * extra, 3), "overhead_share_of_step": round(extra / step, 4)}


def open_rates(args, workload_name: str, bodies: list[dict], servers: dict, report: dict) -> list[float]:
    """The open-loop rates of one workload: absolute, or (xF) fractions of the dynamic batcher's capacity, which is
    measured here: requests/s of a closed loop of --max-batch clients on the request-policy server."""
    rates = [r for r in args.rates.split(",") if r]
    if not any(r.startswith("x") for r in rates):
        return [float(r) for r in rates]
    if "request" not in servers:
        raise SystemExit("relative rates (xF) need the request policy's server: add request to --policies")
    url, start = servers["request"][1], time.perf_counter()
    results = asyncio.run(closed_loop(url, bodies, args.max_batch, args.time_limit))
    capacity = sum(r["status"] == 200 for r in results) / (time.perf_counter() - start)
    report.setdefault("capacity_probe", {})[workload_name] = round(capacity, 4)
    print(f"{workload_name}: dynamic batcher capacity {capacity:.3f} requests/s", file=sys.stderr, flush=True)
    return [round(float(r[1:]) * capacity, 4) if r.startswith("x") else float(r) for r in rates]


def goals(report: dict) -> dict:
    """The issue's goals, per workload: step-level p99 over the dynamic batcher's at the rate nearest 0.7 of the
    batcher's probed capacity; capacity (images/s of the open-loop points whose p99 <= 3x the policy's unloaded p50,
    the closed loop of one client) of each policy over the batcher's; HTTP + scheduling overhead share of a step."""
    out = {"overhead_share_of_step": report.get("overhead", {}).get("overhead_share_of_step")}
    for name, probed in report.get("capacity_probe", {}).items():
        runs = [r for r in report["runs"] if r["workload"] == name]
        by = lambda policy, mode, runs=runs: [r for r in runs if r["policy"] == policy and r["mode"] == mode
                                              and r["p99"]]
        entry = {"probed_capacity": probed}
        for policy in {r["policy"] for r in runs}:
            unloaded = next((r["p50"] for r in by(policy, "closed") if r["concurrency"] == 1), None)
            fits = [r["images_per_s"] for r in by(policy, "open") if unloaded and r["p99"] <= 3 * unloaded]
            entry[policy] = {"unloaded_p50": unloaded, "capacity": max(fits, default=None)}
        rates = sorted({r["rate"] for r in by("request", "open")})
        if rates and "step" in entry:
            at = min(rates, key=lambda rate: abs(rate - 0.7 * probed))
            p99 = {r["policy"]: r["p99"] for r in runs if r["mode"] == "open" and r["rate"] == at}
            entry["p99_at_0.7"] = {"rate": at, **p99}
            entry["p99_ratio_step_vs_request"] = round(p99["step"] / p99["request"], 3) if "request" in p99 else None
            base = entry.get("request", {}).get("capacity")
            entry["capacity_ratio_vs_request"] = {policy: round(v["capacity"] / base, 3) for policy, v in entry.items()
                                                  if isinstance(v, dict) and v.get("capacity") and base}
        out[name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the demo bundle)")
    parser.add_argument("--max-batch", type=int, default=8, help="slots of every server")
    parser.add_argument("--policies", default="step,step:shortest,request,single",
                        help="servers to compare: step (FIFO admission), step:shortest (fewest steps first), "
                             "request (dynamic batching), single (one request at a time)")
    parser.add_argument("--workloads", default="mixed,uniform")
    parser.add_argument("--rates", default="x0.3,x0.5,x0.7,x0.9",
                        help="open-loop arrival rates, requests/s; xF is F times the dynamic batcher's capacity, "
                             "measured first for each workload (closed loop, --max-batch clients, policy request)")
    parser.add_argument("--concurrency", default="1,4,8", help="closed-loop concurrencies")
    parser.add_argument("--requests", type=int, default=16, help="requests per point")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale the workloads' step counts")
    parser.add_argument("--no-previews", action="store_true", help="stream without previews (no time to first "
                        "preview; only progress events and the result)")
    parser.add_argument("--batch-wait", type=float, default=0.05, help="the dynamic batcher's wait, seconds")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per point at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overhead-repeats", type=int, default=10,
                        help="served vs offline pairs for the overhead measure, on the step server (0: skip)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from maskbit_runtime.machine import cpu_info
    report = {"config": vars(args) | {"out": str(args.out)}, "machine": cpu_info(), "loadavg_start": os.getloadavg(),
              "workloads": {k: {"steps": v[0], "guidance_0_share": v[1]} for k, v in WORKLOADS.items()}, "runs": []}
    servers = {}        # one idle server per policy, all started first: each point runs the policies in turn, so a
    try:                # machine whose load drifts during the run biases no policy (an idle server sleeps)
        for policy in args.policies.split(","):
            servers[policy] = start_server(args, policy)
        first = next(iter(servers.values()))[1]
        num_classes = httpx.get(f"{first}/v1/models").json()["data"][0]["num_classes"]
        if "step" in servers and args.overhead_repeats:
            report["overhead"] = overhead(servers["step"][1], args.bundle, args.overhead_repeats)
            print(json.dumps(report["overhead"]), file=sys.stderr, flush=True)
        for name in args.workloads.split(","):
            bodies = workload(name, args.requests, num_classes, args.steps_scale, args.seed, not args.no_previews)
            points = [("open", rate) for rate in open_rates(args, name, bodies, servers, report)] + \
                     [("closed", int(c)) for c in args.concurrency.split(",") if c]
            for mode, level in points:
                for policy, (_, url) in servers.items():
                    before, start = scrape(url), time.perf_counter()
                    if mode == "open":
                        results = asyncio.run(open_loop(url, bodies, level, args.time_limit, args.seed))
                    else:
                        results = asyncio.run(closed_loop(url, bodies, level, args.time_limit))
                    row = {"policy": policy, "workload": name, "mode": mode,
                           ("rate" if mode == "open" else "concurrency"): level,
                           **summarize(results, time.perf_counter() - start, before, scrape(url)),
                           "loadavg": os.getloadavg()[0]}
                    report["runs"].append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    report["goals"] = goals(report)
    print(json.dumps(report["goals"], indent=1), file=sys.stderr)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
