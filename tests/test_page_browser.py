"""The playground page at `/` in a real browser: Debian's Chromium, headless, driven by Playwright for Python,
against a real server on 127.0.0.1 (uvicorn in a thread, and `maskbit-run serve --bundle a=... --bundle b=...` in a
subprocess for side by side).

It picks a class, generates, sees previews stream in before the final image, compares the page's final pixels and
its client-side grid with what `POST /v1/generate` returns for the same request, cancels a long request and sees in
/metrics that its slots were freed, sees the one-sentence message for bad values, and saves screenshots. Without
chromium or playwright the tests skip, except under CI (the variable CI set), where they fail.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from PIL import Image  # noqa: E402

from bundle_support import edit  # noqa: E402
from serve_support import DEMO, ThreadServer, serve_process  # noqa: E402

CHROMIUM = Path(os.environ.get("MASKBIT_CHROMIUM", "/usr/bin/chromium"))     # Debian's (apt-get install chromium)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# every assignment to an <img>'s src, with the image's role then: (pane, kind, src), kept on window.__srcs
RECORD_SRCS = """
window.__srcs = [];
const own = Object.getOwnPropertyDescriptor(HTMLImageElement.prototype, "src");
Object.defineProperty(HTMLImageElement.prototype, "src", {configurable: true, get() { return own.get.call(this); },
  set(value) {
    const pane = this.closest("[data-model]");
    window.__srcs.push([pane ? pane.dataset.model : "", this.dataset.kind || "", value]);
    own.set.call(this, value);
  }});
"""


@pytest.fixture(scope="module")
def browser():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("playwright (pip install playwright; never `playwright install`: the system browser is used)")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"chromium at {CHROMIUM} (apt-get install -y chromium, or set MASKBIT_CHROMIUM)")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI must run it)")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    with ThreadServer(max_batch=4, max_queue=64, request_timeout=120) as s:
        yield s


@pytest.fixture
def page(browser, server):
    with _page(browser, server.url) as page:
        yield page


@contextlib.contextmanager
def _page(browser, url: str, width: int = 360):
    """The page at `url`, loaded (its models read), with every <img> src assignment recorded; no JS errors."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    context.add_init_script(RECORD_SRCS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{url}/")
    _until(page, "document.querySelector('#advanced-fields [data-setting]') !== null")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _png(data: bytes | str) -> np.ndarray:
    if isinstance(data, str):
        data = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _metric(url: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{url}/metrics", timeout=10).text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _fill(page, **fields) -> None:
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def _until(page, expression: str, timeout: float = 30.0):
    """Poll a JavaScript expression until it is truthy (wait_for_function evaluates strings, which the page's
    Content-Security-Policy forbids)."""
    deadline = time.monotonic() + timeout
    while not (value := page.evaluate(f"() => {expression}")):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.02)
    return value


def _wait_done(page, model: str) -> None:
    _until(page, f"document.querySelector('[data-model=\"{model}\"] .grid-link:not([hidden])')")


