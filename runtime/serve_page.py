"""The playground page at `/`: static HTML, CSS and plain JavaScript in `static/` (no build step, nothing from
another origin, works offline). The page reads /v1/models and streams /v1/generate; see static/page.js."""

from __future__ import annotations

import html
from pathlib import Path

from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

from .pipeline import Pipeline

STATIC = Path(__file__).parent / "static"
ASSETS = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}
# the page loads nothing from elsewhere; images are data: URLs (previews, results) and blob: URLs (the grid)
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
          "connect-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def page_html(pipeline: Pipeline) -> str:
    """The page, with the first model's classes in the picker (page.js refills it from /v1/models)."""
    names = pipeline.class_names or [str(i) for i in range(pipeline.num_classes)]
    options = "".join(f'<option value="{i}">{html.escape(str(n))}</option>' for i, n in enumerate(names))
    return (STATIC / "index.html").read_text(encoding="utf-8").replace("<!--CLASSES-->", options, 1)


def add_page_routes(app, pipeline: Pipeline) -> None:
    """GET / and GET /static/{page.css,page.js} (a fixed list: no path from the request reaches the disk)."""
    page = page_html(pipeline)
    assets = {name: (STATIC / name).read_bytes() for name in ASSETS}
    headers = {"Content-Security-Policy": POLICY, "Cache-Control": "no-cache"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers=headers)

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in assets:
            raise HTTPException(404, f"no file {name[:60]!r} here")
        return Response(assets[name], media_type=ASSETS[name], headers=headers)
