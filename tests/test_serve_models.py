"""Several bundles behind one `maskbit-run serve` (serve_models.py), over real HTTP on loopback: `--bundle` parsing,
the distribution-gate line each bundle's manifest gives, routing by `model`, and /metrics with a `model` label."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from PIL import Image  # noqa: E402

from maskbit_runtime import InputError, Pipeline  # noqa: E402
from maskbit_runtime.serve_models import gate_summary, parse_bundles  # noqa: E402

from serve_support import DEMO, ThreadServer  # noqa: E402


def test_bundle_options_are_named_paths():
    assert parse_bundles(["a=x/fp32", "int8=/b/int8"]) == {"a": Path("x/fp32"), "int8": Path("/b/int8")}
    assert parse_bundles(["bundles/fp32"]) == {"fp32": Path("bundles/fp32")}
    assert parse_bundles(["dir/with=sign/b"]) == {"b": Path("dir/with=sign/b")}      # '=' after a '/': a path
    assert parse_bundles([]) == {}
    for values, words in ((["a=x", "a=y"], "given twice"), (["x/a", "y/a"], "given twice"), (["a b=x"], "a name"),
                          (["a="], "no path")):
        with pytest.raises(InputError, match=words):
            parse_bundles(values)


@pytest.mark.parametrize("verification, passed, words", [
    ({"performed": False}, None, "fp32: not verified at export"),
    ("garbage", None, "not verified"),
    ({"performed": True, "generation": {"passed": True}}, True, "seeded generations equal"),
    ({"performed": True, "generation": {"passed": False}}, False, "DIFFER"),
    ({"performed": True, "distribution": {"passed": True, "tv_mean": 0.01, "tv_worst_step": 0.02,
                                          "gate": {"tv_mean": 0.05, "tv_worst_step": 0.1}}},
     True, "distribution gate passed: tv_mean 0.01 (gate 0.05), tv_worst_step 0.02 (gate 0.1)"),
    ({"performed": True, "distribution": {"passed": "yes", "tv_mean": "NaN", "gate": None}},
     False, "distribution gate FAILED: tv_mean ? (gate ?), tv_worst_step ? (gate ?)"),
], ids=["unverified", "not-a-dict", "fp32", "fp32-differs", "gate-passed", "hostile"])
def test_gate_summary_reads_what_export_recorded(verification, passed, words):
    with Pipeline.load(DEMO) as pipe:
        summary = gate_summary(pipe.manifest.replace(verification=verification))
    assert summary["passed"] is passed and words in summary["summary"]


def _pngs(response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(i["png"])))) for i in response.json()["images"]]


def test_two_bundles_side_by_side_route_by_model_and_label_their_metrics():
    with ThreadServer(bundles={"left": DEMO, "right": DEMO}, max_batch=2) as s:
        models = httpx.get(f"{s.url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["left", "right"] and all(m["gate"]["passed"] for m in models)
        body = {"labels": [1, 6], "seed": 4, "num_steps": 3}
        left = _pngs(httpx.post(f"{s.url}/v1/generate", json=body, timeout=60))          # the first by default
        right = _pngs(httpx.post(f"{s.url}/v1/generate", json={**body, "model": "right"}, timeout=60))
        np.testing.assert_array_equal(left, right)
        np.testing.assert_array_equal(left, s.pipe.generate([1, 6], seed=4, num_steps=3).images)
        wrong = httpx.post(f"{s.url}/v1/generate", json={**body, "model": "middle"}, timeout=10)
        assert wrong.status_code == 422 and wrong.json()["error"].startswith("model: no model 'middle'")
        metrics = httpx.get(f"{s.url}/metrics", timeout=10).text
        for model in ("left", "right"):
            assert re.search(rf'^maskbit_images_total{{model="{model}",outcome="done"}} 2\.0$', metrics, re.M)
            assert re.search(rf'^maskbit_occupied_slots{{model="{model}"}} 0\.0$', metrics, re.M)
        assert metrics.count("# TYPE maskbit_occupied_slots gauge") == 1
        assert httpx.get(f"{s.url}/readyz", timeout=10).json() == {"status": "ready"}
