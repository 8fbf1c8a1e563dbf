"""maskbit_runtime: generation from exported MaskBit bundles with numpy and ONNX Runtime (never torch or onnx)."""
