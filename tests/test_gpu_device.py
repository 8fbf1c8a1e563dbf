"""GPU tier: the real cudart under the TensorRT backend's buffers, and eager PyTorch on CUDA against the CPU.

Both skip with a reason on a machine without a CUDA GPU (scripts/gpu_suite.sh runs them where there is one).
"""

import numpy as np
import pytest
import torch

import maskbit

GPU_MISSING = None if torch.cuda.is_available() else "PyTorch sees no CUDA GPU"


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING is not None, reason=str(GPU_MISSING))
def test_cuda_python_buffers_round_trip_on_the_real_cudart():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (pip install 'maskbit[gpu]')")
    from maskbit_runtime.backends import cuda
    stream = cuda.Stream(0)
    noise = cuda.Device((3, 5, 2), "float32", stream)
    scalar = cuda.Device((), "int64", stream)
    values = np.random.default_rng(0).random((3, 5, 2), dtype=np.float32)
    noise.upload(values)
    scalar.upload(np.array(7))
    stream.synchronize()
    np.testing.assert_array_equal(noise.download(), values)
    assert scalar.download() == 7
    for buffer in (noise, scalar):
        buffer.free()
    stream.close()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING is not None, reason=str(GPU_MISSING))
def test_eager_generation_on_cuda_equals_the_cpu_with_tf32_off():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    tok, gen = maskbit.build_tokenizer("tiny_lfq10"), maskbit.build_generator("tiny_lfq10")
    with torch.no_grad():
        gen.prediction_layer.weight.mul_(20.0)              # sharper logits, as in the bundle tests
    labels = [1, 7, 282]
    cpu = maskbit.generate(tok, gen, labels=labels, num_steps=6, seed=3)
    gpu = maskbit.generate(tok.cuda(), gen.cuda(), labels=labels, num_steps=6, seed=3)
    np.testing.assert_array_equal(gpu.tokens, cpu.tokens)
    assert np.abs(gpu.images.astype(int) - cpu.images.astype(int)).max() <= 1
