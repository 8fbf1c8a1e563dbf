"""`maskbit-run serve --ray-serve` on a local Ray: replicas serve the offline images byte for byte; one replica's
process SIGKILLed under load ends every request (a 200 with the right image, or a 5xx), none hangs, and Ray Serve
brings the service back to two running replicas. The CLI starts it and SIGTERM stops it (Ray included).

Replicas reserve no CPU (2 fit on a 2-core machine) and run ONNX Runtime on one thread each; every wait is bounded."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'maskbit[distributed]')")
httpx = pytest.importorskip("httpx", reason="the [serve] extra is not installed")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed")

from PIL import Image  # noqa: E402

from maskbit_runtime import Pipeline, serve_ray  # noqa: E402

from conftest import ROOT  # noqa: E402

DEMO = ROOT / "runtime" / "demo" / "bundle"
REQUESTS, CONCURRENCY = 32, 8        # the load around the kill: bounded in count ...
LOAD_BOUND_S = 120.0                 # ... and in time: every request has ended by then, or the test fails
RECOVERY_BOUND_S = 60.0              # two replicas running again and a new request served within this


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(i: int) -> dict:
    """Request i of the load: mixed labels, seeds, image counts, step counts and guidance (0 runs unguided)."""
    body = {"labels": [i % 8, (3 * i + 1) % 8][: 1 + i % 2], "seed": 1000 + i, "num_steps": (4, 6, 8)[i % 3]}
    if i % 4 == 3:
        body["guidance_scale"] = 0.0
    if i % 8 == 5:
        body["stream"] = True
    return body


def _expected(offline: Pipeline, body: dict) -> np.ndarray:
    settings = {k: body[k] for k in ("num_steps", "guidance_scale") if k in body}
    return offline.generate(body["labels"], seed=body.get("seed", 0), first_index=body.get("first_index", 0),
                            **settings).images


def _pngs(items: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(item["png"]))).convert("RGB"))
                     for item in items])


async def _generate(client, url: str, body: dict) -> tuple[int | str, np.ndarray | None, float]:
    """(status, the images of a 200, seconds). A streamed request answers 200 at once: its outcome is "result"
    (its images) or "cut" (the stream ended without a result: an error event, or the connection closed mid-body,
    which is what a client sees of a replica killed under its stream)."""
    begin = time.monotonic()
    try:
        if body.get("stream"):
            async with client.stream("POST", f"{url}/v1/generate", json=body) as response:
                if response.status_code != 200:
                    return response.status_code, None, time.monotonic() - begin
                last = [line async for line in response.aiter_lines() if line.startswith(("event:", "data:"))][-2:]
            if last and last[0] == "event: result":
                return "result", _pngs(json.loads(last[1][len("data: "):])["images"]), time.monotonic() - begin
            return "cut", None, time.monotonic() - begin
        response = await client.post(f"{url}/v1/generate", json=body)
    except httpx.TimeoutException:
        raise
    except httpx.HTTPError as exc:                # Serve's proxy closes a dying replica's stream mid-body
        return "cut" if body.get("stream") else type(exc).__name__, None, time.monotonic() - begin
    images = _pngs(response.json()["images"]) if response.status_code == 200 else None
    return response.status_code, images, time.monotonic() - begin


@pytest.fixture(scope="module")
def offline():
    with Pipeline.load(DEMO) as pipe:
        yield pipe


@pytest.fixture
def two_replicas():
    """Serve on a local Ray started here, 2 replicas; Serve and Ray are shut down whatever the test did."""
    port = _free_port()
    started = False
    try:
        started = serve_ray.start(DEMO, None, "127.0.0.1", port, replicas=2, cpus_per_replica=0, threads=1,
                                  max_batch=4, max_queue=64, request_timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve_ray.stop(started)
        import ray
        if started and ray.is_initialized():
            ray.shutdown()


def _load_with_a_kill(url: str) -> tuple[list, int, float]:
    """REQUESTS requests, CONCURRENCY at a time; once 4 have answered, SIGKILL one replica's process."""
    async def run():
        limit = asyncio.Semaphore(CONCURRENCY)
        answered = asyncio.Event()
        done = 0
        async with httpx.AsyncClient(timeout=LOAD_BOUND_S) as client:
            async def one(i):
                nonlocal done
                async with limit:
                    result = await _generate(client, url, _body(i))
                done += 1
                if done >= 4:
                    answered.set()
                return result
            tasks = [asyncio.create_task(one(i)) for i in range(REQUESTS)]
            await asyncio.wait_for(answered.wait(), LOAD_BOUND_S)
            pid = await asyncio.to_thread(serve_ray.replica_pid)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks), LOAD_BOUND_S)   # a hang fails here
        return results, pid, killed_at
    return asyncio.run(run())


