"""MaskBit in PyTorch: the VQGAN+ tokenizer, the bit-token generator, checkpoints and eager generation.

    tok = maskbit.load_tokenizer("tokenizer.bin", "maskbit_tokenizer_12bit")
    gen = maskbit.load_generator("generator.bin", "maskbit_generator_12bit.yaml")
    out = maskbit.generate(tok, gen, labels=[1, 7], seed=0)       # out.images uint8 (B,H,W,3)
"""

from __future__ import annotations

import os
from pathlib import Path

from maskbit_runtime.generation import GenerationOutput

from .checkpoints import (
    GENERATOR_RENAMES,
    CheckpointError,
    config_from_metadata,
    load_into,
    read_state_dict,
    rename_keys,
    save_checkpoint,
)
from .config import ConfigError, GeneratorConfig, ModelConfig, SamplingConfig, TokenizerConfig, from_official_yaml
from .generator import Generator
from .presets import PRESETS, get_preset, resolve_config, with_sampling
from .sampling import generate
from .step import GenerationStep
from .tokenizer import Tokenizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "GenerationOutput",
    "GenerationStep",
    "Generator",
    "GeneratorConfig",
    "ModelConfig",
    "SamplingConfig",
    "Tokenizer",
    "TokenizerConfig",
    "build_generator",
    "build_tokenizer",
    "from_official_yaml",
    "generate",
    "get_preset",
    "load_generator",
    "load_tokenizer",
    "resolve_config",
    "save_generator",
    "save_tokenizer",
    "with_sampling",
]

Checkpoint = str | os.PathLike
DEMO_DIR = Path(__file__).parent / "demo"      # the demo model's weights (scripts/train_demo.sh)


def _config_for(state_meta: dict, config, source: str, kind: str) -> ModelConfig:
    stored_kind = state_meta.get("kind")
    if stored_kind and stored_kind != kind:
        raise CheckpointError(f"{source} is a {stored_kind} checkpoint, not a {kind}; use load_{stored_kind}")
    if config is not None:
        return resolve_config(config)
    stored = config_from_metadata(state_meta, source)
    if stored is None:
        raise ConfigError(f"{source} carries no config; pass one (a preset name or the official YAML)")
    return stored


def build_tokenizer(config) -> Tokenizer:
    """A randomly initialised tokenizer for a preset name, YAML path or config (eval mode)."""
    return Tokenizer(resolve_config(config).tokenizer).eval()


def build_generator(config) -> Generator:
    """A randomly initialised generator, carrying the config's sampling defaults (eval mode)."""
    cfg = resolve_config(config)
    if cfg.generator is None:
        raise ConfigError(f"config {cfg.name!r} describes no generator (model.mlm_model is missing)")
    model = Generator(cfg.generator)
    model.sampling_config = cfg.sampling or SamplingConfig()
    return model.eval()


def load_tokenizer(checkpoint: Checkpoint, config=None) -> Tokenizer:
    """Load a tokenizer from an official .bin, our .safetensors or an hf:// reference (eval mode)."""
    state, meta = read_state_dict(checkpoint)
    source = Path(str(checkpoint)).name
    cfg = _config_for(meta, config, source, "tokenizer")
    if "class_emb.weight" in state:
        raise CheckpointError(f"{source} is a generator checkpoint, not a tokenizer; use load_generator")
    model = Tokenizer(cfg.tokenizer)
    load_into(model, state, source, cfg.name or "given config")
    return model.eval()


def load_generator(checkpoint: Checkpoint, config=None) -> Generator:
    """Load a generator (official token_emb keys renamed to input_proj); sampling defaults from the config."""
    state, meta = read_state_dict(checkpoint)
    source = Path(str(checkpoint)).name
    cfg = _config_for(meta, config, source, "generator")
    if "encoder.conv_in.weight" in state:
        raise CheckpointError(f"{source} is a tokenizer checkpoint, not a generator; use load_tokenizer")
    model = build_generator(cfg)
    load_into(model, rename_keys(state, GENERATOR_RENAMES), source, cfg.name or "given config")
    return model.eval()


def save_tokenizer(model: Tokenizer, path: Checkpoint, config: ModelConfig | None = None) -> Path:
    return save_checkpoint(model, path, config or ModelConfig(tokenizer=model.config), "tokenizer")


def save_generator(model: Generator, path: Checkpoint, config: ModelConfig) -> Path:
    """Save a generator; `config` must include its tokenizer (the generator's input is defined by it)."""
    return save_checkpoint(model, path, config, "generator")
