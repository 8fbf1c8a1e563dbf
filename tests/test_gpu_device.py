"""GPU tier: the real cudart under the TensorRT backend's buffers, rows, page-locked memory and CUDA graphs; a staged
AOTInductor generation on CUDA; and eager PyTorch on CUDA against the CPU.

All skip with a reason on a machine without a CUDA GPU (scripts/gpu_suite.sh runs them where there is one).
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
def test_rows_pinned_copies_and_graphs_on_the_real_cudart():
    """What the TensorRT backend does per generation, without TensorRT: one asynchronous upload of a stacked buffer
    from page-locked memory, rows copied on the device into a fixed buffer, a captured graph replayed."""
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (pip install 'maskbit[gpu]')")
    from maskbit_runtime.backends import cuda
    stream = cuda.Stream(0)
    stack = cuda.Device((4, 64), "float32", stream)
    fixed, out = cuda.Device((2, 5), "float32", stream), cuda.Device((2, 5), "float32", stream)
    host, back = cuda.Pinned(stack.shape, "float32", stream), cuda.Pinned((2, 5), "float32", stream)
    host.array[...] = np.arange(4 * 64, dtype=np.float32).reshape(4, 64)
    host.upload(stack)
    graphs = cuda.GraphCache(stream)
    for i in range(4):
        fixed.copy_from(stack.row(i, (2, 5)))
        graphs.run("parity", lambda: out.copy_from(fixed))       # captured at i == 0, replayed afterwards
        back.download(out)
        back.wait()
        np.testing.assert_array_equal(back.array, np.arange(64 * i, 64 * i + 10).reshape(2, 5))
    assert graphs.off is None and len(graphs.graphs) == 1
    graphs.clear()
    for buffer in (stack, fixed, out, host, back):
        buffer.free()
    stream.close()


@pytest.fixture(scope="module")
def aoti_cuda(tmp_path_factory):
    """A tiny bundle with AOTInductor packages compiled for cuda, and its models on the GPU."""
    from maskbit_export.aoti import build_aoti
    from maskbit_export.bundle import ExportOptions, build_bundle
    torch.manual_seed(0)
    tok, gen = maskbit.build_tokenizer("tiny_lfq10"), maskbit.build_generator("tiny_lfq10")
    root = tmp_path_factory.mktemp("aoti_cuda") / "b"
    build_bundle(root, tok, gen, options=ExportOptions(max_batch=4, verify=False))
    build_aoti(root, tok, gen, device="cuda")
    return root, tok.cuda(), gen.cuda()


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING is not None, reason=str(GPU_MISSING))
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_aoti_cuda_generation_uploads_once_and_syncs_once(aoti_cuda, cuda_graphs):
    from maskbit_runtime import Pipeline
    from maskbit_runtime.backends.base import Transfers
    root, tok, gen = aoti_cuda
    eager = maskbit.generate(tok, gen, labels=[1, 7, 3], num_steps=6, guidance_scale=3.0, seed=11)
    with Pipeline.load(root, backend="aoti", cuda_graphs=cuda_graphs) as pipe:
        for steps in (6, 6, 9):
            out = pipe.generate(labels=[1, 7, 3], num_steps=steps, guidance_scale=3.0, seed=11)
            assert pipe.last_transfers == Transfers(7, 2, 5 * steps if cuda_graphs else 0, 1), steps
            if steps == 6:
                np.testing.assert_array_equal(out.tokens, eager.tokens)


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