def test_a_replica_killed_under_load(two_replicas, offline):
    url = two_replicas
    assert serve_ray.replica_states() == {"RUNNING": 2}
    results, killed, killed_at = _load_with_a_kill(url)

    statuses = [status for status, _, _ in results]
    print(f"statuses after the kill: {sorted(statuses, key=str)}; slowest {max(s for _, _, s in results):.1f} s")
    assert all(status in (200, "result", "cut") or (isinstance(status, int) and 500 <= status < 600)
               for status in statuses), statuses
    assert statuses.count(200) + statuses.count("result") >= REQUESTS // 2, statuses   # the survivor kept serving
    deadline = killed_at + RECOVERY_BOUND_S
    while serve_ray.replica_states() != {"RUNNING": 2}:
        assert time.monotonic() < deadline, f"not recovered: {serve_ray.replica_states()}"
        time.sleep(0.5)
    print(f"two replicas running again {time.monotonic() - killed_at:.1f} s after the kill")
    for i, (status, images, _) in enumerate(results):
        if status in (200, "result"):
            np.testing.assert_array_equal(images, _expected(offline, _body(i)), err_msg=f"request {i}")
    body = {"labels": [5], "seed": 7, "num_steps": 6}
    response = httpx.post(f"{url}/v1/generate", json=body, timeout=RECOVERY_BOUND_S)
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(_pngs(response.json()["images"]), _expected(offline, body))
    pids = {serve_ray.replica_pid() for _ in range(8)}
    assert killed not in pids


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _events(url: str, body: dict) -> list[tuple[str, dict]]:
    events, kind = [], None
    with httpx.stream("POST", f"{url}/v1/generate", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: "):])))
    return events


def test_cli_serves_offline_images_streams_cancels_and_drains_on_sigterm(offline):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-c", "from maskbit_runtime.cli import main; main()", "serve", "--ray-serve",
         "--replicas", "1", "--cpus-per-replica", "0", "--port", str(port), "--max-batch", "4",
         "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("serving 1 replica(s) on Ray Serve") for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)[-2000:]
            time.sleep(0.2)
        assert httpx.get(f"{url}/readyz", timeout=10).json() == {"status": "ready"}
        body = {"labels": [2, 6], "seed": 3, "num_steps": 6}
        response = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(_pngs(response.json()["images"]), _expected(offline, body))

        events = _events(url, {**body, "preview_every": 3})     # Server-Sent Events pass Serve's proxy
        kinds = [kind for kind, _ in events]
        assert kinds.count("progress") >= 6 and "preview" in kinds and kinds[-1] == "result", kinds
        np.testing.assert_array_equal(_pngs(events[-1][1]["images"]), _expected(offline, body))

        long = {"labels": [1, 2], "num_steps": 256, "stream": True}     # a client that leaves frees its slots
        with httpx.stream("POST", f"{url}/v1/generate", json=long, timeout=60) as response:
            assert next(response.iter_lines()).startswith("event: progress")
        _wait_for(lambda: _metric(url, 'maskbit_images_total{outcome="cancelled"}') == 2, 30, "slots not freed")

        in_flight = {}                                           # SIGTERM: the request in flight still finishes
        body = {"labels": [4], "seed": 9, "num_steps": 48}
        client = threading.Thread(target=lambda: in_flight.update(
            response=httpx.post(f"{url}/v1/generate", json=body, timeout=90)))
        client.start()
        _wait_for(lambda: _metric(url, "maskbit_occupied_slots") == 1, 30, "the request did not start")
        process.send_signal(signal.SIGTERM)
        client.join(timeout=90)
        assert in_flight["response"].status_code == 200, in_flight["response"].text
        np.testing.assert_array_equal(_pngs(in_flight["response"].json()["images"]), _expected(offline, body))
        assert process.wait(timeout=90) == 0, "".join(lines)[-2000:]
        with pytest.raises(httpx.ConnectError):                  # Serve's proxy went with it
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_a_replica_that_cannot_run_the_bundle_fails_the_start_in_one_line(bundle):
    step = bundle / "step.onnx"
    data = bytearray(step.read_bytes())
    data[-10] ^= 1                               # the manifest checks out; the file's hash does not
    step.write_bytes(bytes(data))
    import ray
    with pytest.raises(serve_ray.RayServeError, match=r"step\.onnx does not match its sha256") as failure:
        serve_ray.start(bundle, None, "127.0.0.1", _free_port(), replicas=1, cpus_per_replica=0)
    assert "\n" not in str(failure.value)
    assert not ray.is_initialized()             # the Ray it started is gone
