"""Reduced-precision generator graphs (fp16, bf16): the types are in the graph, for strongly typed TensorRT engines.

A strongly typed TensorRT network computes in exactly the types its ONNX graph declares (TensorRT 10 with the
STRONGLY_TYPED flag, TensorRT 11 always), so the precision is decided here, at export. `CastGenerator` holds a copy
of the generator whose weights and activations are float16 or bfloat16, except:
- the LayerNorms, which compute in float32 (their eps of 1e-12 is 0 in float16, and the variance of a
  post-norm residual stream loses most in half precision), their results cast back;
- the logits, returned in float32, so that everything after them in the generation step (guidance
  cond + s * (cond - uncond), temperature, softmax, the inverse-CDF draw, the confidence ranking) runs in float32
  exactly as in the float32 step. The step graph takes and returns the same tensors at every precision.

ONNX Runtime's CPU provider runs float16 graphs but has no bfloat16 MatMul. `cpu_session` therefore runs a bfloat16
graph emulated (`emulate_in_float32`): every bfloat16 tensor becomes a float32 tensor rounded to bfloat16 after the
node that produces it (a Cast to bfloat16 and back), which is what GPU kernels do apart from their accumulation
order. So the CPU verifies the graph the GPU engine is built from, not a stand-in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from maskbit.generator import Generator

CAST_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Float32Norm(nn.Module):
    """A LayerNorm computed in float32 inside a reduced-precision model (input upcast, result cast back)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


class CastInput(nn.Module):
    """A linear layer that casts its (float32 +-1/0 bit) input to its weights' type first: exact."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(self.linear.weight.dtype))


class CastGenerator(nn.Module):
    """The generator in `precision` (fp16|bf16) with float32 LayerNorms and float32 logits; same call and config."""

    def __init__(self, generator: Generator, precision: str):
        super().__init__()
        if precision not in CAST_PRECISIONS:
            raise ValueError(f"no cast precision {precision!r}; expected one of {', '.join(CAST_PRECISIONS)}")
        self.precision = precision
        self.config = generator.config
        self.sampling_config = generator.sampling_config
        inner = copy.deepcopy(generator).eval()
        dtype = CAST_PRECISIONS[precision]
        for module in inner.modules():        # weights first: the float32 norms' own parameters stay float32
            if not isinstance(module, nn.LayerNorm):
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(dtype)
        for parent in list(inner.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.LayerNorm):
                    setattr(parent, name, Float32Norm(child))
        inner.input_proj = CastInput(inner.input_proj)
        self.inner = inner

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, drop_label_mask: torch.Tensor) -> torch.Tensor:
        return self.inner(tokens, labels, drop_label_mask).float()


def emulate_in_float32(model):
    """A copy of the ONNX `model` in which every bfloat16 value is a float32 value rounded to bfloat16 where it is
    produced; weights are converted exactly. The graph's inputs and outputs must not be bfloat16."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bf16 = TensorProto.BFLOAT16
    model = onnx.shape_inference.infer_shapes(copy.deepcopy(model))
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == bf16:
            raise ValueError(f"graph {'input' if value in graph.input else 'output'} {value.name} is bfloat16")
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.output)}
    for init in graph.initializer:
        if init.data_type == bf16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype("float32"), init.name))
    nodes = []
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == attribute.TENSOR and attribute.t.data_type == bf16:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype("float32"),
                                                             attribute.t.name))
            elif attribute.type == attribute.GRAPH:
                raise ValueError(f"node {node.name} ({node.op_type}) has a subgraph; emulation does not cover it")
        rounded = []
        for i, name in enumerate(node.output):
            if name and (types.get(name) == bf16 or (node.op_type == "Cast" and _cast_to(node) == bf16)):
                node.output[i] = f"{name}__float"
                rounded += [helper.make_node("Cast", [node.output[i]], [f"{name}__bf16"], to=bf16,
                                             name=f"{name}__to_bf16"),          # value names are unique
                            helper.make_node("Cast", [f"{name}__bf16"], [name], to=TensorProto.FLOAT,
                                             name=f"{name}__to_float")]
        nodes += [node, *rounded]
    del graph.node[:]
    graph.node.extend(nodes)
    for value in graph.value_info:
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.checker.check_model(model)
    return model


def _cast_to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def has_bfloat16(model) -> bool:
    from onnx import TensorProto
    return any(init.data_type == TensorProto.BFLOAT16 for init in model.graph.initializer) or any(
        _cast_to(node) == TensorProto.BFLOAT16 for node in model.graph.node if node.op_type == "Cast")


def cpu_session(ort, path: str | Path):
    """An ONNX Runtime CPU session of the graph at `path`; a bfloat16 graph runs emulated (see the module notes),
    with graph optimizations off so that no optimizer folds the rounding casts away."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if not has_bfloat16(model):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = onnx.load(str(path))                     # with its external weights
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(emulate_in_float32(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def downstream_of(nodes, seeds) -> list[int]:
    """Indices of the nodes, given as (input names, output names) in topological order, that read a value computed
    from any of `seeds`."""
    reached, found = set(seeds), []
    for index, (inputs, outputs) in enumerate(nodes):
        if reached.intersection(inputs):
            found.append(index)
            reached.update(outputs)
    return found


def graph_types(model, precision: str) -> dict:
    """Where a cast generator graph computes in what: its weight matrices' types, and every problem found: a weight
    MatMul not in `precision`, a LayerNormalization not in float32, a node downstream of the sampler's inputs
    (noise and the per-step scalars: guidance, temperature, draw, confidence, re-masking) or a graph output that
    is `precision`. Works for the step graphs and the transformer graph (which has no sampler)."""
    import onnx
    from maskbit_runtime.specs import STEP, TRANSFORMER
    from onnx import TensorProto

    reduced = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    weights = {init.name: init.data_type for init in graph.initializer}
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    types.update(weights)
    nodes = list(graph.node)
    matmuls = [weights[n.input[1]] for n in nodes if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    problems = [f"{n.name}: LayerNormalization in {TensorProto.DataType.Name(types.get(n.input[0], 0))}"
                for n in nodes if n.op_type == "LayerNormalization" and types.get(n.input[0]) != TensorProto.FLOAT]
    problems += [f"a weight MatMul in {TensorProto.DataType.Name(t)}" for t in matmuls if t != reduced]
    transformer_inputs = {t.name for t in TRANSFORMER.inputs}
    seeds = [t.name for t in STEP.inputs if t.name not in transformer_inputs]
    for index in downstream_of([(n.input, n.output) for n in nodes], seeds):
        if any(types.get(out) == reduced for out in nodes[index].output):
            problems.append(f"{nodes[index].name} ({nodes[index].op_type}) after the sampler's inputs is {precision}")
    problems += [f"graph output {o.name} is {precision}" for o in graph.output if types.get(o.name) == reduced]
    return {"weight_matmuls": {TensorProto.DataType.Name(t).lower(): matmuls.count(t) for t in sorted(set(matmuls))},
            "problems": problems}
