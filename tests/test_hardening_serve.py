"""Hostile requests to `maskbit-run serve` over real HTTP on loopback: each is a 4xx whose body is one line
({"error": "..."}), and the server keeps serving (a normal request still gets its image afterwards)."""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from maskbit_runtime.serve_app import MAX_BODY  # noqa: E402

from conftest import ROOT  # noqa: E402
from serve_support import ThreadServer  # noqa: E402

DEMO = ROOT / "runtime" / "demo" / "bundle"


@pytest.fixture(scope="module")
def server():
    with ThreadServer(log_level="critical", max_batch=2, max_queue=16, request_timeout=60) as s:
        yield s


def one_line(response, statuses: tuple[int, ...] = (413, 422)) -> str:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    text = response.json()["error"]
    assert isinstance(text, str) and text and "\n" not in text and len(text) < 400, text
    return text


def still_serving(server) -> None:
    response = httpx.post(f"{server.url}/v1/generate", json={"labels": [1], "num_steps": 2, "format": "tokens"},
                          timeout=60)
    assert response.status_code == 200, response.text


def post(server, body: str | bytes, content_type: str = "application/json"):
    return httpx.post(f"{server.url}/v1/generate", content=body, headers={"content-type": content_type}, timeout=60)


STEPS = '"num_steps": 2'
HOSTILE = {
    # malformed JSON
    "empty": ("", "body"),
    "null": ("null", "body"),
    "list": ("[1, 2]", "body"),
    "string": ('"labels"', "body"),
    "trailing": ('{"labels": [1]}}', "malformed JSON"),
    "not-utf8": (b'{"labels": ["\xff\xfe"]}', ""),
    "deep": ("[" * 50_000 + "]" * 50_000, ""),
    "duplicate-key-nan": ('{"labels": [1], "guidance_scale": 1, "guidance_scale": NaN}', "guidance_scale"),
    # NaN, infinities and huge numbers
    "nan-guidance": ('{"labels": [1], "guidance_scale": NaN}', "guidance_scale"),
    "inf-temperature": ('{"labels": [1], "randomize_temperature": Infinity}', "randomize_temperature"),
    "minus-inf-guidance": ('{"labels": [1], "guidance_scale": -Infinity}', "guidance_scale"),
    "nan-timeout": ('{"labels": [1], "timeout": NaN}', "timeout"),
    "1e400-guidance": ('{"labels": [1], "guidance_scale": 1e400}', "guidance_scale"),
    "huge-seed": ('{"labels": [1], "seed": 1' + "0" * 40 + "}", "seed"),
    "huge-steps": ('{"labels": [1], "num_steps": 1' + "0" * 20 + "}", "num_steps"),
    "huge-label": ('{"labels": [1' + "0" * 30 + "]}", "labels"),
    "huge-first-index": ('{"labels": [1], "first_index": 1' + "0" * 30 + ", " + STEPS + "}", "first_index"),
    "negative-first-index": ('{"labels": [1], "first_index": -5, ' + STEPS + "}", "first_index"),
    "4300-digit-seed": ('{"labels": [1], "seed": ' + "9" * 4400 + "}", ""),
    "negative-timeout": ('{"labels": [1], "timeout": -1, ' + STEPS + "}", "timeout"),
    "negative-label": ('{"labels": [-1]}', "labels"),
    # unknown and path-like class names
    "unknown-name": ('{"labels": ["no such class"]}', "unknown class name"),
    "empty-name": ('{"labels": [""]}', "labels"),
    "nul-name": ('{"labels": ["coffee\\u0000"]}', "labels"),
    "dotdot": ('{"labels": ["../../etc/passwd"]}', "labels"),
    "absolute": ('{"labels": ["/etc/passwd"]}', "labels"),
    "backslash": ('{"labels": ["..\\\\..\\\\windows"]}', "labels"),
    "tilde": ('{"labels": ["~"]}', "labels"),
    "format-path": ('{"labels": [1], "format": "../../x"}', "format"),
    "long-name": (json.dumps({"labels": ["x" * 100_000]}), "labels"),
    # wrong types
    "labels-string": ('{"labels": "1"}', "labels"),
    "labels-object": ('{"labels": {"a": 1}}', "labels"),
    "labels-bool": ('{"labels": [true]}', "labels"),
    "labels-float": ('{"labels": [1.5]}', "labels"),
    "labels-null": ('{"labels": [null]}', "labels"),
    "labels-nested": ('{"labels": [[1]]}', "labels"),
    "steps-string": ('{"labels": [1], "num_steps": "8"}', "num_steps"),
    "steps-float": ('{"labels": [1], "num_steps": 8.5}', "num_steps"),
    "steps-bool": ('{"labels": [1], "num_steps": true}', "num_steps"),
    "guidance-string": ('{"labels": [1], "guidance_scale": "high"}', "guidance_scale"),
    "stream-string": ('{"labels": [1], "stream": "yes"}', "stream"),
    "format-number": ('{"labels": [1], "format": 5}', "format"),
    "seed-float": ('{"labels": [1], "seed": 0.5}', "seed"),
    # previews
    "preview-huge": ('{"labels": [1], "stream": true, "preview_every": 1' + "0" * 12 + ", " + STEPS + "}",
                     "preview_every"),
    "preview-negative": ('{"labels": [1], "stream": true, "preview_every": -1, ' + STEPS + "}", "preview_every"),
    "preview-float": ('{"labels": [1], "stream": true, "preview_every": 1.5, ' + STEPS + "}", "preview_every"),
    "preview-string": ('{"labels": [1], "stream": true, "preview_every": "1", ' + STEPS + "}", "preview_every"),
    # sizes
    "many-images": (json.dumps({"labels": [1] * 100_000}), ""),
    "huge-body": (json.dumps({"labels": [1], "pad": "x" * (MAX_BODY + 10)}), "request body over"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_is_a_4xx_with_one_line(server, case):
    body, words = HOSTILE[case]
    assert words in one_line(post(server, body))
    assert httpx.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}


def test_a_huge_chunked_body_without_content_length_is_refused(server):
    """A body sent in chunks has no Content-Length, so a limit that reads only that header never sees it."""
    def chunks():
        yield b'{"labels": [1], "pad": "'
        for _ in range(MAX_BODY // (1 << 16) + 4):
            yield b"x" * (1 << 16)
        yield b'"}'
    response = httpx.post(f"{server.url}/v1/generate", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})
    assert "request body over" in one_line(response, (413,))


def test_wrong_content_type_and_method_are_4xx(server):
    assert post(server, '{"labels": [1], "num_steps": 2}', "text/plain").status_code // 100 in (2, 4)
    response = httpx.get(f"{server.url}/v1/generate", timeout=10)
    assert response.status_code == 405


def test_the_server_still_serves_after_every_hostile_request(server):
    for body, _ in HOSTILE.values():
        post(server, body)
    still_serving(server)
