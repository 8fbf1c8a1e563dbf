"""The runs behind benchmarks/gpu_training.py: its settings and tolerances, synthetic images, the check runs of the
real training code (`Runs`, shared between checks) and the training throughput measurement. Split from
gpu_training.py (which holds the checks, the plan and the report) to keep each module readable; nothing here
changed what the script checks.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from gpu_throughput import set_tf32  # (one definition of the TF32 switch; benchmarks/ is on sys.path)


TINY = "tiny_lfq10"
SIZES = {"tiny": {"tokenizer": (TINY, 4), "generator": (TINY, 4)},
         "full": {"tokenizer": ("maskbit_tokenizer_14bit", 16), "generator": ("maskbit_generator_14bit", 32)}}
PRECISIONS = ("fp32", "tf32", "bf16")
SEED = 7
BATCH = 4
LOSS_KEYS = {"tokenizer": ("reconstruction_loss", "total_loss", "discriminator_loss"), "generator": ("loss",)}
FALL_KEY = {"tokenizer": "reconstruction_loss", "generator": "loss"}
FALL_RATIO = {"tokenizer": 0.8, "generator": 0.98}

# Tolerances of the device against the CPU, fp32 with TF32 off. Both compute the same function; cuDNN/cuBLAS sum in
# other orders than the CPU kernels, so every op differs by rounding, and training amplifies that. Measured on the
# CPU with these runs' settings, every initial weight multiplied by (1 + 1e-6 x N(0,1)): the tokenizer's first step
# moved by <= 3e-7 relative (5 seeds), but the lookup-free quantizer takes signs and a latent near zero flips, so by
# step 4 a step moved by up to 2.5e-3 and later single steps by up to 17%, while the mean reconstruction loss of the
# last 8 of 24 steps moved by <= 2.1% (<= 4% in 3 seeds of another schedule); the generator (smooth, its targets
# from one fixed tokenizer) moved by <= 1e-7 in every step.
TOLERANCES = {
    "first_step_rtol": 1e-4,        # the first step of a run, and the first step after a resume: the same state
    "tokenizer_tail_rtol": 0.10,    # the mean reconstruction loss over the last third of the steps
    "generator_rtol": 2e-3,         # every step (a target bit may flip where a latent is ~0)
}
TOKENIZER_OVERRIDES = ("losses.perceptual_weight=0", "discriminator.hidden_channels=32",
                       "lr_scheduler.params.warmup_steps=5", "optimizer.params.learning_rate=1e-3",
                       "experiment.eval_images=8")
GENERATOR_OVERRIDES = ("lr_scheduler.params.warmup_steps=5", "optimizer.params.learning_rate=1e-3",
                       "experiment.eval_images=8")


def make_images(root: Path, size: int, classes: int = 4, per_class: int = 8, seed: int = 0) -> Path:
    """Smooth colour images (a random plane wave per channel), one folder per class: learnable, nothing to fetch."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            freq, phase = rng.uniform(0.5, 3.0, (3, 2, 1, 1)), rng.uniform(0, 2 * np.pi, (3, 1, 1))
            image = 0.5 + 0.5 * np.sin(2 * np.pi * (freq[:, 0] * xx + freq[:, 1] * yy) + phase)   # (3, H, W)
            Image.fromarray((255 * image.transpose(1, 2, 0)).round().astype(np.uint8)).save(folder / f"{i:02d}.png")
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ---- runs of the real training code ---------------------------------------------------------------------------


