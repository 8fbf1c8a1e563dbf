"""`maskbit-run`: generate, encode, decode, reconstruct and inspect with a bundle. Thin: parse, call, print."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click
import numpy as np

from .cli_common import (DEMO_BUNDLE, backend_option, batch_option, bundle_option, one_line_errors,  # noqa: F401
                         open_pipeline, sampling_options)
from .errors import InputError
from .files import atomic_file
from .runs_cli import sample_command
from .specs import STEP


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Run MaskBit bundles without PyTorch: generate images, encode, decode and reconstruct."""


main.add_command(sample_command)

plan_option = click.option("--plan", default=None, metavar="NAME",
                           help="One of the bundle's named sampling plans as the defaults (see `info`: plans); "
                                "sampling options still override it. Default: the bundle's own defaults.")


@main.command()
@bundle_option
@click.option("--labels", required=True,
              help='Comma-separated class indices or names, one image each: "1,7,282" or "goldfish,tiger cat".')
@plan_option
@sampling_options
@click.option("--seed", type=click.IntRange(0, 2 ** 63 - 1), default=0, show_default=True, help="Noise seed.")
@batch_option
@backend_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("maskbit_samples.png"), show_default=True,
              help="A .png file gets one grid; a directory gets one PNG per image.")
@one_line_errors
def generate(bundle, labels, plan, seed, batch_size, backend, out, **sampling):
    """Generate one image per label."""
    from tqdm import tqdm

    from .images import save_images
    from .labels import label_name, parse_labels
    with open_pipeline(bundle, backend) as pipe:
        pipe.use_plan(plan)
        label_ids = parse_labels(labels.split(","), pipe.num_classes, pipe.class_names)
        settings = pipe.sampling.with_overrides(**sampling)
        chunk = min(batch_size or pipe.manifest.max_batch(STEP.name), pipe.manifest.max_batch(STEP.name))
        total = settings.num_steps * -(-len(label_ids) // chunk)
        with tqdm(total=total, desc="unmasking", unit="step", file=sys.stderr, leave=False) as bar:
            result = pipe.generate(label_ids, seed=seed, batch_size=batch_size, on_step=lambda i: bar.update(),
                                   **settings.to_dict())
        names = [f"{i:03d}_{label_name(label, pipe.num_classes, pipe.class_names)}"
                 for i, label in enumerate(label_ids)]
        written = save_images(result.images, out, names)
    where = written[0] if len(written) == 1 else out
    click.echo(f"wrote {len(label_ids)} image(s) of {result.images.shape[1]}x{result.images.shape[2]} to {where}")


@main.command()
@bundle_option
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where to write the tokens (.npy).")
@batch_option
@backend_option
@one_line_errors
def encode(bundle, images, out, batch_size, backend):
    """Encode image files to token indices (int64 [B,h,w], saved with numpy)."""
    with open_pipeline(bundle, backend) as pipe:
        indices = pipe.encode(_load_images(images, pipe), batch_size)
    _save_npy(indices, out)
    click.echo(f"wrote tokens {list(indices.shape)} to {out}")


@main.command()
@bundle_option
@click.argument("tokens", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="A .png grid or a directory of PNGs.")
@batch_option
@backend_option
@one_line_errors
def decode(bundle, tokens, out, batch_size, backend):
    """Decode token indices (.npy, int [B,h,w]) to images."""
    from .images import save_images
    try:
        indices = np.load(tokens, allow_pickle=False)
    except (ValueError, OSError, MemoryError) as exc:      # MemoryError: a header that claims a huge shape
        raise InputError(f"cannot read tokens from {tokens}: {exc}") from None
    with open_pipeline(bundle, backend) as pipe:
        images = pipe.decode(indices, batch_size)
    save_images(images, out)
    click.echo(f"wrote {len(images)} image(s) to {out}")


@main.command()
@bundle_option
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="A .png grid (originals in the first row, reconstructions below) or a directory.")
@batch_option
@backend_option
@one_line_errors
def reconstruct(bundle, images, out, batch_size, backend):
    """Encode and decode image files (shows what the tokenizer keeps)."""
    from .images import save_images
    with open_pipeline(bundle, backend) as pipe:
        pixels = _load_images(images, pipe)
        recon = pipe.reconstruct(pixels, batch_size)
    save_images(np.concatenate([pixels, recon]), out, columns=len(pixels))
    click.echo(f"wrote {len(pixels)} reconstruction(s) to {out}")


@main.command()
@bundle_option
@click.option("--image", "image_path", required=True, type=click.Path(path_type=Path), help="Image file to encode.")
@click.option("--bits", default="all", show_default=True, help='Bits to flip: "all" or comma-separated indices "0,3".')
@backend_option
@click.option("--out", type=click.Path(path_type=Path), default=Path("bitflip.png"), show_default=True,
              help="Grid: original, reconstruction, then one column per flipped bit.")
@one_line_errors
def bitflip(bundle, image_path, bits, backend, out):
    """The paper's bit-flip experiment: flip bit i of every token and decode (bit-token bundles only)."""
    from .images import load_image, save_images
    with open_pipeline(bundle, backend) as pipe:
        image = load_image(image_path, pipe.manifest.dims.image_size)
        chosen = None if bits.strip() == "all" else [_int(b, "--bits") for b in bits.split(",")]
        grid = pipe.bitflip(image, chosen)
    save_images(grid, out, columns=len(grid))
    click.echo(f"wrote original, reconstruction and {len(grid) - 2} bit flip(s) to {out}")


