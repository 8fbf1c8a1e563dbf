"""What the server sends back: a finished request in each response format, and HTTP statuses of the endings."""

from __future__ import annotations

import base64
import io
import json

import numpy as np

from .images import make_grid
from .serve import Request

STATUS = {"done": 200, "failed": 500, "cancelled": 499, "expired": 504, "shutdown": 503}


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def result_json(request: Request, format: str) -> dict:
    """format png: one base64 PNG per image; tokens: token indices [h][w] per image."""
    images = []
    for job in request.jobs:
        item = {"label": job.label, "index": job.index}
        if format == "tokens":
            item["tokens"] = job.tokens.tolist()
        else:
            item["png"] = png_base64(job.image)
        images.append(item)
    return {"seed": request.seed, "settings": request.settings.to_dict(), "images": images,
            "queued_seconds": round(request.queued_seconds, 4),
            "computing_seconds": round(request.computing_seconds, 4)}


def encode_result(request: Request, format: str, pipeline=None) -> tuple[bytes, str]:
    """(body, media type) of a finished request."""
    if format == "grid_png":
        images = request.images
        return png_bytes(images[0] if len(images) == 1 else make_grid(images)), "image/png"
    if format == "npz":
        buffer = io.BytesIO()
        np.savez(buffer, images=request.images, tokens=request.tokens, labels=np.array(request.labels, np.int64),
                 indices=np.array([job.index for job in request.jobs], np.int64))
        return buffer.getvalue(), "application/octet-stream"
    return json.dumps(result_json(request, format), separators=(",", ":")).encode(), "application/json"
