"""HTTP for the serving engine (FastAPI on uvicorn, extra `[serve]`): `create_app(pipeline)` and `serve(...)`.

POST /v1/generate (JSON; `stream: true` answers Server-Sent Events), GET /v1/models, /healthz, /readyz, /metrics,
/openapi.json and /docs (FastAPI's), / (the playground page, serve_page.py). `create_app({name: pipeline, ...})`
serves several bundles side by side (serve_models.py): a request picks one with `model`. Errors are JSON
`{"error": "<one line>"}`: 422 for a bad request (the field named), 413 for too many images or too large a body, 503
with Retry-After when the queue is full or the server drains, 504 when the request's deadline passed, 500 when the
backend failed its images.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import typing
from collections.abc import Mapping
from typing import Literal

from .errors import InputError, MissingDependencyError
from .pipeline import Pipeline
from .sampling import HELP, SamplingSettings
from .serve import MAX_PREVIEWS, Engine, Overloaded, Request, TooLarge
from .serve_encode import STATUS, encode_result, png_base64, result_json
from .serve_models import LabelledRegistries, Model, model_card, named_pipelines

try:
    import uvicorn
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, create_model
except ImportError as exc:
    raise MissingDependencyError(f"maskbit-run serve needs {exc.name}: pip install 'maskbit[serve]'") from None

from .serve_metrics import Metrics  # noqa: E402  (after the guarded imports: it needs prometheus_client too)
from .serve_page import add_page_routes  # noqa: E402

MAX_BODY = 1 << 20               # bytes of JSON per request
MAX_ERROR = 300                  # characters of an error line


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)    # strict: true is no 1, "8" no 8

    labels: list[int | str] = Field(min_length=1, description="One image per label: class indices or names")
    seed: int = Field(0, description="Noise seed; image j uses the stream (seed, first_index + j)")
    first_index: int = Field(0, description="Index of the first image's noise stream")
    format: Literal["png", "grid_png", "npz", "tokens"] = Field(
        "png", description="png: JSON with base64 PNGs; grid_png: one PNG (the image itself when there is one); "
                           "npz: images, tokens, labels, indices; tokens: JSON token indices")
    stream: bool = Field(False, description="Answer with Server-Sent Events: progress every step, previews, result")
    preview_every: int = Field(0, description=f"Streamed preview every k steps (0: none; at most {MAX_PREVIEWS} "
                                              "per image)")
    timeout: float | None = Field(None, description="Deadline in seconds (at most the server's)")
    model: str | None = Field(None, description="Which bundle (an `id` of /v1/models); default: the first")


_TYPES = typing.get_type_hints(SamplingSettings)
GenerateRequest = create_model(   # every sampling setting, unset = the bundle's default (one definition: sampling.py)
    "GenerateRequest", __base__=_Request,
    **{name: (_TYPES[name] | None, Field(None, description=HELP[name])) for name in SamplingSettings.fields()})


def _error(status: int, text: str, headers: dict | None = None) -> JSONResponse:
    text = " ".join(str(text).split())
    if len(text) > MAX_ERROR:                    # a message that quotes the request (a 100 kB class name) stays short
        text = text[:MAX_ERROR - 3] + "..."
    return JSONResponse({"error": text}, status_code=status, headers=headers)


def _field_error(error: dict) -> str:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return f"malformed JSON: {error.get('ctx', {}).get('error', error.get('msg'))}"
    return f"{'.'.join(loc) or 'body'}: {error.get('msg')}"


class _BodyLimit:
    """Refuse bodies over MAX_BODY bytes (413): by their Content-Length before reading them, and a chunked body by
    what arrives (read up to the limit, then replayed to the app)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length")
        too_large = _error(413, f"request body over {MAX_BODY} bytes")
        if length is not None:
            if not length.isdigit() or int(length) > MAX_BODY:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        buffered, size = [], 0
        while True:
            message = await receive()
            buffered.append(message)
            size += len(message.get("body", b""))
            if size > MAX_BODY:
                return await too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return buffered.pop(0) if buffered else await receive()
        await self.app(scope, replay, send)