class Runs:
    """The check runs, made on first use and shared between checks (one output folder each under `work`)."""

    def __init__(self, work: Path, steps: int, threads: int | None):
        self.work, self.steps, self.threads = work, steps, threads
        self.data = make_images(work / "images", 40)          # the tiny preset's 32x32 crops of 40x40 images
        self.done: set[Path] = set()

    def images(self, size: str) -> Path:
        """Images for the throughput cases: a little above the resolution, so the random crops vary."""
        folder = self.work / f"images_{size}"
        return folder if folder.is_dir() else make_images(folder, 32 if size == "tiny" else 288)

    def folder(self, stage: str, device: str, bf16: bool = False, reference: bool = False) -> Path:
        tag = "reference" if reference else "bf16" if bf16 else "fp32"
        return self.work / f"{stage}_{device.replace(':', '')}_{tag}"

    def options(self, stage: str, device: str, out: Path, bf16: bool = False, **extra) -> dict:
        """RunOptions fields of a check run (also the command line of the torchrun case)."""
        overrides = TOKENIZER_OVERRIDES + (f"losses.discriminator_start={self.steps // 4}",) \
            if stage == "tokenizer" else GENERATOR_OVERRIDES + (() if bf16 else ("generator.dropout=0.0",))
        kwargs = dict(config=TINY, data=str(self.data), output_dir=str(out), overrides=overrides,
                      max_steps=self.steps, batch_size=BATCH, seed=SEED, save_every=self.steps // 2,
                      eval_every=self.steps, log_every=1, bf16=bf16, device=device)
        if stage == "generator":      # every generator run learns the tokens of the CPU reference tokenizer
            kwargs["tokenizer"] = str(self.folder("tokenizer", "cpu", reference=True) / "tokenizer.safetensors")
        return {**kwargs, **extra}

    def get(self, stage: str, device: str, bf16: bool = False, reference: bool = False) -> Path:
        """The output folder of a finished run: on `device`, or the CPU reference run (a second CPU run on a
        machine without a GPU, so that the comparison tests the reference's determinism)."""
        out = self.folder(stage, device, bf16, reference)
        if out not in self.done:
            if stage == "generator":
                self.get("tokenizer", "cpu", reference=True)
            self.train(stage, self.options(stage, device, out, bf16))
            self.done.add(out)
        return out

    def reference(self, stage: str) -> Path:
        return self.get(stage, "cpu", reference=True)

    def train(self, stage: str, options: dict, stage_cls=None):
        from maskbit.train import RunOptions
        from maskbit.train.runner import run
        if self.threads:
            torch.set_num_threads(self.threads)
        set_tf32(False)
        return run(stage_cls or stage_class(stage), RunOptions(**options))


def stage_class(stage: str):
    from maskbit.train.loop_generator import GeneratorStage
    from maskbit.train.loop_tokenizer import TokenizerStage
    return {"tokenizer": TokenizerStage, "generator": GeneratorStage}[stage]


# ---- throughput -----------------------------------------------------------------------------------------------


def throughput_options(stage_name: str, precision: str, size: str, device: str, work: Path, data: Path):
    """RunOptions of a throughput case: the released settings with the discriminator on (as after its start) and
    the perceptual loss on a random ResNet-50 (the compute of the real weights, which the machine lacks); at tiny
    size the tiny check runs' discriminator and no perceptual network (the smoke would time little else)."""
    from maskbit.train import RunOptions
    config_name, batch = SIZES[size][stage_name]
    tiny = size == "tiny"
    overrides = ("losses.discriminator_start=0",) + (TOKENIZER_OVERRIDES[:2] if tiny else ()) \
        if stage_name == "tokenizer" else ()
    tokenizer = str(work / f"tokenizer_{size}.safetensors") if stage_name == "generator" else None
    return RunOptions(config=config_name, data=str(data), output_dir=str(work / "unused"), batch_size=batch,
                      bf16=precision == "bf16", device=device, random_perceptual=not tiny, overrides=overrides,
                      tokenizer=tokenizer)


def measure_throughput(runs: Runs, stage_name: str, precision: str, device: str, size: str, steps: int) -> dict:
    """steps/s, images/s and peak memory of `steps` training steps (train_step + EMA update) on one batch."""
    from maskbit.train import distributed
    from maskbit.train.data import BatchStream, ImageSource, scan
    from maskbit.train.ema import EMA
    from maskbit.train.runner import _preprocess, prepare
    options = throughput_options(stage_name, precision, size, device, runs.work, runs.images(size))
    device, batch, data = torch.device(device), options.batch_size, Path(options.data)
    config, settings = prepare(options, stage_name)
    if stage_name == "generator" and not Path(options.tokenizer).is_file():
        import maskbit
        from maskbit.config import ModelConfig
        maskbit.save_tokenizer(maskbit.build_tokenizer(config), options.tokenizer,
                               ModelConfig(tokenizer=config.tokenizer))
    set_tf32(precision == "tf32")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    records, num_classes = scan(data)
    stage = stage_class(stage_name)(config, settings, options, distributed.setup(str(device)))
    stage.num_classes = num_classes
    stage.build()
    ema = EMA(stage.model, settings.ema_decay)
    stream = BatchStream(ImageSource(records), _preprocess(settings, stage.resolution(), True), batch, SEED)
    stream.next_batch()
    start = time.perf_counter()
    images, labels = stream.next_batch()
    data_seconds = time.perf_counter() - start
    images, labels = images.to(device), labels.to(device)

    def step(i: int) -> None:
        stage.train_step(images, labels, i)
        ema.update(stage.model)

    for i in range(2):     # warm-up: kernels chosen, optimiser states allocated
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(2 + i)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    set_tf32(False)
    return {"config": options.config, "batch": batch, "resolution": stage.resolution(), "steps": steps,
            "steps_per_s": steps / seconds, "images_per_s": steps * batch / seconds,
            "ms_per_step": 1e3 * seconds / steps, "peak_memory_gib": peak, "data_ms_per_batch": 1e3 * data_seconds}
