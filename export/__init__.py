"""maskbit_export: ONNX export of MaskBit components, verification against eager PyTorch, and bundles."""

from __future__ import annotations

from .bundle import PRECISIONS, build_bundle
from .onnx_export import ExportError
from .verify import VerificationError

__all__ = ["PRECISIONS", "ExportError", "VerificationError", "build_bundle"]