def create_app(pipelines: Pipeline | Mapping[str, Pipeline], backend: str = "ort", **engine_options) -> FastAPI:
    """The app over one pipeline, or over several side by side ({name: Pipeline}: one engine each, requests pick
    one by `model`, the first by default). Engines warm up and start with the app (lifespan) and stop with it."""
    models = {}
    for name, pipeline in named_pipelines(pipelines).items():
        metrics = Metrics()
        engine = Engine(pipeline, observer=metrics, **engine_options)
        metrics.bind(engine)
        models[name] = Model(name, pipeline, engine, metrics)
    default = next(iter(models.values()))
    registry = default.metrics.registry if len(models) == 1 else \
        LabelledRegistries({name: model.metrics.registry for name, model in models.items()})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for model in models.values():
            await asyncio.to_thread(model.engine.start)
        yield
        for model in models.values():
            await asyncio.to_thread(model.engine.stop)

    app = FastAPI(title="MaskBit", version="1", lifespan=lifespan,
                  description="Class-conditional image generation with step-level batching across requests.")
    app.state.engine, app.state.metrics, app.state.models = default.engine, default.metrics, models
    app.add_middleware(_BodyLimit)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        default.metrics.rejected("invalid")
        return _error(422, _field_error(exc.errors()[0]) if exc.errors() else "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if exc.status_code == 400:               # FastAPI's "error parsing the body": bad UTF-8, deep nesting, ...
            default.metrics.rejected("invalid")
            return _error(422, "malformed JSON: the body could not be parsed")
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.post("/v1/generate", summary="Generate one image per label", responses={
        200: {"content": {"application/json": {}, "image/png": {}, "application/octet-stream": {},
                          "text/event-stream": {}}},
        413: {"description": "too many images"}, 422: {"description": "a bad field"},
        503: {"description": "queue full or draining (Retry-After)"}, 504: {"description": "deadline passed"}})
    async def generate(body: GenerateRequest, http: HTTPRequest):
        model = models.get(body.model or default.name)
        if model is None:
            default.metrics.rejected("invalid")
            return _error(422, f"model: no model {body.model!r} here; this server has {', '.join(models)}")
        if body.stream and body.format not in ("png", "tokens"):
            model.metrics.rejected("invalid")
            return _error(422, f"format: {body.format} cannot be streamed; use png or tokens")
        return await _generate(model, body, http)

    @app.get("/v1/models", summary="The bundles served: classes, sampling defaults, precision, backend, "
                                   "distribution gate, limits")
    async def list_models():
        return {"object": "list", "data": [model_card(model, backend) for model in models.values()]}

    @app.get("/healthz", summary="The process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Every bundle loaded, warmed up and admitting requests")
    async def readyz():
        engines = [model.engine for model in models.values()]
        if any(engine.draining for engine in engines) or not all(engine.ready for engine in engines):
            draining = any(engine.draining for engine in engines)
            return _error(503, "draining" if draining else "warming up", {"Retry-After": "1"})
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics (with a `model` label when serving several bundles)")
    async def prometheus():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    add_page_routes(app, default.pipeline)
    return app


async def _generate(model: Model, body, http: HTTPRequest) -> Response:
    engine, pipeline, metrics = model.engine, model.pipeline, model.metrics
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    post = lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (kind, data))
    sampling = {name: getattr(body, name) for name in SamplingSettings.fields()}
    try:
        labels = _labels(pipeline, body.labels)
        request = engine.request(labels, body.seed, body.first_index, body.preview_every if body.stream else 0,
                                 body.timeout, post, **sampling)
        engine.submit(request)
    except TooLarge as exc:
        metrics.rejected("too_large")
        return _error(413, str(exc))
    except Overloaded as exc:
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after)})
    except InputError as exc:
        metrics.rejected("invalid")
        return _error(422, str(exc))
    if body.stream:
        return StreamingResponse(_events(engine, request, events, body.format), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    ended = asyncio.ensure_future(_until_end(events))
    gone = asyncio.ensure_future(_disconnect(http))
    await asyncio.wait({ended, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not ended.done():                     # the client left: free its slots at the next step
        engine.cancel(request)
        ended.cancel()
        return Response(status_code=499)
    gone.cancel()
    if request.status != "done":
        return _error(STATUS[request.status], request.error or request.status)
    content, media = await asyncio.to_thread(encode_result, request, body.format, pipeline)
    return Response(content, media_type=media, headers=_timing(request))


def _labels(pipeline: Pipeline, items: list[int | str]) -> list[int]:
    from .labels import parse_labels
    try:
        return parse_labels(items, pipeline.num_classes, pipeline.class_names)
    except InputError as exc:
        raise InputError(f"labels: {exc}") from None


def _timing(request: Request) -> dict[str, str]:
    return {"X-Queued-Seconds": f"{request.queued_seconds:.4f}",
            "X-Computing-Seconds": f"{request.computing_seconds:.4f}"}


async def _until_end(events: asyncio.Queue) -> None:
    while (await events.get())[0] != "end":
        pass


async def _disconnect(http: HTTPRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _sse(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _events(engine: Engine, request: Request, events: asyncio.Queue, format: str):
    """progress (every step), preview (every k steps), then result or error; a client that leaves cancels."""
    try:
        while True:
            kind, data = await events.get()
            if kind == "progress":
                yield _sse("progress", data)
            elif kind == "preview":
                png = await asyncio.to_thread(png_base64, data["pixels"])
                yield _sse("preview", {"image": data["image"], "step": data["step"], "png": png})
            elif kind == "end":
                if request.status == "done":
                    yield _sse("result", await asyncio.to_thread(result_json, request, format))
                else:
                    yield _sse("error", {"status": STATUS[request.status], "error": request.error})
                return
    finally:
        engine.cancel(request)                   # no-op when it ended


def serve(pipelines: Pipeline | Mapping[str, Pipeline], host: str = "127.0.0.1", port: int = 8000,
          backend: str = "ort", grace: float = 30.0, log_level: str = "info", **engine_options) -> None:
    """Serve until SIGTERM/SIGINT: admission stops at once (new requests 503, the listener closes), requests in
    flight get `grace` seconds to finish, the rest end with 503."""
    app = create_app(pipelines, backend, **engine_options)
    engines = [model.engine for model in app.state.models.values()]

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            for engine in engines:
                engine.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace,
                            access_log=log_level == "debug")
    Server(config).run()
