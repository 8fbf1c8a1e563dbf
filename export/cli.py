"""`maskbit-export build-engines`: checkpoints + config -> a verified bundle. Thin: parse the options into an
`ExportJob` (job.py, where every rule between them lives), run it, print."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from maskbit_runtime.cli import one_line_errors

from .job import AOTI_DEVICES, BACKENDS, ENGINE_PRECISIONS, MIN_OPSET, PRECISIONS, ExportJob, ExportRuleError
from .onnx_export import DEFAULT_OPSET


class OptionsError(click.ClickException):
    """Options that do not go together: one `Error:` line and click's usage exit status 2."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Export MaskBit models to ONNX (and TensorRT) bundles that `maskbit-run` executes."""


@main.command("build-engines")
@click.option("--tokenizer", required=True,
              help="Tokenizer checkpoint: official .bin, our .safetensors, or hf://owner/repo[/file].")
@click.option("--generator", default=None,
              help="Generator checkpoint (same forms). Without it the bundle can only encode and decode.")
@click.option("--config", default=None,
              help="Official YAML or preset name (see `maskbit.PRESETS`); optional for our safetensors files.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to create.")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Largest batch of the dynamic batch profile; bigger requests are split by the runtime.")
@click.option("--opt-batch", type=click.IntRange(1, 4096), default=None,
              help="The batch TensorRT engines are tuned for (the profile's optimum): the batch you will run "
                   "[default: --max-batch].")
@click.option("--opset", type=click.IntRange(min=MIN_OPSET), default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Precision of the exported ONNX generator graphs: fp32; int8 (dynamically quantized weight "
                   "matmuls, ONNX Runtime); fp16 or bf16 (cast graphs with float32 norms, logits and sampler; bf16 "
                   "runs on GPUs only) [default: fp32, or the TensorRT --engine-precision when fp16/bf16].")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnx", show_default=True,
              help="onnx: ONNX files only; tensorrt: also build TensorRT engines (needs TensorRT and a GPU); "
                   "aoti: also compile AOTInductor packages (.pt2) with PyTorch.")
@click.option("--engine-precision", type=click.Choice(ENGINE_PRECISIONS), default=None,
              help="Precision of the TensorRT engines or AOTInductor packages (with --backend tensorrt|aoti; "
                   "default fp32): fp32 (TF32 off, exact), tf32, fp16 or bf16 (strongly typed engines from graphs "
                   "exported in that precision; the sampler stays fp32); aoti supports fp32 and bf16.")
@click.option("--aoti-device", type=click.Choice(AOTI_DEVICES), default=None,
              help="Device the AOTInductor packages are compiled for (with --backend aoti; default cpu).")
@click.option("--with-transformer", is_flag=True,
              help="Also export the raw-logits transformer graph (benchmarks, studies); it shares the weights file.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every component in ONNX Runtime against eager PyTorch, and seeded generations.")
@click.option("--class-names", default=None,
              help='Comma-separated class names in label order, for --labels by name (1000-class models know '
                   'the ImageNet names already).')
@click.option("--force", is_flag=True,
              help="Replace --out if it is a bundle (only once the new bundle is complete); never other folders.")
@one_line_errors
def build_engines(**flags):
    """Export the encoder, decoder and (with --generator) the generation step into a bundle."""
    names = flags.pop("class_names")
    try:
        job = ExportJob(**flags, class_names=[n.strip() for n in names.split(",")] if names else None)
    except ExportRuleError as exc:
        raise OptionsError(str(exc)) from None
    manifest = job.run(on_progress=lambda message: click.echo(f"  {message}", err=True))
    status = "verified" if manifest.verification.get("performed") else "NOT verified (--no-verify)"
    click.echo(f"wrote bundle {job.out} ({', '.join(sorted(manifest.components))}; {status})")
    sys.stdout.flush()
