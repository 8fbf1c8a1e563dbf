"""Training settings: the official YAML's training sections, with the released values as defaults.

Every field carries its official dotted path (`losses.discriminator_start`, `optimizer.params.beta2`, ...). The
settings of a run are: the stage's released defaults (MASKBIT_SPEC section 6), then the YAML's sections (kept by
`from_official_yaml` in `ModelConfig.extra`), then `key=value` overrides from the command line. An override may
name the dotted path or the bare field name; `tokenizer.X=...` / `generator.X=...` change the model config itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, ModelConfig

STAGES = ("tokenizer", "generator")


def _f(default, path: str, generator_default=None):
    meta = {"path": path}
    if generator_default is not None:
        meta["generator_default"] = generator_default
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainSettings:
    """One run's training hyper-parameters (field -> official dotted path in the metadata)."""

    stage: str = "tokenizer"
    # tokenizer losses (MASKBIT_SPEC 6.1)
    quantizer_weight: float = _f(1.0, "losses.quantizer_weight")
    perceptual_loss: str = _f("resnet50", "losses.perceptual_loss")
    perceptual_weight: float = _f(0.1, "losses.perceptual_weight")
    perceptual_loss_on_logits: bool = _f(True, "losses.perceptual_loss_on_logits")
    reconstruction_loss: str = _f("l2", "losses.reconstruction_loss")
    reconstruction_weight: float = _f(4.0, "losses.reconstruction_weight")
    discriminator_start: int = _f(20_000, "losses.discriminator_start")
    discriminator_loss: str = _f("hinge", "losses.discriminator_loss")
    discriminator_factor: float = _f(1.0, "losses.discriminator_factor")
    discriminator_weight: float = _f(0.02, "losses.discriminator_weight")
    discriminator_gradient_penalty: str = _f("none", "losses.discriminator_gradient_penalty")
    lecam_regularization_weight: float = _f(0.001, "losses.lecam_regularization_weight")
    lecam_ema_decay: float = _f(0.999, "losses.ema_decay")
    entropy_annealing_steps: int = _f(2000, "losses.entropy_annealing_steps")
    entropy_annealing_factor: float = _f(2.0, "losses.entropy_annealing_factor")
    # discriminator architecture (6.2)
    disc_num_channels: int = _f(3, "discriminator.num_channels")
    disc_hidden_channels: int = _f(128, "discriminator.hidden_channels")
    disc_num_stages: int = _f(4, "discriminator.num_stages")
    disc_blur_resample: bool = _f(True, "discriminator.blur_resample")
    disc_blur_kernel_size: int = _f(4, "discriminator.blur_kernel_size")
    # generator loss and masking (6.4)
    label_smoothing: float = _f(0.1, "losses.mlm.label_smoothing")
    sum_splits: bool = _f(False, "losses.mlm.sum_splits")
    train_mask_schedule: str = _f("arccos", "losses.mlm.train_mask_schedule_strategy")
    # optimisers (6.3)
    learning_rate: float = _f(1e-4, "optimizer.params.learning_rate")
    discriminator_learning_rate: float = _f(1e-4, "optimizer.params.discriminator_learning_rate")
    scale_lr: bool = _f(False, "optimizer.params.scale_lr")
    beta1: float = _f(0.9, "optimizer.params.beta1")
    beta2: float = _f(0.999, "optimizer.params.beta2", generator_default=0.96)
    weight_decay: float = _f(1e-4, "optimizer.params.weight_decay", generator_default=0.045)
    epsilon: float = _f(1e-8, "optimizer.params.epsilon")
    scheduler: str = _f("cosine_with_minimum", "lr_scheduler.scheduler")
    warmup_steps: int = _f(5000, "lr_scheduler.params.warmup_steps")
    minimum_rate: float = _f(0.1, "lr_scheduler.params.minimum_rate")
    # loop
    gradient_accumulation_steps: int = _f(1, "training.gradient_accumulation_steps")
    per_gpu_batch_size: int = _f(16, "training.per_gpu_batch_size", generator_default=32)
    mixed_precision: str = _f("no", "training.mixed_precision")
    use_ema: bool = _f(True, "training.use_ema")
    ema_decay: float = _f(0.999, "training.ema_decay")
    seed: int = _f(42, "training.seed")
    max_train_steps: int = _f(1_350_000, "training.max_train_steps")
    max_grad_norm: float = _f(1.0, "training.max_grad_norm")
    save_every: int = _f(20_000, "experiment.save_every", generator_default=100_000)
    eval_every: int = _f(20_000, "experiment.eval_every", generator_default=100_000)
    log_every: int = _f(50, "experiment.log_every")
    keep_checkpoints: int = _f(3, "experiment.keep_checkpoints")
    eval_images: int = _f(64, "experiment.eval_images")
    # data (6.5)
    use_aspect_ratio_aug: bool = _f(True, "dataset.preprocessing.use_aspect_ratio_aug", generator_default=False)
    use_random_crop: bool = _f(True, "dataset.preprocessing.use_random_crop")
    min_scale: float = _f(0.8, "dataset.preprocessing.min_scale")
    interpolation: str = _f("bilinear", "dataset.preprocessing.interpolation", generator_default="bicubic")

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"stage {self.stage!r} is not one of {STAGES}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.metadata.get('path', f.name)} must be a finite number, got {value!r}")
        checks = [
            (self.gradient_accumulation_steps == 1, "training.gradient_accumulation_steps must be 1 (not supported)"),
            (self.mixed_precision in ("no", "bf16"), "training.mixed_precision must be 'no' or 'bf16'"),
            (self.scheduler == "cosine_with_minimum", "lr_scheduler.scheduler must be 'cosine_with_minimum'"),
            (self.reconstruction_loss in ("l2", "l1"), "losses.reconstruction_loss must be 'l2' or 'l1'"),
            (self.discriminator_loss == "hinge", "losses.discriminator_loss: only 'hinge' is implemented"),
            (self.discriminator_gradient_penalty == "none",
             "losses.discriminator_gradient_penalty: only 'none' is implemented"),
            (self.perceptual_loss == "resnet50" and self.perceptual_loss_on_logits,
             "losses.perceptual_loss: only 'resnet50' on logits is implemented"),
            (self.interpolation in ("bilinear", "bicubic"), "dataset.preprocessing.interpolation: bilinear|bicubic"),
            (self.per_gpu_batch_size >= 1 and self.max_train_steps >= 1, "batch size and max steps must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message}; got {self._describe()}")

    def _describe(self) -> str:
        return ", ".join(f"{f.metadata['path']}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                         if "path" in f.metadata and getattr(self, f.name) != _default(f, self.stage))

    @property
    def bf16(self) -> bool:
        return self.mixed_precision == "bf16"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _default(f: dataclasses.Field, stage: str):
    if stage == "generator" and "generator_default" in f.metadata:
        return f.metadata["generator_default"]
    return f.default


_FIELDS = {f.name: f for f in dataclasses.fields(TrainSettings) if "path" in f.metadata}
_BY_PATH = {f.metadata["path"]: f for f in _FIELDS.values()}
SETTING_PATHS = {name: f.metadata["path"] for name, f in _FIELDS.items()}   # field -> official dotted path


def _coerce(f: dataclasses.Field, value: Any, source: str):
    kind = type(f.default)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):    # nan/inf: no setting means that
                raise ValueError(value)
            return float(value)
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{source}: {f.metadata['path']} expects a {kind.__name__}, got {value!r}") from None


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _parse_value(text: str) -> Any:
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def check_stage(config: ModelConfig, stage: str) -> None:
    """Raise a clear error when `config` cannot train `stage`."""
    name = config.name or "the given config"
    if stage == "generator" and config.generator is None:
        raise ConfigError(f"{name} describes only a tokenizer (no model.mlm_model); the generator stage needs a "
                          f"generator config such as maskbit_generator_10bit or a tiny_* preset")
    losses = config.extra.get("losses") or {}
    if stage == "tokenizer" and "mlm" in losses:
        raise ConfigError(f"{name} is a generator training config (it has losses.mlm); train the tokenizer with a "
                          f"tokenizer config such as maskbit_tokenizer_10bit")
    if stage == "generator" and losses and "mlm" not in losses:
        raise ConfigError(f"{name} is a tokenizer training config (its losses have no mlm section); the generator "
                          f"stage needs a generator config")


def split_overrides(overrides: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`key=value` strings -> (training overrides by dotted path, model overrides by `tokenizer.X`/`generator.X`)."""
    train, model = {}, {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. losses.discriminator_start=10)")
        value = _parse_value(text)
        if key.startswith(("tokenizer.", "generator.")):
            model[key] = value
        elif key in _BY_PATH or key in _FIELDS:
            train[_FIELDS[key].metadata["path"] if key in _FIELDS else key] = value
        else:
            close = sorted(p for p in _BY_PATH if key.split(".")[-1] in p)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown setting {key!r}{hint}")
    return train, model


def apply_model_overrides(config: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """`tokenizer.token_size=12`-style changes to the model config."""
    for key, value in overrides.items():
        part, name = key.split(".", 1)
        sub = getattr(config, part)
        names = {f.name for f in dataclasses.fields(sub)} if sub is not None else set()
        if name not in names:
            raise ConfigError(f"unknown model setting {key!r}; {part} fields: {', '.join(sorted(names))}")
        config = dataclasses.replace(config, **{part: dataclasses.replace(sub, **{name: value})})
    return config


def build_settings(config: ModelConfig, stage: str, overrides: Mapping[str, Any] | None = None) -> TrainSettings:
    """Released defaults of `stage`, then the config's YAML sections, then `overrides` (dotted path -> value)."""
    check_stage(config, stage)
    values = {name: _default(f, stage) for name, f in _FIELDS.items()}
    for path, value in _leaves(config.extra):
        if path in _BY_PATH:
            values[_BY_PATH[path].name] = _coerce(_BY_PATH[path], value, config.name or "config")
    for path, value in (overrides or {}).items():
        f = _BY_PATH.get(path) or _FIELDS.get(path)
        if f is None:
            raise ConfigError(f"unknown setting {path!r}")
        values[f.name] = _coerce(f, value, "override")
    return TrainSettings(stage=stage, **values)
