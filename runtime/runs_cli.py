"""`maskbit-run sample`: many images, sharded, resumable, on Ray if asked; the library is `maskbit_runtime.runs`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli_common import DEMO_BUNDLE, backend_option, batch_option, bundle_option, native_code_trust, one_line_errors
from .errors import InputError


@click.command("sample")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run folder: run.json, chunks/, then samples.npz (and png/ with --png).")
@bundle_option
@click.option("--per-class", type=click.IntRange(min=1), default=None,
              help="Images per class (image i gets class i mod C: every prefix is balanced).")
@click.option("--classes", default=None, help="With --per-class: comma-separated classes (default: all).")
@click.option("--labels", default=None, help="One image per comma-separated label (indices or class names).")
@click.option("--num-steps", type=click.IntRange(min=1), default=None, help="Unmasking steps (default: bundle's).")
@click.option("--guidance-scale", type=float, default=None, help="Classifier-free guidance (default: bundle's).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Noise seed of the run (default 0).")
@batch_option
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Images per chunk file, the unit of work, retry and resume (default 64).")
@click.option("--shard", default=None, metavar="i/n", help="Make only chunks i, i+n, ... (one job of n).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on Ray: alone, start a local Ray; with ADDRESS (host:port, ray://host:port, auto) join it.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray actors, each holding a loaded pipeline (default: one per CPU, or per GPU share).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs Ray reserves for each actor.")
@click.option("--png", is_flag=True, help="Also write png/NNNNNN_class.png for every image.")
@backend_option
@one_line_errors
def sample_command(out, bundle, per_class, classes, labels, num_steps, guidance_scale, seed, batch_size, chunk_size,
           shard, ray_address, workers, gpus_per_worker, png, backend):
    """Generate many images (for example 50 per class) in chunks, resumably, into samples.npz (ADM format).

    Rerunning the same command skips verified chunks and redoes missing or broken ones; `sample --out DIR`
    alone resumes or merges the run recorded in DIR (after --shard jobs, for example)."""
    from tqdm import tqdm

    from .runs import run_shard
    shard_spec = parse_shard(shard) if shard is not None else None
    spec, bundle_path = _spec(out, bundle, per_class, classes, labels, num_steps, guidance_scale, seed, chunk_size,
                              backend)
    bars = []          # images/s and ETA, shown only when there is work

    def plan(n):
        if n:
            bars.append(tqdm(total=n, desc="sampling", unit="img", file=sys.stderr, dynamic_ncols=True))
    try:
        stats = run_shard(out, spec, bundle_path, shard=shard_spec, batch_size=batch_size, backend=backend,
                    ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker, png=png,
                    on_chunk=lambda n: bars[0].update(n), on_plan=plan,
                    on_workers=lambda pids: bars[0].reset(total=bars[0].total),   # rate without Ray's start-up
                    **native_code_trust())
    finally:
        for bar in bars:
            bar.close()
    for chunk, problem in stats.redone.items():
        click.echo(f"redid chunk {chunk}: {problem}", err=True)
    made = f"{len(stats.generated)} chunk(s) made, {stats.kept} verified and kept"
    if stats.generated and stats.wall_s > 0:
        images = sum(len(spec.chunk_range(c)) for c in stats.generated)
        made += f", {images / stats.wall_s:.2f} images/s on {stats.workers} worker(s)"
    if stats.samples:
        click.echo(f"{made}; wrote {spec.num_images} images to {stats.samples}")
    else:
        click.echo(f"{made}; {stats.missing} of {spec.num_chunks} chunks still missing (other shards): "
                   f"run `maskbit-run sample --out {out}` once they are done")


def _spec(out, bundle, per_class, classes, labels, num_steps, guidance_scale, seed, chunk_size, backend):
    """The run asked for on the command line, or the one recorded in `out` when no labels are given."""
    from .manifest import Manifest
    from .run_spec import DEFAULT_CHUNK_SIZE, bundle_facts, make_spec
    from .runs import load_run
    if per_class is None and labels is None:
        if classes is not None:
            raise InputError("--classes needs --per-class K")
        spec = load_run(out)       # resume / merge: every unset option comes from the recorded run
        asked = {"seed": seed, "chunk_size": chunk_size}
        for key, value in asked.items():
            if value is not None and value != getattr(spec, key):
                raise InputError(f"{out} holds a run with {key} {getattr(spec, key)}, not {value}")
        for key, value in {"num_steps": num_steps, "guidance_scale": guidance_scale}.items():
            if value is not None and not value == getattr(spec.sampling, key):
                raise InputError(f"{out} holds a run with {key} {getattr(spec.sampling, key)}, not {value}")
        if backend != spec.backend:
            raise InputError(f"{out} holds a run made with backend {spec.backend}: add --backend {spec.backend}")
        return spec, bundle or Path(spec.bundle_path)
    if per_class is not None and labels is not None:
        raise InputError("give --per-class K (with --classes) or --labels, not both")
    bundle = bundle or DEMO_BUNDLE
    manifest = Manifest.load(bundle)
    facts = bundle_facts(manifest)
    if labels is not None:
        if classes is not None:
            raise InputError("--classes goes with --per-class, not --labels")
        plan = {"labels": _parse(labels, facts, "--labels")}
    else:
        chosen = _parse(classes, facts, "--classes") if classes else list(range(facts["num_classes"] or 0))
        if not chosen:
            raise InputError("this bundle has no class count; give --classes")
        plan = {"per_class": per_class, "classes": chosen}
    return make_spec(manifest, plan, seed=seed or 0, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE, backend=backend,
                     num_steps=num_steps, guidance_scale=guidance_scale), bundle


def _parse(text: str, facts: dict, option: str) -> list[int]:
    from .labels import parse_labels
    try:
        return [int(x) for x in parse_labels(text.split(","), facts["num_classes"], facts["class_names"] or None)]
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(f"{option}: {exc}") from None


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (0 <= i < n) -> (i, n)."""
    parts = str(text).split("/")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise InputError(f"--shard expects i/n with 0 <= i < n (for example 0/4), got {text!r}")
    index, count = int(parts[0]), int(parts[1])
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {text}: the shard index must be in 0..n-1 and n >= 1")
    return index, count
