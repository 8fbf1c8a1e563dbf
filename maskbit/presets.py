"""The preset registry: every released MaskBit model, the demo settings, and tiny presets for tests.

Released presets carry the values of the official YAMLs (MASKBIT_SPEC sections 1.12 and 5.6); a test checks
each one against `from_official_yaml` of its file. Tiny presets go through the same code path.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .config import ConfigError, GeneratorConfig, ModelConfig, SamplingConfig, TokenizerConfig, from_official_yaml

PRESETS: dict[str, ModelConfig] = {}


def register(config: ModelConfig) -> ModelConfig:
    if config.name in PRESETS:
        raise ConfigError(f"preset {config.name!r} is registered twice")
    PRESETS[config.name] = config
    return config


def _lfq_tokenizer(bits: int, **overrides) -> TokenizerConfig:
    return TokenizerConfig(quantizer_type="lookup-free", token_size=bits, **overrides)


_VQ_TOKENIZER = dict(quantizer_type="lookup", entropy_loss_weight=0.0)

for _bits in (10, 12, 14, 16, 18):
    register(ModelConfig(tokenizer=_lfq_tokenizer(_bits), name=f"maskbit_tokenizer_{_bits}bit"))
register(ModelConfig(tokenizer=TokenizerConfig(token_size=256, codebook_size=1024, **_VQ_TOKENIZER),
                     name="vqgan_plus_10bit"))
register(ModelConfig(tokenizer=TokenizerConfig(token_size=64, codebook_size=4096, **_VQ_TOKENIZER),
                     name="vqgan_plus_12bit"))
register(ModelConfig(tokenizer=TokenizerConfig(token_size=256, codebook_size=1024, quantizer_type="lookup",
                                               sample_with_conv=False, legacy_decoder=True),
                     name="maskgit_tokenizer"))

# bits -> (num_steps, guidance_scale, scale_pow, randomize_temperature), MASKBIT_SPEC 5.6
_GENERATOR_SAMPLING = {
    "maskbit_generator_10bit": (10, 64, 6.4, 2.5, 10.5),
    "maskbit_generator_12bit": (12, 64, 7.1, 3.0, 8.2),
    "maskbit_generator_14bit": (14, 64, 7.1, 3.0, 7.8),
    "maskbit_generator_14bit_128steps": (14, 128, 7.1, 3.0, 9.0),
    "maskbit_generator_14bit_256steps": (14, 256, 5.8, 3.0, 10.3),
    "maskbit_generator_16bit": (16, 64, 6.5, 2.5, 7.5),
    "maskbit_generator_18bit": (18, 64, 5.7, 2.5, 8.5),
}
for _name, (_bits, _steps, _scale, _pow, _rand) in _GENERATOR_SAMPLING.items():
    register(ModelConfig(
        tokenizer=_lfq_tokenizer(_bits),
        generator=GeneratorConfig(codebook_size=2 ** _bits),
        sampling=SamplingConfig(num_steps=_steps, guidance_scale=_scale, scale_pow=_pow, randomize_temperature=_rand),
        name=_name))

# configs/demo/demo.yaml: the 14-bit model; the demo samples with constant guidance (annealing "none").
register(ModelConfig(tokenizer=_lfq_tokenizer(14), generator=GeneratorConfig(codebook_size=2 ** 14),
                     sampling=SamplingConfig(guidance_annealing="none", scale_pow=1.0), name="demo"))

# ---- the demo model shipped with the package (trained by scripts/train_demo.sh on maskbit.demo_data) ------
# 64x64 crops of 8 photos; 16x16 tokens of 10 bits in 2 groups of 5 bits. The generator is trained without
# dropout: it has to learn the layout of each photo at every crop scale, and underfits long before it could overfit.
register(ModelConfig(
    tokenizer=_lfq_tokenizer(10, hidden_channels=32, channel_mult=(1, 2, 2), num_resolutions=3, num_res_blocks=1,
                             num_res_blocks_decoder=1, resolution=64),
    generator=GeneratorConfig(codebook_size=2 ** 10, codebook_splits=2, hidden_dim=192, depth=6, heads=6, mlp_dim=768,
                              dropout=0.0, num_classes=8, image_size=64, input_stride=4),
    # chosen on validation seed 100 by scripts/tune_demo_sampling.py (never on the evaluation seed 0)
    sampling=SamplingConfig(num_steps=64, guidance_scale=1.0, guidance_annealing="linear", scale_pow=1.0,
                            randomize_temperature=6.0),
    name="demo64"))

# ---- tiny presets for tests: 32x32 images, stride 4 (8x8 = 64 tokens), hidden 32 -------------------------
_TINY_TOKENIZER = dict(hidden_channels=32, channel_mult=(1, 1, 2), num_resolutions=3, resolution=32)
_TINY_GENERATOR = dict(hidden_dim=64, depth=2, heads=4, mlp_dim=128, image_size=32, input_stride=4)
_TINY_SAMPLING = SamplingConfig(num_steps=8, guidance_scale=2.0, scale_pow=1.0, randomize_temperature=2.0)


def _tiny(name: str, bits: int, splits: int, **generator) -> None:
    register(ModelConfig(
        tokenizer=_lfq_tokenizer(bits, **_TINY_TOKENIZER),
        generator=GeneratorConfig(codebook_size=2 ** bits, codebook_splits=splits, **{**_TINY_GENERATOR, **generator}),
        sampling=_TINY_SAMPLING, name=name))


_tiny("tiny_lfq10", 10, 2)                     # the shape of the shared official fixtures
_tiny("tiny_lfq6_g1", 6, 1)
_tiny("tiny_lfq9_g3", 9, 3)
_tiny("tiny_lfq8_prenorm", 8, 2, use_prenorm=True)
register(ModelConfig(tokenizer=TokenizerConfig(token_size=16, codebook_size=64, **_VQ_TOKENIZER, **_TINY_TOKENIZER),
                     name="tiny_vq"))
register(ModelConfig(tokenizer=TokenizerConfig(token_size=16, codebook_size=64, use_l2_normalisation=True,
                                               **_VQ_TOKENIZER, **_TINY_TOKENIZER), name="tiny_vq_l2"))
register(ModelConfig(tokenizer=TokenizerConfig(token_size=16, codebook_size=64, quantizer_type="lookup",
                                               sample_with_conv=False, legacy_decoder=True, **_TINY_TOKENIZER),
                     name="tiny_maskgit"))


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


def resolve_config(config: str | Path | ModelConfig | TokenizerConfig | GeneratorConfig) -> ModelConfig:
    """A ModelConfig from a preset name, an official YAML path or a config object."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, TokenizerConfig):
        return ModelConfig(tokenizer=config)
    if isinstance(config, GeneratorConfig):
        raise ConfigError("a GeneratorConfig alone is not enough; pass the ModelConfig with its tokenizer")
    text = str(config)
    if text in PRESETS:
        return PRESETS[text]
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return from_official_yaml(text)
    raise ConfigError(f"{text!r} is neither a preset name nor a YAML file; known presets: {', '.join(sorted(PRESETS))}")


def with_sampling(config: ModelConfig, **overrides) -> ModelConfig:
    """The same model with some sampling settings replaced."""
    return replace(config, sampling=replace(config.sampling or SamplingConfig(), **overrides))