def _int(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{option} expects integers, got {text!r}") from None


@main.command()
@bundle_option
@backend_option
@click.option("--count-transfers/--no-count-transfers", default=True, show_default=True,
              help="Run two tiny generations (one image, 2 and 3 steps) to count the host<->device copies and host "
                   "syncs a generation costs on this backend.")
@one_line_errors
def info(bundle, backend, count_transfers):
    """Print the bundle's components, sampling defaults, providers, versions and per-generation transfers."""
    with open_pipeline(bundle, backend) as pipe:
        click.echo(json.dumps(pipe.info(count_transfers=count_transfers), indent=2, default=str))


def _load_images(paths, pipe) -> np.ndarray:
    """Image files -> uint8 [B,H,W,3] at the bundle's resolution."""
    from .images import load_image
    return np.stack([load_image(path, pipe.manifest.dims.image_size) for path in paths])


def _save_npy(array: np.ndarray, out: Path) -> None:
    with atomic_file(out) as f:
        np.save(f, array)


@main.command()
@click.option("--bundle", "bundles", multiple=True, metavar="[NAME=]PATH",
              help="Bundle directory (default: the demo bundle). Repeat it to serve several side by side, each "
                   "named (--bundle fp32=B1 --bundle int8=B2; a plain PATH is named after its folder): requests "
                   "pick one with `model`, the page compares two.")
@plan_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port; the log says which).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Slots: images stepped together at most (default and upper limit: the bundle's max batch).")
@click.option("--max-queue", type=click.IntRange(min=0), default=256, show_default=True,
              help="Images that may wait for a slot; beyond it requests get 503 with Retry-After.")
@click.option("--max-images", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per request at most (more: 413).")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Deadline of a request in seconds, queued time included (a request may ask for less): 504.")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM, seconds the requests in flight get to finish (new ones are refused at once).")
@click.option("--policy", type=click.Choice(["step", "request", "single"]), default="step", show_default=True,
              help="When images join the batch: step = at any step boundary (step-level batching); request = "
                   "dynamic batches run to their end (request-level batching); single = one request at a time. "
                   "The last two are for comparisons (benchmarks/serve_load.py).")
@click.option("--batch-wait", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="With --policy request: seconds a dynamic batch waits to fill up.")
@click.option("--admission", type=click.Choice(["fifo", "shortest"]), default="fifo", show_default=True,
              help="With --policy step: which waiting requests take free slots first: in arrival order, or those "
                   "of fewest steps (can starve long requests under sustained load).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level (debug also logs every request).")
@click.option("--ray-serve", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Serve on Ray Serve: --replicas copies, each loading the bundle and running its own scheduler; "
                   "Ray Serve routes and restarts them. No ADDRESS: start a local Ray; 'auto' or ray://HOST:PORT: "
                   "join that cluster (the bundle path must exist on its nodes). Needs the extra [distributed].")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray-serve: how many replicas.")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="With --ray-serve: GPUs each replica reserves (fractions share a GPU).")
@click.option("--cpus-per-replica", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="With --ray-serve: CPUs each replica reserves (0: none); ONNX Runtime runs that many threads "
                   "(at least 1).")
@backend_option
@one_line_errors
def serve(bundles, plan, host, port, max_batch, max_queue, max_images, request_timeout, grace, policy, batch_wait,
          admission, log_level, ray_address, replicas, gpus_per_replica, cpus_per_replica, backend):
    """Serve the bundle over HTTP: POST /v1/generate (JSON or Server-Sent Events), /v1/models, /healthz, /readyz,
    /metrics, /docs. Images of all requests share steps (step-level batching) and equal `generate`'s byte for byte.
    Needs the extra [serve]; --ray-serve also [distributed]."""
    from .serve_models import parse_bundles
    named = parse_bundles(bundles)
    if ray_address is not None:
        from .cli_common import native_code_trust
        from .serve_ray import serve_on_ray
        if len(named) > 1:
            raise InputError("--ray-serve serves one bundle; give --bundle once")
        path = next(iter(named.values()), DEMO_BUNDLE)
        serve_on_ray(path, ray_address, host, port, replicas=replicas, backend=backend,
                     gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica, grace=grace,
                     log_level=log_level, load_options={**native_code_trust(), "plan": plan}, max_batch=max_batch,
                     max_queue=max_queue,
                     max_images=max_images, request_timeout=request_timeout, policy=policy, batch_wait=batch_wait,
                     admission=admission, on_ready=lambda url: click.echo(
                         f"serving {replicas} replica(s) on Ray Serve at {url} (Ctrl-C or SIGTERM stops)"))
        return
    from .serve_app import serve as run_server
    with contextlib.ExitStack() as stack:     # one bundle is served as one Pipeline, several as {name: Pipeline}
        named = named or {"": None}                                      # none: the demo bundle
        pipes = {name: stack.enter_context(open_pipeline(path, backend)).use_plan(plan) for name, path in named.items()}
        served = pipes if len(pipes) > 1 else pipes.popitem()[1]
        run_server(served, host=host, port=port, backend=backend, grace=grace, log_level=log_level,
                   max_batch=max_batch, max_queue=max_queue, max_images=max_images, request_timeout=request_timeout,
                   policy=policy, batch_wait=batch_wait, admission=admission)