def test_page_streams_previews_and_its_pixels_equal_the_api(page, server, tmp_path):
    assert page.evaluate("document.documentElement.scrollWidth") <= 360        # usable at 360 px, no sideways scroll
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, button, progress')]
        .filter(e => !(e.labels && e.labels.length) && !e.textContent.trim() && !e.getAttribute('aria-label'))
        .map(e => e.id || e.outerHTML)""")
    assert unlabelled == []
    assert page.is_hidden("#model-field") and page.is_hidden("#compare-field")        # one model: no comparison
    page.select_option("#label", label="rocket")
    _fill(page, seed=5, count=2, num_steps=8, guidance_scale=2.0)
    page.click("#advanced summary")
    page.select_option("#mask_schedule", "cosine")
    page.click("#generate")
    model = page.get_attribute("[data-model]", "data-model")
    _wait_done(page, model)
    assert re.fullmatch(r"done in [\d.]+ s \(server: [\d.]+ s queued, [\d.]+ s computing\)",
                        page.text_content(f'[data-model="{model}"] .status'))
    assert page.text_content("#message") == ""
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert (tmp_path / "playground.png").stat().st_size > 1000

    srcs = page.evaluate("window.__srcs")
    first_final = next(i for i, (_, kind, _) in enumerate(srcs) if kind == "final")
    previews = [src for _, kind, src in srcs[:first_final] if kind == "preview"]
    assert len(set(previews)) >= 2, f"{len(previews)} previews before the final image"

    body = {"labels": ["rocket", "rocket"], "seed": 5, "num_steps": 8, "guidance_scale": 2.0,
            "mask_schedule": "cosine", "model": model}
    api = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60).json()
    shown = [_png(src) for src in page.eval_on_selector_all("img[data-kind=final]", "imgs => imgs.map(i => i.src)")]
    assert len(shown) == 2
    for mine, theirs in zip(shown, api["images"]):
        np.testing.assert_array_equal(mine, _png(theirs["png"]))
    assert not np.array_equal(shown[0], shown[1])                            # two noise streams, two images
    downloads = page.eval_on_selector_all("a.download", "links => links.map(a => [a.download, a.href])")
    assert [_png(href).shape for _, href in downloads] == [(64, 64, 3)] * 2
    grid = page.evaluate("""async () => {
        const blob = await (await fetch(document.querySelector('a.grid').href)).blob();
        return [...new Uint8Array(await blob.arrayBuffer())]; }""")
    server_grid = httpx.post(f"{server.url}/v1/generate", json={**body, "format": "grid_png"}, timeout=60).content
    np.testing.assert_array_equal(_png(bytes(grid)), _png(server_grid))      # the canvas grid is grid_png's


def test_cancel_aborts_the_stream_and_the_server_frees_the_slots(page, server):
    cancelled = _metric(server.url, 'maskbit_images_total{outcome="cancelled"}')
    _fill(page, count=4, num_steps=400)
    page.click("#generate")
    _until(page, "/^step ([3-9]|\\d\\d+) \\//.test(document.querySelector('.status').textContent)")
    assert _metric(server.url, "maskbit_occupied_slots") == 4
    page.focus("#cancel")
    page.keyboard.press("Enter")                                              # by keyboard
    _until(page, "document.querySelector('.status').textContent === 'cancelled'")
    deadline = time.monotonic() + 15
    while _metric(server.url, 'maskbit_images_total{outcome="cancelled"}') < cancelled + 4:
        assert time.monotonic() < deadline, "the server did not cancel the images"
        time.sleep(0.1)
    assert _metric(server.url, "maskbit_occupied_slots") == 0
    assert page.text_content("#message") == "" and page.is_enabled("#generate") and not page.is_enabled("#cancel")


def test_bad_values_get_one_inline_sentence_and_the_page_stays_usable(page, server):
    _fill(page, num_steps=0)
    page.press("#num_steps", "Enter")                                          # Enter in a field submits
    _until(page, "document.querySelector('#message').textContent !== ''")
    message = page.text_content("#message")
    assert message.startswith("Not accepted: num_steps") and message.count(". ") == 0, message
    _fill(page, num_steps=4, count=1000)
    page.click("#generate")
    _until(page, "document.querySelector('#message').textContent.startsWith('Too large')")
    assert "1000 images in one request" in page.text_content("#message")
    _fill(page, count=1)
    page.click("#generate")
    _wait_done(page, page.get_attribute("[data-model]", "data-model"))
    assert page.text_content("#message") == ""


def test_a_full_queue_is_one_sentence_with_the_retry_time(browser):
    with ThreadServer(max_batch=1, max_queue=1) as small, _page(browser, small.url) as page:
        body = {"labels": [0], "num_steps": 400, "stream": True}
        with httpx.stream("POST", f"{small.url}/v1/generate", json=body, timeout=30) as first, \
                httpx.stream("POST", f"{small.url}/v1/generate", json=body, timeout=30) as second:
            assert first.status_code == second.status_code == 200
            _fill(page, num_steps=4)
            page.click("#generate")
            message = _until(page, "document.querySelector('#message').textContent")
        assert re.fullmatch(r"The server is busy: the queue is full \(.*\); try again in \d+ s\.", message), message
        assert page.is_enabled("#generate") and page.text_content(".status") == "failed"


def test_side_by_side_fills_both_panes_with_each_gate(browser, tmp_path):
    """The demo bundle and a copy whose manifest records a distribution-gate result (the components are the same,
    so both panes must show the same pixels); started through the command line with two --bundle options."""
    copy = Path(shutil.copytree(DEMO, tmp_path / "copy"))
    gate = {"passed": True, "tv_mean": 0.0123, "tv_worst_step": 0.0456, "gate": {"tv_mean": 0.05, "tv_worst_step": 0.1}}
    edit(copy, lambda manifest: manifest["verification"].update(distribution=gate))
    with serve_process("--max-batch", "4", "--bundle", f"fp32={DEMO}", "--bundle", f"gated={copy}") as (_, url):
        context = browser.new_context(viewport={"width": 1000, "height": 800})
        page = context.new_page()
        page.goto(f"{url}/")
        _until(page, "document.querySelector('#model-b').value === 'gated'")
        assert page.is_visible("#model-field") and page.is_visible("#compare-field")
        _fill(page, seed=9, count=2, num_steps=8)
        page.click("#generate")
        for model in ("fp32", "gated"):
            _wait_done(page, model)
        finals = {model: [_png(src) for src in page.eval_on_selector_all(
            f'[data-model="{model}"] img[data-kind=final]', "imgs => imgs.map(i => i.src)")]
            for model in ("fp32", "gated")}
        assert len(finals["fp32"]) == len(finals["gated"]) == 2
        for a, b in zip(finals["fp32"], finals["gated"]):
            np.testing.assert_array_equal(a, b)
        assert "seeded generations equal" in page.text_content('[data-model="fp32"] .gate')
        assert page.text_content('[data-model="gated"] .gate') == \
            "fp32: distribution gate passed: tv_mean 0.0123 (gate 0.05), tv_worst_step 0.0456 (gate 0.1)"
        page.screenshot(path=str(tmp_path / "side_by_side.png"), full_page=True)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert re.search(r'^maskbit_images_total\{model="gated",outcome="done"\} 2\.0$', metrics, re.M), metrics
        context.close()
