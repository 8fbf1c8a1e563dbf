"""`maskbit-export build-engines`: checkpoints + config -> a verified bundle. Thin: parse, call, print."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from maskbit_runtime.cli import one_line_errors
from maskbit_runtime.errors import MaskbitError

from .bundle import PRECISIONS
from .onnx_export import DEFAULT_OPSET
from .tensorrt import PRECISIONS as ENGINE_PRECISIONS

AOTI_DEVICES = ("cpu", "cuda")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Export MaskBit models to ONNX (and TensorRT) bundles that `maskbit-run` executes."""


@main.command("build-engines")
@click.option("--tokenizer", "tokenizer_ckpt", required=True,
              help="Tokenizer checkpoint: official .bin, our .safetensors, or hf://owner/repo[/file].")
@click.option("--generator", "generator_ckpt", default=None,
              help="Generator checkpoint (same forms). Without it the bundle can only encode and decode.")
@click.option("--config", default=None,
              help="Official YAML or preset name (see `maskbit.PRESETS`); optional for our safetensors files.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle directory to create.")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Largest batch of the dynamic batch profile; bigger requests are split by the runtime.")
@click.option("--opt-batch", type=click.IntRange(1, 4096), default=None,
              help="The batch TensorRT engines are tuned for (the profile's optimum): the batch you will run "
                   "[default: --max-batch].")
@click.option("--opset", type=click.IntRange(min=17), default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Precision of the exported ONNX generator graphs: fp32; int8 (dynamically quantized weight "
                   "matmuls, ONNX Runtime); fp16 or bf16 (cast graphs with float32 norms, logits and sampler; bf16 "
                   "runs on GPUs only) [default: the --engine-precision when fp16/bf16, else fp32].")
@click.option("--backend", type=click.Choice(["onnx", "tensorrt", "aoti"]), default="onnx", show_default=True,
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
def build_engines(tokenizer_ckpt, generator_ckpt, config, out, max_batch, opt_batch, opset, precision, backend,
                  engine_precision, aoti_device, with_transformer, verify, class_names, force):
    """Export the encoder, decoder and (with --generator) the generation step into a bundle."""
    if opt_batch is not None and opt_batch > max_batch:
        raise click.UsageError(f"--opt-batch {opt_batch} is larger than --max-batch {max_batch}")
    if engine_precision is not None and backend == "onnx":
        raise click.UsageError("--engine-precision applies to engines: add --backend tensorrt or aoti")
    if aoti_device is not None and backend != "aoti":
        raise click.UsageError("--aoti-device applies to AOTInductor packages: add --backend aoti")
    if backend == "aoti" and engine_precision not in (None, "fp32", "bf16"):
        raise click.UsageError(f"--backend aoti supports --engine-precision fp32 or bf16, not {engine_precision}")
    precision = _graph_precision(precision, backend, engine_precision)
    if backend == "tensorrt":       # fail before the long ONNX export when engines cannot be built here
        from maskbit_runtime.backends.tensorrt import import_tensorrt
        import_tensorrt()
    if backend == "aoti" and aoti_device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise click.ClickException("--aoti-device cuda needs a CUDA GPU visible to PyTorch")
    import maskbit

    from .bundle import ExportOptions, build_bundle
    options = ExportOptions(max_batch=max_batch, opt_batch=opt_batch, opset=opset, precision=precision, verify=verify,
                            with_transformer=with_transformer)
    tokenizer = maskbit.load_tokenizer(tokenizer_ckpt, config)
    generator = maskbit.load_generator(generator_ckpt, config) if generator_ckpt else None
    name = maskbit.resolve_config(config).name if config else ""
    provenance = {"tokenizer": str(tokenizer_ckpt), "generator": str(generator_ckpt) if generator_ckpt else None,
                  "config": str(config) if config else None}
    names = [n.strip() for n in class_names.split(",")] if class_names else None
    manifest = build_bundle(out, tokenizer, generator, options=options, name=name, class_names=names,
                            provenance=provenance, force=force,
                            on_progress=lambda message: click.echo(f"  {message}", err=True))
    if backend in ("tensorrt", "aoti"):   # a failed build keeps the verified ONNX bundle, without engine entries
        try:
            if backend == "aoti":
                from .aoti import build_aoti
                manifest = build_aoti(out, tokenizer, generator, device=aoti_device or "cpu",
                                      precision=engine_precision or "fp32", verify=verify,
                                      on_progress=lambda m: click.echo(f"  {m}", err=True))
            else:
                from .tensorrt import build_engines as build_trt
                manifest = build_trt(out, precision=engine_precision or "fp32",
                                     on_progress=lambda m: click.echo(f"  {m}", err=True))
        except (MaskbitError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise click.ClickException(f"{reason} (the ONNX bundle {out} is complete and runs with the ort "
                                       f"backend)") from None
    status = "verified" if manifest.verification.get("performed") else "NOT verified (--no-verify)"
    click.echo(f"wrote bundle {out} ({', '.join(sorted(manifest.components))}; {status})")
    sys.stdout.flush()


def _graph_precision(precision: str | None, backend: str, engine_precision: str | None) -> str:
    """The ONNX precision to export: what was asked for, checked against what TensorRT engines of
    `engine_precision` need (strongly typed engines compute in their graphs' types)."""
    if backend != "tensorrt":
        return precision or "fp32"
    needed = engine_precision if engine_precision in ("fp16", "bf16") else "fp32"
    if precision not in (None, needed):
        raise click.UsageError(f"--engine-precision {engine_precision or 'fp32'} builds from {needed} graphs; drop "
                               f"--precision {precision} or pass --precision {needed}")
    return needed
