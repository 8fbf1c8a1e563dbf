"""`maskbit-export build-engines`: checkpoints + config -> a verified bundle. Thin: parse, call, print."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from maskbit_runtime.cli import one_line_errors

from .bundle import PRECISIONS
from .onnx_export import DEFAULT_OPSET


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
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Largest batch of the dynamic batch profile; bigger requests are split by the runtime.")
@click.option("--opset", type=click.IntRange(min=17), default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Numeric precision of the exported graphs.")
@click.option("--backend", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True,
              help="onnx: ONNX files only; tensorrt: also build TensorRT engines (needs TensorRT and a GPU).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every component in ONNX Runtime against eager PyTorch, and a seeded generation.")
@click.option("--class-names", default=None,
              help='Comma-separated class names in label order, for --labels by name (1000-class models know '
                   'the ImageNet names already).')
@click.option("--force", is_flag=True, help="Replace --out if it exists (only once the new bundle is complete).")
@one_line_errors
def build_engines(tokenizer_ckpt, generator_ckpt, config, out, max_batch, opset, precision, backend, verify,
                  class_names, force):
    """Export the encoder, decoder and (with --generator) the generation step into a bundle."""
    import maskbit

    from .bundle import build_bundle
    tokenizer = maskbit.load_tokenizer(tokenizer_ckpt, config)
    generator = maskbit.load_generator(generator_ckpt, config) if generator_ckpt else None
    cfg = maskbit.resolve_config(config) if config else maskbit.ModelConfig(tokenizer=tokenizer.config)
    if config is None and generator is not None:
        cfg = maskbit.ModelConfig(tokenizer=tokenizer.config, generator=generator.config,
                                  sampling=generator.sampling_config)
    provenance = {"tokenizer": str(tokenizer_ckpt), "generator": str(generator_ckpt) if generator_ckpt else None,
                  "config": str(config) if config else None}
    manifest = build_bundle(out, tokenizer, generator, cfg, max_batch=max_batch, opset=opset, precision=precision,
                            verify=verify, force=force, provenance=provenance,
                            class_names=[n.strip() for n in class_names.split(",")] if class_names else None,
                            on_progress=lambda message: click.echo(f"  {message}", err=True))
    if backend == "tensorrt":       # a failed engine build keeps the verified ONNX bundle, without engine entries
        from .tensorrt import build_engines as build_trt
        try:
            manifest = build_trt(out, precision=precision, on_progress=lambda m: click.echo(f"  {m}", err=True))
        except (RuntimeError, ValueError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise click.ClickException(f"{reason} (the ONNX bundle {out} is complete and runs with the ort "
                                       f"backend)") from None
    report = manifest.data["verification"]
    status = "verified" if report.get("performed") else "NOT verified (--no-verify)"
    click.echo(f"wrote bundle {out} ({', '.join(sorted(manifest.components))}; {status})")
    sys.stdout.flush()
