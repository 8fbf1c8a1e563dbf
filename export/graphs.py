"""The torch modules that become the bundle's ONNX graphs, and sample inputs for their specs.

Each wrapper's forward takes the inputs of its `maskbit_runtime.specs` component in order and returns its
outputs in order, so the spec alone drives export, verification and the runtime's buffers.
"""

from __future__ import annotations

import numpy as np
import torch
from maskbit_runtime.noise import StepNoise
from maskbit_runtime import specs
from maskbit_runtime.specs import ComponentSpec, Dims
from torch import nn

from maskbit.bits import combine_groups
from maskbit.generator import Generator
from maskbit.step import GenerationStep
from maskbit.tokenizer import Tokenizer, images_to_uint8

from .cast import CAST_PRECISIONS, CastGenerator

# the graphs that carry a bundle's precision (int8: quantized matmuls; fp16/bf16: cast, see cast.py) and share the
# generator's weights (a role on their specs); the tokenizer's convolutions stay float32
GENERATOR_COMPONENTS = specs.GENERATOR_PRECISION_COMPONENTS


class EncoderGraph(nn.Module):
    """images float32 [B,3,H,W] in [0,1] -> indices int64 [B,h,w]."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(images)


class DecoderGraph(nn.Module):
    """indices int64 [B,h,w] -> images uint8 [B,H,W,3] (clamp, x255, round inside the graph)."""

    def __init__(self, tokenizer: Tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return images_to_uint8(self.tokenizer.decode_tokens(indices))


class CombineGraph(nn.Module):
    """groups int64 [B,N,M] -> token indices int64 [B,h,w]."""

    def __init__(self, num_bits: int, latent_size: int):
        super().__init__()
        self.num_bits = num_bits
        self.latent_size = latent_size

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        return combine_groups(groups, self.num_bits).view(-1, self.latent_size, self.latent_size)


def dims_of(tokenizer: Tokenizer, generator: Generator | None) -> Dims:
    t = tokenizer.config
    if generator is None:
        return Dims(image_size=t.resolution, latent_size=t.latent_size, num_tokens=t.latent_size ** 2,
                    num_groups=1, group_classes=t.codebook_size)
    g = generator.config
    return Dims(image_size=t.resolution, latent_size=t.latent_size, num_tokens=g.num_tokens,
                num_groups=g.codebook_splits, group_classes=g.group_classes)


def graph_module(name: str, tokenizer: Tokenizer, generator: Generator | None, precision: str = "fp32") -> nn.Module:
    """The module exported as component `name`; at fp16/bf16 the generator graphs run a `CastGenerator`."""
    if name == specs.ENCODER.name:
        return EncoderGraph(tokenizer).eval()
    if name == specs.DECODER.name:
        return DecoderGraph(tokenizer).eval()
    if generator is None:
        raise ValueError(f"component {name!r} needs a generator")
    if precision in CAST_PRECISIONS and name in GENERATOR_COMPONENTS:
        generator = CastGenerator(generator, precision)
    if name == specs.STEP.name:
        return GenerationStep(generator).eval()
    if name == specs.STEP_UNGUIDED.name:
        return GenerationStep(generator, guidance=False).eval()
    if name == specs.TRANSFORMER.name:
        return generator.eval()
    if name == specs.COMBINE.name:
        return CombineGraph(generator.config.num_bits, tokenizer.config.latent_size).eval()
    raise ValueError(f"unknown component {name!r}")


def random_inputs(spec: ComponentSpec, dims: Dims, batch: int, seed: int, codebook_size: int,
                  num_classes: int = 1000) -> dict[str, np.ndarray]:
    """Random valid inputs of a component (a mix of masked and decided groups for the generator)."""
    rng = np.random.default_rng(seed)
    shape = lambda name: dims.resolve(spec.input(name).shape, batch)
    values = {
        specs.IMAGES: lambda: rng.random(shape(specs.IMAGES), dtype=np.float32),
        specs.INDICES: lambda: rng.integers(0, codebook_size, shape(specs.INDICES), dtype=np.int64),
        specs.TOKENS: lambda: np.where(rng.random(shape(specs.TOKENS)) < 0.5, dims.group_classes,
                                       rng.integers(0, dims.group_classes, shape(specs.TOKENS))).astype(np.int64),
        specs.GROUPS: lambda: rng.integers(0, dims.group_classes, shape(specs.GROUPS), dtype=np.int64),
        specs.LABELS: lambda: rng.integers(0, num_classes, shape(specs.LABELS), dtype=np.int64),
        specs.DROP_LABEL_MASK: lambda: rng.random(shape(specs.DROP_LABEL_MASK)) < 0.5,
        specs.NOISE: lambda: StepNoise(seed, batch, dims.num_tokens, dims.num_groups).draw(),
        # one setting per row, different between rows, as rows at different steps of different requests have
        specs.GUIDANCE_SCALE: lambda: rng.uniform(0.5, 4.0, shape(specs.GUIDANCE_SCALE)).astype(np.float32),
        specs.SOFTMAX_TEMPERATURE: lambda: rng.uniform(0.7, 1.3, shape(specs.SOFTMAX_TEMPERATURE)).astype(np.float32),
        specs.CONFIDENCE_NOISE_SCALE: lambda: rng.uniform(0.0, 5.0, shape(specs.CONFIDENCE_NOISE_SCALE)
                                                          ).astype(np.float32),
        specs.NUM_TO_MASK: lambda: rng.integers(1, dims.num_tokens * dims.num_groups // 2 + 1,
                                                shape(specs.NUM_TO_MASK), dtype=np.int64),
    }
    return {t.name: values[t.name]() for t in spec.inputs}
