"""The stage-independent training loop: options, setup, data, logging, checkpoints, evaluation schedule.

A stage (`loop_tokenizer.TokenizerStage`, `loop_generator.GeneratorStage`) builds its models and optimisers and
implements one `train_step`, `evaluate` and `export`; this module runs it. Library code: it never prints; progress
goes to the `callback` (the CLI draws a progress bar from it).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..presets import resolve_config
from . import checkpointing, distributed, rundir
from .data import BatchStream, ImageSource, Preprocess, eval_batches, scan
from .ema import EMA
from .metrics import MetricsLog
from .settings import TrainSettings, apply_model_overrides, build_settings, split_overrides

# command-line sugar -> official dotted path
OPTION_PATHS = {"max_steps": "training.max_train_steps", "batch_size": "training.per_gpu_batch_size",
                "seed": "training.seed", "save_every": "experiment.save_every", "eval_every": "experiment.eval_every",
                "log_every": "experiment.log_every", "keep": "experiment.keep_checkpoints"}


@dataclass(frozen=True)
class RunOptions:
    """Everything one training run needs besides the stage; field names are the CLI flags."""

    config: str
    data: str
    output_dir: str
    eval_data: str | None = None
    overrides: tuple[str, ...] = ()
    max_steps: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    save_every: int | None = None
    eval_every: int | None = None
    log_every: int | None = None
    keep: int | None = None
    bf16: bool = False
    resume: bool = False
    device: str | None = None
    perceptual_weights: str | None = None
    random_perceptual: bool = False
    tokenizer: str | None = None          # generator stage: the frozen tokenizer checkpoint

    def all_overrides(self) -> list[str]:
        out = [f"{path}={getattr(self, name)}" for name, path in OPTION_PATHS.items()
               if getattr(self, name) is not None]
        if self.bf16:
            out.append("training.mixed_precision=bf16")
        return list(self.overrides) + out


@dataclass
class TrainResult:
    output_dir: Path
    export_path: Path | None
    steps: int
    resumed_from: int | None = None
    initial_eval: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)
    last_log: dict[str, float] = field(default_factory=dict)
    corrupt_images: int = 0
    skipped_checkpoints: list[tuple[str, str]] = field(default_factory=list)   # (folder, why) passed over on resume
    already_done: bool = False            # --resume found the run at or past max_train_steps: nothing was done


def prepare(options: RunOptions, stage: str) -> tuple[ModelConfig, TrainSettings]:
    config = resolve_config(options.config)
    train_overrides, model_overrides = split_overrides(options.all_overrides())
    config = apply_model_overrides(config, model_overrides)
    return config, build_settings(config, stage, train_overrides)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class Stage:
    """Subclasses set `name`, and build: `model` (trained, EMA-tracked), `modules` (name -> nn.Module to checkpoint),
    `optimizers`, `schedulers` (name -> object with state_dict/load_state_dict)."""

    name = ""
    model: nn.Module
    train_model: nn.Module            # the model or its DDP wrapper

    def __init__(self, config: ModelConfig, settings: TrainSettings, options: RunOptions,
                 dist: distributed.DistInfo):
        self.config, self.settings, self.options, self.dist = config, settings, options, dist
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.buffers: dict[str, torch.Tensor] = {}

    # -- hooks -------------------------------------------------------------------------------------------------
    def resolution(self) -> int:
        raise NotImplementedError

    def build(self) -> None:
        raise NotImplementedError

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        raise NotImplementedError

    def export(self, model: nn.Module, path: Path) -> Path:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------------------
    def autocast(self):
        if not self.settings.bf16:
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)

    def wrap(self, module: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def adamw(self, params, lr: float) -> torch.optim.Optimizer:
        s = self.settings
        scale = s.per_gpu_batch_size * self.dist.world_size if s.scale_lr else 1
        return torch.optim.AdamW(params, lr=lr * scale, betas=(s.beta1, s.beta2), weight_decay=s.weight_decay,
                                 eps=s.epsilon)

    def clip_and_step(self, module: nn.Module, name: str) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), self.settings.max_grad_norm)
        self.optimizers[name].step()
        self.schedulers[name].step()
        return norm

    def ema_model(self, ema: EMA | None) -> nn.Module:
        model = copy.deepcopy(self.model)
        if ema is not None:
            ema.copy_to(model)
        return model.eval()


def _preprocess(settings: TrainSettings, resolution: int, train: bool) -> Preprocess:
    return Preprocess(resolution, settings.interpolation, settings.min_scale, settings.use_aspect_ratio_aug,
                      settings.use_random_crop, train)


def run(stage_cls: type[Stage], options: RunOptions, callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Train one stage end to end (also under torchrun), returning the final metrics and the export path."""
    config, settings = prepare(options, stage_cls.name)
    dist = distributed.setup(options.device)
    try:
        return _run(stage_cls, config, settings, options, dist, callback or (lambda event: None))
    finally:
        distributed.teardown(dist)


