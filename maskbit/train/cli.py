"""`maskbit-train tokenizer|generator`: parse, call one library function, print the result.

Any training setting can be overridden as a trailing `key=value` (official dotted path or field name), e.g.
`maskbit-train tokenizer --config tiny_lfq10 --data photos/ --output-dir runs/t losses.discriminator_start=10`.
"""

from __future__ import annotations

import json
import sys

import click

from maskbit_runtime.errors import MaskbitError

from .runner import RunOptions

# the toolkit's own errors (ConfigError, DataError, CheckpointError, ResumeError, OutputDirError, ...) and failed
# file operations are one line; anything else is a bug and keeps its traceback
USER_ERRORS = (MaskbitError, OSError)


def _common(fn):
    options = [
        click.option("--config", required=True, help="preset name or official YAML path"),
        click.option("--data", required=True, help="image folder (one subfolder per class), .tar shard(s) or pattern"),
        click.option("--output-dir", required=True, type=click.Path(file_okay=False)),
        click.option("--eval-data", default=None, help="evaluation images (default: the training data)"),
        click.option("--max-steps", type=int, default=None, help="training.max_train_steps"),
        click.option("--batch-size", type=int, default=None, help="training.per_gpu_batch_size (per process)"),
        click.option("--seed", type=int, default=None),
        click.option("--save-every", type=int, default=None),
        click.option("--eval-every", type=int, default=None),
        click.option("--log-every", type=int, default=None),
        click.option("--keep", type=int, default=None, help="checkpoints to keep"),
        click.option("--bf16", is_flag=True, help="bf16 autocast"),
        click.option("--resume", is_flag=True, help="continue from the newest checkpoint in OUTPUT_DIR"),
        click.option("--device", default=None, help="cpu or cuda (default: cuda when available)"),
        click.option("--threads", type=int, default=None, help="torch CPU threads"),
        click.option("--quiet", is_flag=True, help="no progress bar"),
        click.argument("overrides", nargs=-1),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run(train_fn, quiet: bool, threads: int | None, **kwargs) -> None:
    import os

    import torch
    if threads:
        torch.set_num_threads(threads)
    kwargs["overrides"] = tuple(kwargs["overrides"])
    main_rank = int(os.environ.get("RANK", "0")) == 0
    bar = None

    def callback(event: dict) -> None:
        nonlocal bar
        if not main_rank:
            return
        if event["kind"] == "corrupt":
            click.echo(f"warning: skipped corrupt image {event['key']}: {event['reason']}", err=True)
        elif event["kind"] == "skipped_checkpoint":
            click.echo(f"warning: {event['reason']}; resuming from the older {event['resumed_from']}", err=True)
        elif event["kind"] == "eval" and not quiet:
            click.echo("eval step {}: {}".format(event["step"], json.dumps(
                {k: round(v, 4) for k, v in event.items() if isinstance(v, float)})), err=True)
        elif event["kind"] == "step" and not quiet:
            if bar is None:
                from tqdm import tqdm
                bar = tqdm(total=event["total"], initial=event["step"] - 1, desc="train", file=sys.stderr)
            bar.update(1)
            loss = event.get("total_loss", event.get("loss"))
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}")

    try:
        result = train_fn(RunOptions(**kwargs), callback)
    except USER_ERRORS as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
            text = f"{exc.strerror or text}: {exc.filename}"
        raise click.ClickException(text) from None
    finally:
        if bar is not None:
            bar.close()
    if main_rank:
        if result.already_done:
            click.echo(f"warning: the run in {result.output_dir} is already at step {result.steps}, at or past "
                       f"--max-steps; nothing was trained or exported", err=True)
        summary = {"steps": result.steps, "export": str(result.export_path), "resumed_from": result.resumed_from,
                   "initial_eval": result.initial_eval, "final_eval": result.final_eval,
                   "corrupt_images": result.corrupt_images, "already_done": result.already_done,
                   "skipped_checkpoints": [folder for folder, _ in result.skipped_checkpoints]}
        click.echo(json.dumps(summary, indent=1))


@click.group()
def main() -> None:
    """Train MaskBit tokenizers and generators."""


@main.command()
@_common
@click.option("--perceptual-weights", default=None, type=click.Path(dir_okay=False),
              help="torchvision ResNet-50 IMAGENET1K_V1 file (default: the torch hub cache)")
@click.option("--random-perceptual", is_flag=True, help="random ResNet-50 for the perceptual loss (tests only)")
def tokenizer(**kwargs) -> None:
    """Train a VQGAN+ / MaskBit tokenizer."""
    from .loop_tokenizer import train_tokenizer
    _run(train_tokenizer, **kwargs)


@main.command()
@_common
@click.option("--tokenizer", "tokenizer", required=True, type=click.Path(dir_okay=False),
              help="frozen tokenizer checkpoint")
def generator(**kwargs) -> None:
    """Train a MaskBit generator on a frozen tokenizer."""
    from .loop_generator import train_generator
    _run(train_generator, **kwargs)


if __name__ == "__main__":
    main()
