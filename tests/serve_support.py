"""A real `maskbit-run serve` app on uvicorn in a thread (127.0.0.1, an ephemeral port), shared by the server tests."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn

from maskbit_runtime import Pipeline
from maskbit_runtime.serve_app import create_app

from conftest import ROOT

DEMO = ROOT / "runtime" / "demo" / "bundle"


class ThreadServer:
    """`with ThreadServer(**app_options) as s:` serves the demo bundle at `s.url` until the block ends;
    `ThreadServer(bundles={"a": path, "b": path})` serves several side by side (`s.pipes`, `s.pipe` the first)."""

    def __init__(self, log_level: str = "warning", bundles: dict[str, Path] | None = None, **options):
        self.pipes = {name: Pipeline.load(path) for name, path in (bundles or {}).items()}
        self.pipe = next(iter(self.pipes.values())) if self.pipes else Pipeline.load(DEMO)
        self.app = create_app(self.pipes or self.pipe, **options)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        for pipe in self.pipes.values() or [self.pipe]:
            pipe.close()


@contextlib.contextmanager
def serve_process(*options: str, timeout: float = 60.0):
    """`maskbit-run serve --port 0 *options` in a subprocess; yields (process, url) once it listens on 127.0.0.1;
    killed at the end if it is still running."""
    process = subprocess.Popen([sys.executable, "-c", "from maskbit_runtime.cli import main; main()", "serve",
                                "--port", "0", *options], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not any("running on" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            time.sleep(0.05)
        yield process, re.search(r"running on (http://127\.0\.0\.1:\d+)", "".join(lines)).group(1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
