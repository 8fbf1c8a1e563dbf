"""GPU tier: the real cudart under the TensorRT backend's buffers, rows, page-locked memory and CUDA graphs; an
AOTInductor generation on CUDA through the slot scheduler; and eager PyTorch on CUDA against the CPU.

The `gpu` tests skip with a reason on a machine without a CUDA GPU (scripts/gpu_suite.sh runs them where there is
one). The CPU tier here catches what would break them first: ONNX sample inputs left on the CPU for a module on
another device, and a stream address read with the int() that cuda-bindings 13 deprecates.
"""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from maskbit_runtime.specs import COMPONENTS
from torch import nn

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
    """What the TensorRT backend does under the scheduler, without TensorRT: masked rows copied on the device into
    a range of the state (admission), asynchronous uploads from page-locked memory into buffers at fixed
    addresses, and a graph per row range that reads those addresses, replayed with nothing copied first."""
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (pip install 'maskbit[gpu]')")
    from maskbit_runtime.backends import cuda
    stream = cuda.Stream(0)
    state, masked, out = (cuda.Device((4, 5), "int64", stream) for _ in range(3))
    host, back = cuda.Pinned((4, 5), "int64", stream), cuda.Pinned((4, 5), "int64", stream)
    host.array[...] = -1
    host.upload(masked)
    admitted = state.rows(1, 2)
    stream.copy_device_to_device(admitted.ptr, masked.rows(0, 2).ptr, admitted.nbytes)
    back.download(state)
    back.wait()
    np.testing.assert_array_equal(back.array[1:3], -1)
    graphs = cuda.GraphCache(stream)
    for i in range(3):
        for rows in (1, 2):
            host.wait()                                   # the last upload out of `host` has finished
            host.array[...] = np.arange(20).reshape(4, 5) + 100 * i
            host.upload(state)                            # new values at the address the graphs read
            source, target = state.rows(1, rows), out.rows(0, rows)
            graphs.run(rows, lambda: stream.copy_device_to_device(target.ptr, source.ptr, source.nbytes))
            back.download(out)
            back.wait()
            np.testing.assert_array_equal(back.array[:rows], host.array[1:1 + rows])
    assert graphs.off is None and sorted(graphs.graphs) == [1, 2]
    graphs.clear()
    for buffer in (state, masked, out, host, back):
        buffer.free()
    stream.close()


class RecordsInputDevices(nn.Module):
    """A stand-in component on `device` that records its inputs' devices and fails, as CUDA would, on a mismatch."""

    def __init__(self, device: str):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, device=device))
        self.seen = []

    def forward(self, *inputs):
        self.seen = [t.device for t in inputs]
        if any(d != self.weight.device for d in self.seen):
            raise RuntimeError(f"Expected all tensors to be on the same device, found {self.seen}")
        return tuple(self.weight + t.float() for t in inputs)


class StopExport(Exception):
    pass


def test_onnx_sample_inputs_follow_the_module_to_its_device(monkeypatch, tmp_path):
    """benchmarks/gpu_throughput.py exports modules already on CUDA: the sample inputs must be on their device
    (here the meta device, which has no memory and runs anywhere)."""
    from maskbit_export import onnx_export

    def export(module, args, path, **kwargs):
        module(*args)
        raise StopExport("the module ran")
    monkeypatch.setattr(torch.onnx, "export", export)
    module, spec = RecordsInputDevices("meta"), COMPONENTS["decoder"]
    sample = {t.name: np.zeros([2 if isinstance(d, str) else d for d in t.shape], t.dtype) for t in spec.inputs}
    with pytest.raises(onnx_export.ExportError, match="StopExport: the module ran"):
        onnx_export.export_onnx(module, spec, sample, tmp_path / "decoder.onnx")
    assert module.seen == [torch.device("meta")] * len(spec.inputs)


def test_stream_addresses_are_read_without_the_deprecated_int():
    bindings = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from maskbit_runtime.backends.cuda import native_handle
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native_handle(bindings.cudaStream_t(4096)) == 4096 and native_handle(7) == 7


@pytest.fixture(scope="module")
def aoti_cuda(tmp_path_factory):
    """The tiny bundle with AOTInductor packages compiled for cuda (once per session), and its models on the GPU."""
    from aoti_cuda import cuda_bundle, cuda_models
    return (cuda_bundle(tmp_path_factory)[0], *cuda_models())


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING is not None, reason=str(GPU_MISSING))
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_aoti_cuda_generation_makes_the_schedulers_copies_and_counts_every_host_wait(aoti_cuda, cuda_graphs):
    """The scheduler's copies per generation (host_cudart.scheduled_copies; a new lane also uploads its masked
    tokens); host waits: the download's, plus one per package on its first call (the runtime folds constants and
    waits), plus any staging upload still in flight and, threaded (no graphs), up to one per repeated step call."""
    from host_cudart import scheduled_copies
    from maskbit_runtime import Pipeline
    root, tok, gen = aoti_cuda
    labels = [1, 7, 3]
    eager = maskbit.generate(tok, gen, labels=labels, num_steps=6, guidance_scale=3.0, seed=11)
    with Pipeline.load(root, backend="aoti", trust_native_code=True, cuda_graphs=cuda_graphs) as pipe:
        packages, loaded = pipe.backend.primitives._packages, 0
        for generation, steps in enumerate((6, 6, 9)):
            out = pipe.generate(labels=labels, num_steps=steps, guidance_scale=3.0, seed=11)
            moved = pipe.last_transfers
            first_calls, loaded = len(packages) - loaded, len(packages)
            copies = scheduled_copies(len(labels), steps, pipe.manifest.max_batch("step"), new_lane=generation == 0)
            assert dataclasses.replace(moved, host_syncs=0) == copies, (steps, moved)
            runtime_waits = moved.host_syncs - 1 - first_calls
            assert (runtime_waits == 0) if cuda_graphs else (0 <= runtime_waits <= steps - 1), (steps, moved)
            if steps == 6:
                np.testing.assert_array_equal(out.tokens, eager.tokens)
        (lane,) = pipe.backend.lanes.values()
        assert sorted(lane.bindings) == [(len(labels), 0), (len(labels), 1)]
        assert len(pipe.backend.primitives._graphs) == (len(lane.bindings) if cuda_graphs else 0)   # one per binding
        assert pipe.info()["runtime"]["run_single_threaded"] == cuda_graphs


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
