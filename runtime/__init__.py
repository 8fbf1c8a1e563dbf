"""maskbit_runtime: generation from exported MaskBit bundles with numpy and ONNX Runtime (never torch or onnx).

    from maskbit_runtime import Pipeline
    pipe = Pipeline.load("bundle/")
    out = pipe.generate(labels=[1, 7, 282], seed=0)     # out.images uint8 [B,H,W,3], out.tokens int64 [B,h,w]
"""

from __future__ import annotations

from .errors import InputError, MaskbitError
from .generation import GenerationOutput
from .manifest import BundleError, Manifest
from .pipeline import Pipeline
from .sampling import SamplingSettings

__all__ = ["BundleError", "GenerationOutput", "InputError", "Manifest", "MaskbitError", "Pipeline",
           "SamplingSettings"]
