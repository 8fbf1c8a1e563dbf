"""maskbit_export: ONNX export of MaskBit components, verification against eager PyTorch, and bundles."""

from __future__ import annotations

from .bundle import PRECISIONS, ExportOptions, build_bundle
from .onnx_export import ExportError
from .verify import VerificationError

__all__ = ["PRECISIONS", "ExportError", "ExportOptions", "VerificationError", "build_bundle"]