def _run(stage_cls, config, settings, options, dist, callback) -> TrainResult:
    out = Path(options.output_dir)
    run_id = rundir.identity(stage_cls.name, config.to_dict(), settings.to_dict())
    if not options.resume:
        rundir.check_new_run(out, run_id)
    records, num_classes = scan(options.data)
    eval_records = scan(options.eval_data)[0] if options.eval_data else records
    seed_everything(settings.seed + dist.rank)
    stage = stage_cls(config, settings, options, dist)
    stage.num_classes = num_classes
    stage.build()
    ema = EMA(stage.model, settings.ema_decay) if settings.use_ema else None
    source = ImageSource(records)
    resolution = stage.resolution()
    stream = BatchStream(source, _preprocess(settings, resolution, True), settings.per_gpu_batch_size,
                         settings.seed, dist.rank, dist.world_size)
    eval_source = ImageSource(eval_records)
    ckpt_root = out / "checkpoints"
    step, resumed_from, skipped = 0, None, []
    if options.resume:
        required = set(stage.modules) | ({"ema"} if ema is not None else set())
        path, (weights, state, meta), skipped = checkpointing.load_latest(ckpt_root, required)
        for folder, why in skipped:
            callback({"kind": "skipped_checkpoint", "path": str(folder), "reason": why, "resumed_from": path.name})
        rundir.check_resumed_run(out, run_id, meta, path)
        step = resumed_from = int(state["step"])
        if step >= settings.max_train_steps:      # nothing to train: write nothing, export nothing
            export = out / f"{stage.name}.safetensors"
            return TrainResult(out, export if export.is_file() else None, step, resumed_from,
                               skipped_checkpoints=[(str(f), w) for f, w in skipped], already_done=True)
        for name, module in stage.modules.items():
            module.load_state_dict(weights[name])
        for name, opt in stage.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in stage.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        if ema is not None:
            ema.load(weights["ema"], state["ema_updates"])
        stream.load_state(state["data"][dist.rank] if dist.world_size == len(state["data"]) else state["data"][0])
        checkpointing.set_rng_state(state["rng"][dist.rank] if dist.rank < len(state["rng"]) else state["rng"][0])
        source.corrupt.update(dict.fromkeys(state.get("corrupt", []), "seen before"))
    elif dist.is_main:
        rundir.write_run_file(out, run_id)
    distributed.barrier(dist)
    log = MetricsLog(out, resumed_from) if dist.is_main else None

    def evaluate() -> dict[str, float]:
        batches = eval_batches(eval_source, _preprocess(settings, resolution, False), settings.per_gpu_batch_size,
                               settings.eval_images)
        model = stage.ema_model(ema).to(dist.device)
        with torch.no_grad(), stage.autocast():
            return stage.evaluate(model, batches)

    result = TrainResult(out, None, step, resumed_from, skipped_checkpoints=[(str(f), w) for f, w in skipped])
    if dist.is_main and step == 0 and settings.eval_every > 0:
        result.initial_eval = evaluate()
        log.write({"step": 0, "kind": "eval", **result.initial_eval})
        callback({"kind": "eval", "step": 0, **result.initial_eval})
    seen_corrupt = len(source.corrupt)
    while step < settings.max_train_steps:
        images, labels = stream.next_batch()
        logs = stage.train_step(images.to(dist.device), labels.to(dist.device), step)
        if ema is not None:
            ema.update(stage.model)
        step += 1
        if len(source.corrupt) > seen_corrupt:
            for key in list(source.corrupt)[seen_corrupt:]:
                callback({"kind": "corrupt", "step": step, "key": key, "reason": source.corrupt[key]})
            seen_corrupt = len(source.corrupt)
        if step % max(1, settings.log_every) == 0 or step == settings.max_train_steps:
            values = distributed.mean_over_ranks(logs, dist)
            values["lr"] = stage.optimizers["model"].param_groups[0]["lr"]
            result.last_log = values
            if dist.is_main:
                log.write({"step": step, "kind": "train", **values, "corrupt_images": len(source.corrupt)})
        callback({"kind": "step", "step": step, "total": settings.max_train_steps, **result.last_log})
        if settings.save_every > 0 and step % settings.save_every == 0 and step < settings.max_train_steps:
            _save(stage, ema, stream, source, ckpt_root, step, settings, dist)
        if dist.is_main and settings.eval_every > 0 and (step % settings.eval_every == 0
                                                         or step == settings.max_train_steps):
            result.final_eval = evaluate()
            log.write({"step": step, "kind": "eval", **result.final_eval})
            callback({"kind": "eval", "step": step, **result.final_eval})
    _save(stage, ema, stream, source, ckpt_root, step, settings, dist)
    result.steps = step
    result.corrupt_images = len(source.corrupt)
    if dist.is_main:
        result.export_path = stage.export(stage.ema_model(ema).cpu(), out / f"{stage.name}.safetensors")
        log.close()
    distributed.barrier(dist)
    source.close()
    eval_source.close()
    return result


def _save(stage: Stage, ema: EMA | None, stream: BatchStream, source: ImageSource, root: Path, step: int,
          settings: TrainSettings, dist: distributed.DistInfo) -> None:
    """Rank 0 writes; data positions and RNG states of every rank are gathered into the one state file."""
    data_states, rng_states = [stream.state()], [checkpointing.rng_state()]
    if dist.enabled:
        import torch.distributed as tdist
        gathered: list = [None] * dist.world_size
        tdist.all_gather_object(gathered, (stream.state(), checkpointing.rng_state()))
        data_states = [g[0] for g in gathered]
        rng_states = [g[1] for g in gathered]
    if dist.is_main:
        weights = {name: module.state_dict() for name, module in stage.modules.items()}
        if ema is not None:
            weights["ema"] = ema.tensors()
        state = {"step": step, "optimizers": {k: o.state_dict() for k, o in stage.optimizers.items()},
                 "schedulers": {k: s.state_dict() for k, s in stage.schedulers.items()},
                 "ema_updates": ema.num_updates if ema else 0, "data": data_states, "rng": rng_states,
                 "corrupt": sorted(source.corrupt)}
        meta = {"stage": stage.name, "config": stage.config.to_dict(), "settings": settings.to_dict(),
                "world_size": dist.world_size, "backend": dist.backend}
        checkpointing.save(root, step, weights, state, meta, settings.keep_checkpoints)
    distributed.barrier(dist)
