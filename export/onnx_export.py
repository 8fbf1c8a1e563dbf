"""ONNX export of one component with a dynamic batch axis (torch.export-based exporter), checked by onnx.checker.

The torch.export-based exporter (`dynamo=True`) is used: it produces graphs with native LayerNormalization,
no TorchScript leftovers, constant-folded shape logic, and it is the exporter PyTorch maintains.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from maskbit_runtime.specs import BATCH, ComponentSpec
from torch import nn
from maskbit_runtime.errors import MaskbitError

DEFAULT_OPSET = 18
EXTERNAL_DATA_BYTES = 1_500_000_000   # protobuf files stop at 2 GB; larger weights go to <file>.data


class ExportError(MaskbitError, RuntimeError):
    """A component that could not be exported or does not pass the ONNX checker."""


def require_onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (needed by the exporter)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the export extra: pip install 'maskbit[export]' "
                          f"({exc.name} missing)") from None
    return onnx


def _dynamic_shapes(spec: ComponentSpec, max_batch: int) -> tuple:
    """Positional dynamic shapes: the batch axis of every input that has one."""
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    return tuple(({i: batch for i in t.dynamic_axes} or None) for t in spec.inputs)


def export_onnx(module: nn.Module, spec: ComponentSpec, sample: dict[str, np.ndarray], path: Path,
                opset: int = DEFAULT_OPSET, max_batch: int = 64) -> Path:
    """Export `module` (whose forward takes the spec's inputs in order) to `path` and check the file.

    Weights are embedded in the file unless they exceed EXTERNAL_DATA_BYTES (then they go to `<path>.data`)."""
    onnx = require_onnx()
    args = tuple(torch.from_numpy(np.array(sample[t.name])).to(next(module.parameters(), torch.empty(0)).device)
                 for t in spec.inputs)     # on the module's device; np.array keeps 0-d scalars 0-d
    weight_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    log = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(path), input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs], dynamic_shapes=_dynamic_shapes(spec, max_batch),
                opset_version=opset, dynamo=True, optimize=True, verbose=False,
                external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    except Exception as exc:  # the exporter raises many types; report one line
        raise ExportError(f"exporting {spec.name} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    model = onnx.load(str(path), load_external_data=False)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    _check_io(model, spec)
    return path


def _check_io(model, spec: ComponentSpec) -> None:
    """The graph's inputs and outputs must carry the spec's names and a symbolic batch axis."""
    graph_inputs = [i.name for i in model.graph.input]
    graph_outputs = [o.name for o in model.graph.output]
    if graph_inputs != [t.name for t in spec.inputs] or graph_outputs != [t.name for t in spec.outputs]:
        raise ExportError(f"{spec.name}: graph I/O {graph_inputs} -> {graph_outputs} differs from its spec")
    for value, tensor in zip(list(model.graph.input) + list(model.graph.output), spec.inputs + spec.outputs):
        dims = value.type.tensor_type.shape.dim
        for axis in tensor.dynamic_axes:
            if dims[axis].dim_param == "" and tensor.shape[axis] == BATCH:
                raise ExportError(f"{spec.name}: {tensor.name} axis {axis} was frozen to {dims[axis].dim_value}")
