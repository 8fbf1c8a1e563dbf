"""One weights file for the generator graphs: the step, the unguided step and the transformer share it.

Each graph is exported on its own with its weights embedded; `share_weights` then moves every large
initializer into one external-data file, storing each distinct tensor once (matched by dtype, shape and
bytes), and points the graphs at offsets in it. So a bundle holds the generator's weights once however many
graphs use them, and ONNX Runtime and TensorRT read them through the standard external-data mechanism.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .onnx_export import require_onnx

MIN_SHARED_BYTES = 1024          # smaller constants stay inside their graph
ALIGNMENT = 4096                 # page-aligned offsets, so runtimes may map the file


def share_weights(paths: list[Path], weights_name: str) -> Path:
    """Rewrite the ONNX files at `paths` (same directory) to read their large initializers from one shared file."""
    onnx = require_onnx()
    from onnx.external_data_helper import set_external_data

    root = paths[0].parent
    target = root / weights_name
    offsets: dict[str, tuple[int, int]] = {}
    with open(target, "wb") as out:
        for path in paths:
            model = onnx.load(str(path))                # with any external data of its own
            for tensor in _initializers(model.graph):
                raw = tensor.raw_data
                if len(raw) < MIN_SHARED_BYTES:
                    continue
                key = hashlib.sha256(bytes(str((tensor.data_type, tuple(tensor.dims))), "utf8") + raw).hexdigest()
                if key not in offsets:
                    out.seek(-out.tell() % ALIGNMENT, os.SEEK_CUR)
                    offsets[key] = (out.tell(), len(raw))
                    out.write(raw)
                offset, length = offsets[key]
                set_external_data(tensor, location=weights_name, offset=offset, length=length)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
            own_data = path.with_name(path.name + ".data")
            onnx.save(model, str(path))
            own_data.unlink(missing_ok=True)
    for path in paths:
        onnx.checker.check_model(str(path))            # resolves the external data relative to the file
    return target


def _initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH:
                yield from _initializers(attribute.g)
