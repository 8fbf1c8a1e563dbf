"""Screenshot of the playground page for the README (docs/playground.png): starts `maskbit-run serve` on the demo
bundle (or two bundles side by side), generates in headless Chromium and saves the page.

    python scripts/playground_screenshot.py --out docs/playground.png
    python scripts/playground_screenshot.py --bundle fp32=B1 --bundle int8=B2 --out side_by_side.png

Needs Debian's chromium (apt-get install chromium) and playwright (pip install playwright; no `playwright install`).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start_server(bundles: list[str]) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-c", "from maskbit_runtime.cli import main; main()", "serve", "--port", "0"]
    for bundle in bundles:
        command += ["--bundle", bundle]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 120
    while not any("running on" in line for line in lines):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            sys.exit("the server did not start:\n" + "".join(lines))
        time.sleep(0.1)
    return process, re.search(r"running on (http://[\d.]+:\d+)", "".join(lines)).group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", default=[], help="as maskbit-run serve --bundle (repeatable)")
    parser.add_argument("--out", default="docs/playground.png")
    parser.add_argument("--width", type=int, default=900)
    parser.add_argument("--label", default="coffee")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    process, url = start_server(args.bundle)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": args.width, "height": 700})
            page.goto(f"{url}/")
            page.wait_for_selector("#advanced-fields [data-setting]", state="attached")
            page.select_option("#label", label=args.label)
            page.fill("#seed", str(args.seed))
            page.fill("#count", str(args.count))
            page.click("#generate")
            deadline = time.monotonic() + 120           # polled here: the page's CSP forbids wait_for_function's eval
            while page.evaluate("() => document.querySelectorAll('.pane .grid-link[hidden]').length"):
                if time.monotonic() > deadline:
                    sys.exit("no result within 120 s")
                time.sleep(0.05)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
