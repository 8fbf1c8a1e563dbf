"""Frozen model configs, read from the official YAML layout or built by the preset registry.

One dataclass per model (tokenizer, generator) plus the sampling settings; `ModelConfig` groups what one
official YAML describes. Field names are the keyword arguments of the models and the CLI flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskbit_runtime.sampling import SamplingError, SamplingSettings
from maskbit_runtime.schedules import MASK_SCHEDULES
from maskbit_runtime.errors import MaskbitError


class ConfigError(MaskbitError, ValueError):
    """A config that is unknown, unreadable or inconsistent."""


QUANTIZERS = ("lookup-free", "lookup")
TOKENIZER_CLASSES = {"vqgan+": False, "maskgit": True}   # model_class -> legacy decoder layout
MAX_BITS = 24                                            # bits per token (LFQ token_size, log2 codebook size)


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _int(owner: str, name: str, value: Any, lo: int = 1, hi: int | None = None) -> int:
    """An int (not a bool, not a float) in lo..hi, or ConfigError naming `owner.name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{owner}.{name} must be an integer, got {_got(value)}")
    if value < lo or (hi is not None and value > hi):
        span = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{owner}.{name} must be {span}, got {value}")
    return int(value)


def _float(owner: str, name: str, value: Any, lo: float = 0.0, hi: float | None = None,
           hi_open: bool = False) -> float:
    """A finite real number (not a bool) in [lo, hi] (or [lo, hi) when hi_open), or ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{owner}.{name} must be a finite number, got {_got(value)}")
    if value < lo or (hi is not None and (value >= hi if hi_open else value > hi)):
        span = f"in [{lo:g}, {hi:g}{')' if hi_open else ']'}" if hi is not None else f">= {lo:g}"
        raise ConfigError(f"{owner}.{name} must be {span}, got {value}")
    return float(value)


def _bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, numbers.Integral)) or value not in (0, 1):
        raise ConfigError(f"{owner}.{name} must be true or false, got {_got(value)}")
    return bool(value)


def _check_fields(obj, owner: str, ints: dict, floats: dict, bools: tuple) -> None:
    """Check and normalise (numpy ints -> int, ints -> float) the typed fields of a frozen dataclass."""
    for name, bounds in ints.items():
        object.__setattr__(obj, name, _int(owner, name, getattr(obj, name), *bounds))
    for name, bounds in floats.items():
        object.__setattr__(obj, name, _float(owner, name, getattr(obj, name), *bounds))
    for name in bools:
        object.__setattr__(obj, name, _bool(owner, name, getattr(obj, name)))



@dataclass(frozen=True)
class TokenizerConfig:
    """VQGAN+ tokenizer: conv encoder/decoder and a lookup-free (bits) or lookup (VQ) quantizer."""

    quantizer_type: str = "lookup-free"
    token_size: int = 12                 # LFQ: number of bits K; VQ: embedding dimension
    codebook_size: int = 4096            # LFQ: always 2**token_size
    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_resolutions: int = 5
    num_res_blocks: int = 2
    num_res_blocks_decoder: int = 2
    sample_with_conv: bool = True
    num_channels: int = 3
    legacy_decoder: bool = False         # MaskGIT tokenizer: decoder stages stored in reverse order
    resolution: int = 256
    commitment_cost: float = 0.25
    entropy_loss_weight: float = 0.02
    entropy_loss_temperature: float = 0.01
    entropy_gamma: float = 1.0
    use_l2_normalisation: bool = False

    def __post_init__(self):
        if not isinstance(self.quantizer_type, str) or self.quantizer_type not in QUANTIZERS:
            raise ConfigError(f"tokenizer.quantizer_type {self.quantizer_type!r} is not supported; expected one of "
                              f"{QUANTIZERS}")
        lfq = self.quantizer_type == "lookup-free"
        object.__setattr__(self, "token_size", _int("tokenizer", "token_size", self.token_size, 1,
                                                    MAX_BITS if lfq else 4096))
        if lfq:   # the official scripts overwrite the YAML's codebook_size with 2**token_size
            object.__setattr__(self, "codebook_size", 2 ** self.token_size)
        _check_fields(self, "tokenizer",
                      ints={"codebook_size": (2, 2 ** MAX_BITS), "hidden_channels": (1, 4096),
                            "num_resolutions": (1, 8), "num_res_blocks": (1, 16),
                            "num_res_blocks_decoder": (1, 16), "num_channels": (1, 16), "resolution": (1, 4096)},
                      floats={"commitment_cost": (0.0,), "entropy_loss_weight": (0.0,),
                              "entropy_loss_temperature": (0.0,), "entropy_gamma": (0.0,)},
                      bools=("sample_with_conv", "legacy_decoder", "use_l2_normalisation"))
        if isinstance(self.channel_mult, (str, bytes)) or not isinstance(self.channel_mult, (list, tuple)):
            raise ConfigError(f"tokenizer.channel_mult must be a list of integers, got {_got(self.channel_mult)}")
        object.__setattr__(self, "channel_mult", tuple(_int("tokenizer", f"channel_mult[{i}]", m, 1, 64)
                                                       for i, m in enumerate(self.channel_mult)))
        if self.entropy_loss_temperature == 0:
            raise ConfigError("tokenizer.entropy_loss_temperature must be > 0, got 0")
        if len(self.channel_mult) != self.num_resolutions:
            raise ConfigError(f"channel_mult {list(self.channel_mult)} must have num_resolutions="
                              f"{self.num_resolutions} entries")
        widths = {self.hidden_channels * m for m in (1, *self.channel_mult)}
        if any(w % 32 for w in widths):
            raise ConfigError(f"every channel width must be a multiple of 32 (GroupNorm groups); got {sorted(widths)}")
        if self.resolution % self.stride:
            raise ConfigError(f"resolution {self.resolution} is not a multiple of the token stride {self.stride}")

    @property
    def is_lookup_free(self) -> bool:
        return self.quantizer_type == "lookup-free"

    @property
    def num_bits(self) -> int:
        """Bits per token (log2 of the codebook size)."""
        return int(math.log2(self.codebook_size))

    @property
    def stride(self) -> int:
        return 2 ** (self.num_resolutions - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.stride


@dataclass(frozen=True)
class GeneratorConfig:
    """MaskBit transformer (LFQBert) over groups of bits."""

    codebook_size: int = 16384           # 2**K of the tokenizer
    codebook_splits: int = 2             # M groups per token
    hidden_dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    dropout: float = 0.1
    num_classes: int = 1000
    image_size: int = 256
    input_stride: int = 16
    use_prenorm: bool = False
    class_label_dropout: float = 0.1

    def __post_init__(self):
        _check_fields(self, "generator",
                      ints={"codebook_size": (2, 2 ** MAX_BITS), "codebook_splits": (1, MAX_BITS),
                            "hidden_dim": (1, 65536), "depth": (0, 1024), "heads": (1, 1024), "mlp_dim": (1, 262144),
                            "num_classes": (1, 10 ** 6), "image_size": (1, 4096), "input_stride": (1, 4096)},
                      floats={"dropout": (0.0, 1.0, True), "class_label_dropout": (0.0, 1.0, True)},
                      bools=("use_prenorm",))
        if self.codebook_size & (self.codebook_size - 1):
            raise ConfigError(f"generator.codebook_size must be a power of two, got {self.codebook_size}")
        if self.num_bits % self.codebook_splits:
            raise ConfigError(f"codebook_splits={self.codebook_splits} does not divide the {self.num_bits} bits")
        if self.hidden_dim % self.heads:
            raise ConfigError(f"hidden_dim {self.hidden_dim} is not divisible by heads {self.heads}")
        if self.image_size % self.input_stride:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of input_stride {self.input_stride}")

    @property
    def num_bits(self) -> int:
        return int(math.log2(self.codebook_size))

    @property
    def bits_per_group(self) -> int:
        return self.num_bits // self.codebook_splits

    @property
    def group_classes(self) -> int:
        """C = 2**(K/M), which is also the mask value of a group."""
        return 2 ** self.bits_per_group

    @property
    def mask_token(self) -> int:
        return self.group_classes

    @property
    def latent_size(self) -> int:
        return self.image_size // self.input_stride

    @property
    def num_tokens(self) -> int:
        return self.latent_size ** 2


# The sampling settings are a runtime type (the manifest and the runtime need them without torch).
SamplingConfig = SamplingSettings


@dataclass(frozen=True)
class ModelConfig:
    """What one official YAML describes: a tokenizer, and optionally a generator with its sampling settings."""

    tokenizer: TokenizerConfig
    generator: GeneratorConfig | None = None
    sampling: SamplingConfig | None = None
    name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # training sections

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "tokenizer": dataclasses.asdict(self.tokenizer),
            "generator": dataclasses.asdict(self.generator) if self.generator else None,
            "sampling": dataclasses.asdict(self.sampling) if self.sampling else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        try:
            return cls(
                tokenizer=TokenizerConfig(**data["tokenizer"]),
                generator=GeneratorConfig(**data["generator"]) if data.get("generator") else None,
                sampling=SamplingConfig.from_dict(data["sampling"]) if data.get("sampling") else None,
                name=data.get("name", ""),
            )
        except (KeyError, TypeError, SamplingError) as exc:
            raise ConfigError(f"stored config is not a maskbit config: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------
# Official YAML layout

_VQ_FIELDS = {  # official key -> TokenizerConfig field (model_class and codebook handling are special)
    "quantizer_type": "quantizer_type", "codebook_size": "codebook_size", "token_size": "token_size",
    "commitment_cost": "commitment_cost", "entropy_loss_weight": "entropy_loss_weight",
    "entropy_loss_temperature": "entropy_loss_temperature", "entropy_gamma": "entropy_gamma",
    "num_channels": "num_channels", "hidden_channels": "hidden_channels", "channel_mult": "channel_mult",
    "num_resolutions": "num_resolutions", "num_res_blocks": "num_res_blocks",
    "num_res_blocks_decoder": "num_res_blocks_decoder", "sample_with_conv": "sample_with_conv",
    "use_l2_normalisation": "use_l2_normalisation",
}
_MLM_MODEL_FIELDS = {"hidden_dim", "depth", "heads", "mlp_dim", "dropout", "codebook_splits", "use_prenorm",
                     "class_label_dropout"}
_MLM_SAMPLING_FIELDS = {"num_steps", "guidance_scale", "guidance_annealing", "scale_pow", "softmax_temperature",
                        "randomize_temperature", "use_sampling_annealing"}
_MLM_IGNORED = {"model_cls", "train_mask_schedule_strategy", "gen_mask_schedule_strategy", "codebook_size"}


def _to_plain(node: Any) -> dict:
    from omegaconf import OmegaConf
    return OmegaConf.to_container(node, resolve=True)


def read_official_yaml(path: str | Path) -> dict:
    """Load an official YAML (OmegaConf, interpolations resolved) as plain containers."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    from yaml import YAMLError
    try:
        data = _to_plain(OmegaConf.load(path))
    except (OmegaConfBaseException, YAMLError, ValueError) as exc:
        raise ConfigError(f"cannot read config {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} is not a YAML mapping")
    return data


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {_got(value)}")
    return dict(value)


def tokenizer_from_official(vq: Mapping[str, Any], resolution: int = 256) -> TokenizerConfig:
    vq = _mapping(vq, "model.vq_model")
    model_class = vq.pop("model_class", "vqgan+")
    if model_class == "taming":
        raise ConfigError("model_class 'taming' (the external Taming VQGAN) is not supported by this toolkit")
    if model_class not in TOKENIZER_CLASSES:
        raise ConfigError(f"unknown tokenizer model_class {model_class!r}; expected one of {list(TOKENIZER_CLASSES)}")
    unknown = set(vq) - set(_VQ_FIELDS)
    if unknown:
        raise ConfigError(f"unknown field(s) in model.vq_model: {', '.join(sorted(unknown))}")
    kwargs = {_VQ_FIELDS[k]: v for k, v in vq.items()}
    if "num_res_blocks_decoder" not in kwargs:
        kwargs["num_res_blocks_decoder"] = kwargs.get("num_res_blocks", 2)
    legacy = TOKENIZER_CLASSES[model_class]
    if legacy:   # the legacy decoder ignores num_res_blocks_decoder
        kwargs["num_res_blocks_decoder"] = kwargs.get("num_res_blocks", 2)
    try:
        return TokenizerConfig(legacy_decoder=legacy, resolution=resolution, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad model.vq_model: {exc}") from exc


def generator_from_official(mlm: Mapping[str, Any], tokenizer: TokenizerConfig, resolution: int = 256,
                            num_classes: int = 1000) -> tuple[GeneratorConfig, SamplingConfig]:
    mlm = _mapping(mlm, "model.mlm_model")
    if mlm.get("model_cls", "lfq_bert") != "lfq_bert":
        raise ConfigError(f"model.mlm_model.model_cls {mlm['model_cls']!r} is not supported; only 'lfq_bert'")
    unknown = set(mlm) - _MLM_MODEL_FIELDS - _MLM_SAMPLING_FIELDS - _MLM_IGNORED
    if unknown:
        raise ConfigError(f"unknown field(s) in model.mlm_model: {', '.join(sorted(unknown))}")
    if not tokenizer.is_lookup_free:
        raise ConfigError("an lfq_bert generator needs a lookup-free tokenizer (model.vq_model.quantizer_type)")
    if "codebook_size" in mlm and mlm["codebook_size"] != tokenizer.codebook_size:
        raise ConfigError(f"model.mlm_model.codebook_size {mlm['codebook_size']} disagrees with the "
                          f"{tokenizer.num_bits}-bit tokenizer (2**{tokenizer.num_bits} = {tokenizer.codebook_size})")
    train_sched = mlm.get("train_mask_schedule_strategy", "arccos")
    if train_sched not in MASK_SCHEDULES:
        raise ConfigError(f"train_mask_schedule_strategy {train_sched!r} is not one of {MASK_SCHEDULES}")
    generator = GeneratorConfig(
        codebook_size=tokenizer.codebook_size, num_classes=num_classes, image_size=resolution,
        input_stride=tokenizer.stride, **{k: mlm[k] for k in _MLM_MODEL_FIELDS if k in mlm})
    try:
        sampling = SamplingConfig(mask_schedule=mlm.get("gen_mask_schedule_strategy", "arccos"),
                                  **{k: mlm[k] for k in _MLM_SAMPLING_FIELDS if k in mlm})
    except SamplingError as exc:
        raise ConfigError(f"model.mlm_model: {exc}") from None
    return generator, sampling


def from_official_yaml(path: str | Path) -> ModelConfig:
    """Read an official MaskBit YAML (tokenizer, generator or demo layout)."""
    data = read_official_yaml(path)
    model = _mapping(data.get("model"), "model")
    if "vq_model" not in model:
        raise ConfigError(f"config {path} has no model.vq_model section")
    dataset = _mapping(data.get("dataset"), "dataset")
    resolution = _mapping(dataset.get("preprocessing"), "dataset.preprocessing").get("resolution", 256)
    tokenizer = tokenizer_from_official(model["vq_model"], resolution)
    generator = sampling = None
    if "mlm_model" in model:
        generator, sampling = generator_from_official(model["mlm_model"], tokenizer, resolution)
    extra = {k: _mapping(v, k) for k, v in data.items() if k in ("losses", "optimizer", "lr_scheduler", "training",
                                                                  "dataset", "experiment")}
    if "discriminator" in model:
        extra["discriminator"] = _mapping(model["discriminator"], "model.discriminator")
    train_schedule = (model.get("mlm_model") or {}).get("train_mask_schedule_strategy")
    if train_schedule is not None:   # training reads it as a loss setting
        losses = extra.setdefault("losses", {})
        losses["mlm"] = {**_mapping(losses.get("mlm"), "losses.mlm"), "train_mask_schedule_strategy": train_schedule}
    # the file name, not experiment.name: the official vqgan_plus_12bit.yaml calls itself "vqgan_plus_10bit"
    return ModelConfig(tokenizer=tokenizer, generator=generator, sampling=sampling, name=Path(path).stem, extra=extra)
