"""Official YAML layouts parse, agree with the preset registry, and bad configs fail clearly."""

from dataclasses import replace
from pathlib import Path

import pytest

from maskbit import PRESETS, ConfigError, from_official_yaml, get_preset, resolve_config
from maskbit.config import GeneratorConfig, TokenizerConfig

CONFIGS = Path(__file__).parent / "data" / "official_configs"
YAMLS = sorted(p for p in CONFIGS.rglob("*.yaml") if "taming" not in p.name and p.parent.name != "demo")


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_official_yaml_equals_its_preset(path):
    parsed = from_official_yaml(path)
    preset = get_preset(path.stem)
    assert parsed.tokenizer == preset.tokenizer
    assert parsed.generator == preset.generator
    assert parsed.sampling == preset.sampling
    assert parsed.name == path.stem


def test_lfq_codebook_size_comes_from_the_bit_width():
    # the 14-bit tokenizer YAML says codebook_size 4096; the official scripts overwrite it with 2**14
    cfg = from_official_yaml(CONFIGS / "tokenizer" / "maskbit_tokenizer_14bit.yaml")
    assert cfg.tokenizer.codebook_size == 2 ** 14 and cfg.tokenizer.num_bits == 14


def test_generator_yaml_values_and_training_sections():
    cfg = from_official_yaml(CONFIGS / "generator" / "maskbit_generator_14bit_256steps.yaml")
    assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.sampling.randomize_temperature) == (256, 5.8, 10.3)
    assert cfg.generator.mask_token == 128 and cfg.generator.num_tokens == 256
    assert cfg.extra["optimizer"]["params"]["learning_rate"] == pytest.approx(1e-4)
    assert cfg.extra["lr_scheduler"]["params"]["learning_rate"] == pytest.approx(1e-4)   # interpolation resolved
    assert cfg.extra["optimizer"]["params"]["beta2"] == pytest.approx(0.96)


def test_demo_and_maskgit_layouts():
    demo = from_official_yaml(CONFIGS / "demo" / "demo.yaml")
    assert demo.generator == get_preset("demo").generator
    maskgit = from_official_yaml(CONFIGS / "external" / "maskgit_tokenizer.yaml")
    assert maskgit.tokenizer.legacy_decoder and not maskgit.tokenizer.sample_with_conv


def test_taming_is_refused_clearly():
    with pytest.raises(ConfigError, match="taming.*not supported"):
        from_official_yaml(CONFIGS / "external" / "taming_vqgan_tokenizer.yaml")


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


VQ = """model:
  vq_model:
    quantizer_type: lookup-free
    token_size: 10
    hidden_channels: 32
    channel_mult: [1, 1, 2]
    num_resolutions: 3
"""


def test_unknown_fields_raise(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*colour"):
        from_official_yaml(_write(tmp_path, VQ + "    colour: red\n"))
    with pytest.raises(ConfigError, match="unknown field.*depht"):
        from_official_yaml(_write(tmp_path, VQ + "  mlm_model:\n    depht: 2\n"))


def test_inconsistent_fields_raise(tmp_path):
    with pytest.raises(ConfigError, match="codebook_size 4096 disagrees with the 10-bit"):
        from_official_yaml(_write(tmp_path, VQ + "  mlm_model:\n    codebook_size: 4096\n"))
    with pytest.raises(ConfigError, match="does not divide"):
        from_official_yaml(_write(tmp_path, VQ + "  mlm_model:\n    codebook_splits: 3\n"))
    with pytest.raises(ConfigError, match="channel_mult"):
        from_official_yaml(_write(tmp_path, VQ.replace("num_resolutions: 3", "num_resolutions: 4")))
    with pytest.raises(ConfigError, match="lookup-free tokenizer"):
        from_official_yaml(_write(tmp_path, VQ.replace("lookup-free", "lookup") + "  mlm_model:\n    depth: 2\n"))


def test_missing_file_and_unknown_preset():
    with pytest.raises(ConfigError, match="does not exist"):
        from_official_yaml("/nonexistent/config.yaml")
    with pytest.raises(ConfigError, match="neither a preset name nor a YAML"):
        resolve_config("maskbit_generator_13bit")


def test_every_preset_is_consistent():
    for name, cfg in PRESETS.items():
        assert cfg.name == name
        if cfg.generator is not None:
            assert cfg.generator.num_bits == cfg.tokenizer.num_bits
            assert cfg.generator.latent_size == cfg.tokenizer.latent_size
            assert cfg.sampling is not None


def test_configs_are_frozen_and_validated():
    cfg = TokenizerConfig()
    with pytest.raises(Exception):
        cfg.token_size = 3
    with pytest.raises(ConfigError):
        replace(GeneratorConfig(), codebook_size=1000)
