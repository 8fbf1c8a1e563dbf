"""`maskbit-run serve` over real HTTP on loopback: served images equal their offline ones byte for byte under
concurrent mixed load; streaming, cancellation, a full queue, deadlines, bad requests, backend failures and SIGTERM.

The demo bundle with few steps keeps it fast; every request loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import signal
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from PIL import Image  # noqa: E402

from maskbit_runtime import Pipeline  # noqa: E402

from conftest import ROOT  # noqa: E402
from serve_support import ThreadServer, serve_process  # noqa: E402

DEMO = ROOT / "runtime" / "demo" / "bundle"
SAMPLING = ("num_steps", "guidance_scale", "guidance_annealing", "randomize_temperature", "mask_schedule")


@pytest.fixture(scope="module")
def offline():
    with Pipeline.load(DEMO) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def server():
    with ThreadServer(max_batch=4, max_queue=64, request_timeout=60) as s:
        yield s


def _png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def _expected(offline, body: dict) -> np.ndarray:
    labels = [offline.class_names.index(x) if isinstance(x, str) else x for x in body["labels"]]
    return offline.generate(labels, seed=body.get("seed", 0), first_index=body.get("first_index", 0),
                            **{k: body[k] for k in SAMPLING if k in body})


def _images(response) -> np.ndarray:
    kind = response.headers["content-type"]
    if kind == "image/png":
        return np.asarray(Image.open(io.BytesIO(response.content)))[None]
    if kind == "application/octet-stream":
        return np.load(io.BytesIO(response.content))["images"]
    return np.stack([_png(item["png"]) for item in response.json()["images"]])


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    text = response.json()["error"]
    assert text and "\n" not in text
    return text


def _events(lines):
    """(event, data) pairs of a Server-Sent Events stream."""
    kind = None
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, json.loads(line[6:])


def test_concurrent_mixed_requests_equal_their_offline_images(server, offline):
    rng = np.random.default_rng(0)
    names = offline.class_names
    bodies = []
    for i in range(30):
        count = 1 + (i % 5 == 0)
        labels = [int(x) if i % 3 else names[int(x)] for x in rng.integers(0, 8, count)]
        body = {"labels": labels, "seed": int(rng.integers(0, 1000)), "first_index": int(rng.integers(0, 5)),
                "num_steps": int(rng.integers(2, 5)), "guidance_scale": [0.0, 1.0, 2.5][i % 3]}
        if i % 5 == 0:
            body.update(guidance_annealing="cosine", randomize_temperature=2.0, mask_schedule="cosine")
        body["format"] = ["png", "png", "npz", "grid_png" if count == 1 else "png"][i % 4]
        bodies.append(body)

    async def send_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))

    responses = asyncio.run(send_all())
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(_images(response), _expected(offline, body).images, err_msg=str(body))
    tokens = httpx.post(f"{server.url}/v1/generate", json={**bodies[1], "format": "tokens"}, timeout=30).json()
    np.testing.assert_array_equal(np.array([item["tokens"] for item in tokens["images"]]),
                                  _expected(offline, bodies[1]).tokens)
    assert _metric(server.url, "maskbit_occupied_slots") == 0


def test_stream_sends_progress_previews_and_the_offline_image(server, offline):
    body = {"labels": ["coffee"], "seed": 3, "num_steps": 8, "stream": True, "preview_every": 2}
    with httpx.stream("POST", f"{server.url}/v1/generate", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(_events(response.iter_lines()))
    kinds = [kind for kind, _ in events]
    assert kinds.count("progress") == 8 and kinds[-1] == "result"
    assert [data["steps"] for kind, data in events if kind == "progress"] == [[s] for s in range(1, 9)]
    previews = [data for kind, data in events if kind == "preview"]
    assert [p["step"] for p in previews] == [2, 4, 6]
    assert _png(previews[0]["png"]).shape == (64, 64, 3)
    np.testing.assert_array_equal(_png(events[-1][1]["images"][0]["png"]), _expected(offline, body).images[0])
    assert _one_line_error(httpx.post(f"{server.url}/v1/generate", json={**body, "preview_every": 0, "format": "npz"}),
                           422).startswith("format")


def test_a_client_that_leaves_frees_its_slots(server):
    cancelled = _metric(server.url, 'maskbit_images_total{outcome="cancelled"}')
    body = {"labels": [1, 2, 3, 4], "num_steps": 400, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/generate", json=body, timeout=30) as response:
        events = _events(response.iter_lines())
        assert next(events)[0] == "progress"
        assert _metric(server.url, "maskbit_occupied_slots") == 4
    # a plain request whose client gives up (read timeout) is cancelled as well
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/generate", json={"labels": [5], "num_steps": 400}, timeout=1.0)
    deadline = time.monotonic() + 15
    while _metric(server.url, 'maskbit_images_total{outcome="cancelled"}') < cancelled + 5:
        assert time.monotonic() < deadline, "cancelled images were not freed"
        time.sleep(0.1)
    assert _metric(server.url, "maskbit_occupied_slots") == 0
    assert _metric(server.url, "maskbit_queued_images") == 0


def test_deadline_gives_504_with_one_line(server):
    started = time.monotonic()
    response = httpx.post(f"{server.url}/v1/generate", json={"labels": [0], "num_steps": 400, "timeout": 0.5},
                          timeout=30)
    assert "deadline of 0.5 s exceeded" in _one_line_error(response, 504)
    assert time.monotonic() - started < 10
    assert _metric(server.url, 'maskbit_requests_total{status="expired"}') >= 1


@pytest.mark.parametrize("body, status, words", [
    ('{"labels": [1', 422, "malformed JSON"),
    ('{"labels": [1], "guidance_scale": NaN}', 422, "guidance_scale"),
    ('{"labels": ["no such class"]}', 422, "unknown class name"),
    ('{"labels": [9]}', 422, "out of range"),
    ('{"labels": [1], "num_steps": -3}', 422, "num_steps"),
    ('{"labels": [1], "seed": -1}', 422, "seed"),
    ('{"labels": [1], "mask_schedule": "spiral"}', 422, "mask_schedule"),
    ('{"labels": [1], "colour": "red"}', 422, "colour"),
    ('{"labels": []}', 422, "labels"),
    ('{"labels": [1], "num_steps": 64, "stream": true, "preview_every": 1}', 422, "preview_every"),
    (json.dumps({"labels": [1] * 1000}), 413, "at most 64"),
    (json.dumps({"labels": [1] * 400_000}), 413, "request body over"),
], ids=["malformed", "nan", "unknown-class", "label-range", "negative-steps", "negative-seed", "bad-choice",
        "unknown-field", "no-labels", "previews", "too-many-images", "huge-body"])
def test_bad_requests_get_a_4xx_with_one_line(server, body, status, words):
    response = httpx.post(f"{server.url}/v1/generate", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert words in _one_line_error(response, status)


def test_a_chunked_body_over_the_limit_gets_413(server):
    chunks = (b"[" + b"1," * 100_000 for _ in range(10))         # ~2 MB, no Content-Length
    response = httpx.post(f"{server.url}/v1/generate", content=chunks, timeout=30,
                          headers={"content-type": "application/json"})
    assert "request body over" in _one_line_error(response, 413)
    chunked = httpx.post(f"{server.url}/v1/generate", content=iter([b'{"labels": ', b'[1], "num_steps": 2}']),
                         headers={"content-type": "application/json"}, timeout=30)
    assert chunked.status_code == 200, chunked.text


def test_models_health_ready_openapi(server, offline):
    model = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert model["classes"] == list(offline.class_names) and model["sampling"] == offline.sampling.to_dict()
    assert model["precision"] == "fp32" and model["backend"] == "ort" and model["limits"]["slots"] == 4
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready"}
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "num_steps" in schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert "coffee" in httpx.get(f"{server.url}/").text


def test_full_queue_gives_503_with_retry_after(offline):
    with ThreadServer(max_batch=1, max_queue=1) as small:
        body = {"labels": [0], "num_steps": 400, "stream": True}
        with httpx.stream("POST", f"{small.url}/v1/generate", json=body, timeout=30) as first, \
                httpx.stream("POST", f"{small.url}/v1/generate", json=body, timeout=30) as second:
            assert first.status_code == second.status_code == 200
            response = httpx.post(f"{small.url}/v1/generate", json={"labels": [1], "num_steps": 2}, timeout=30)
            assert "queue is full" in _one_line_error(response, 503)
            assert int(response.headers["retry-after"]) >= 1
        assert _metric(small.url, 'maskbit_rejections_total{reason="queue_full"}') == 1


@pytest.mark.parametrize("policy", ["request", "single"])
def test_the_comparison_policies_serve_the_same_images(offline, policy):
    bodies = [{"labels": [i, 7 - i], "seed": i, "num_steps": 2 + i, "guidance_scale": [0.0, 1.0, 2.0][i]}
              for i in range(3)]

    async def send_all(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/generate", json=b) for b in bodies))

    with ThreadServer(max_batch=3, policy=policy, batch_wait=0.01) as s:
        for body, response in zip(bodies, asyncio.run(send_all(s.url))):
            assert response.status_code == 200, response.text
            np.testing.assert_array_equal(_images(response), _expected(offline, body).images)


def test_a_backend_failure_fails_only_its_request(server, offline):
    primitives = server.pipe.backend.primitives
    original, calls = primitives.run, []

    def failing_once(binding):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected device fault\nsecond line")
        return original(binding)

    primitives.run = failing_once
    try:
        response = httpx.post(f"{server.url}/v1/generate", json={"labels": [1], "num_steps": 3}, timeout=30)
        assert _one_line_error(response, 500) == "generation failed: injected device fault"
        body = {"labels": [2, 5], "seed": 7, "num_steps": 3}
        again = httpx.post(f"{server.url}/v1/generate", json=body, timeout=30)
        assert again.status_code == 200
        np.testing.assert_array_equal(_images(again), _expected(offline, body).images)
    finally:
        primitives.run = original


def test_sigterm_drains_then_exits(offline):
    with serve_process("--max-batch", "4", "--grace", "30") as (process, url):
        body = {"labels": ["rocket"], "seed": 11, "num_steps": 24, "stream": True}
        with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=60) as response:
            events = _events(response.iter_lines())
            assert next(events)[0] == "progress"              # in flight
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:                                              # a new request is refused (503, or no listener)
                refused = httpx.post(f"{url}/v1/generate", json={"labels": [1], "num_steps": 2}, timeout=10)
                assert refused.status_code == 503
            except httpx.TransportError:
                pass
            rest = list(events)
        assert rest[-1][0] == "result"
        np.testing.assert_array_equal(_png(rest[-1][1]["images"][0]["png"]), _expected(offline, body).images[0])
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
