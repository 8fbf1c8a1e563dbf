"""Reduced-precision generator graphs: int8 dynamic quantization of the weight matmuls (ONNX Runtime).

`int8`: every MatMul with a constant weight becomes an int8 matmul (weights quantized per output channel,
activations per tensor at run time; ONNX Runtime fuses the pair into DynamicQuantizeMatMul, which runs on
VNNI on AVX-512 CPUs). The sensitive layers stay float32: the input projection (K=14 inputs, nothing to gain),
the last hidden layer and the prediction layer, whose errors land directly on the logits. Attention
score matmuls have no constant weight and stay float32, and so does the sampler (softmax, the draw, the
confidence ranking): it contains no weight matmul.

Weights use 7 of the 8 bits (`reduce_range`): without AVX-512 VNNI, ONNX Runtime multiplies u8 x s8 with
VPMADDUBSW, whose int16 pair sums saturate with full-range weights (measured on Zen 3 at the 14-bit size: mean
total variation of the sampling distributions from float32 0.064 with full range, 0.026 with 7-bit weights, and
7-bit weights were also faster there). On VNNI CPUs the 7-bit grid costs a little precision and nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path

from maskbit_runtime.files import atomic_output

# graph order of the constant-weight matmuls: input_proj, 4 per layer, last_layer, prediction_layer
KEEP_FIRST, KEEP_LAST = 1, 2


def weight_matmuls(model) -> list[str]:
    """Names of the MatMul nodes whose second input is an initializer, in graph order."""
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def dynamic_int8_options() -> dict:
    """onnxruntime's quantize_dynamic arguments of every int8 graph here (bundles, and the benchmark's GEMMs that
    measure the machine's int8 ceiling)."""
    from onnxruntime.quantization import QuantType
    return {"per_channel": True, "reduce_range": True, "weight_type": QuantType.QInt8,
            "op_types_to_quantize": ["MatMul"]}


def quantize_int8(path: Path) -> dict:
    """Quantize the ONNX file at `path` in place; returns what was quantized and what was kept float32."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    names = weight_matmuls(onnx.load(str(path), load_external_data=False))
    keep = names[:KEEP_FIRST] + names[-KEEP_LAST:]
    quant_logger = logging.getLogger()          # the quantizer logs every node at INFO on the root logger
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)
    try:
        with atomic_output(path) as tmp:
            quantize_dynamic(str(path), str(tmp), nodes_to_exclude=keep, **dynamic_int8_options())
    finally:
        quant_logger.setLevel(level)
    return {"method": "onnxruntime dynamic int8 (per-channel 7-bit weights)",
            "quantized_matmuls": len(names) - len(keep), "float32_matmuls": len(keep)}
