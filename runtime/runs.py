"""A sample run: many images, sharded and resumable, in the ADM evaluator's format (`maskbit-run sample`).

What decides the images is the run's description (`run_spec.RunSpec`); the run is cut into chunks of
`chunk_size` images (`chunks.py`), made here one after another or on Ray (`runs_ray.py`). The output folder:

    run.json                    the run: bundle identity, seed, labels, sampling settings, chunk size, shapes
    chunks/chunk_000012.npz     chunk 12: indices, labels, tokens, images, the run id and a sha256 checksum
    chunks/chunk_000012.lock    lock held by the process producing chunk 12 (two processes never both write it)
    samples.npz                 when every chunk exists: arr_0 uint8 [N,H,W,3] in image order, arr_1 labels
    png/000012_coffee.png       one file per image, on request

Every file is written through `files.py` (a unique temporary name, then a rename). The npz files are written
with fixed zip timestamps, so equal runs give byte-identical files.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .chunks import (CHUNK_DIR, chunk_path, chunk_problem, claims, clear_stale, generate_chunk, load_run_pipeline,
                     read_chunk, write_chunk, zip_info)
from .errors import InputError
from .files import atomic_file, atomic_write_json, exclusive_lock, remove_temporaries
from .run_spec import RunMismatchError, RunSpec, RunStats, bundle_facts, difference

RUN_FILE = "run.json"
RUN_LOCK = ".run.lock"
SAMPLES = "samples.npz"
PNG_DIR = "png"


OWN_NAMES = (RUN_FILE, RUN_LOCK, CHUNK_DIR, SAMPLES, PNG_DIR)


def open_run(out: str | Path, spec: RunSpec) -> RunSpec:
    """Record `spec` in `out`, or check that `out` holds the same run; another run is refused, naming the
    difference. A new run starts only in a missing or empty folder (or one holding only this tool's files), so
    nothing this tool did not write is overwritten, and a refused folder gets no file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a run folder")
    if out.is_dir() and not (out / RUN_FILE).exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_NAMES)
        if foreign or (out / SAMPLES).exists() or (out / PNG_DIR).exists():
            shown = ", ".join(foreign[:3] or [SAMPLES if (out / SAMPLES).exists() else PNG_DIR])
            raise RunMismatchError(f"{out} is not empty and holds no run ({shown}"
                                   f"{', ...' if len(foreign) > 3 else ''}); give a new or empty folder as --out")
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / RUN_LOCK):
        if (out / RUN_FILE).exists():
            there = load_run(out)
            diff = difference(there, spec)
            if diff:
                raise RunMismatchError(f"{out} holds another run's chunks ({diff}); use another --out, "
                                       f"or remove {out} to start over")
            return there
        if (out / CHUNK_DIR).is_dir() and any((out / CHUNK_DIR).glob("chunk_*.npz")):
            raise RunMismatchError(f"{out} holds chunk files but no {RUN_FILE}; use another --out")
        atomic_write_json(out / RUN_FILE, spec.to_json())
        return spec


def load_run(out: str | Path) -> RunSpec:
    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise InputError(f"{out} holds no run ({RUN_FILE} is missing): give --per-class K or --labels to start one")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is damaged: {exc}") from None
    return RunSpec.from_json(data, str(path))


def shard_chunks(spec: RunSpec, shard: tuple[int, int] | None = None) -> list[int]:
    """Shard (i, n) of a run, 0 <= i < n, takes chunks i, i+n, i+2n, ..."""
    index, count = shard or (0, 1)
    if count < 1 or not 0 <= index < count:
        raise InputError(f"--shard {index}/{count}: the shard index must be in 0..n-1 and n >= 1")
    return list(range(index, spec.num_chunks, count))


def run_shard(out: str | Path, spec: RunSpec, bundle: str | Path, *, shard: tuple[int, int] | None = None,
              batch_size: int | None = None, backend: str = "ort", ray_address: str | None = None,
              workers: int | None = None, gpus_per_worker: float = 0, png: bool = False,
              on_chunk: Callable[[int], None] | None = None, on_plan: Callable[[int], None] | None = None,
              on_workers: Callable[[list[int]], None] | None = None, trust_native_code: bool = False,
              trusted_hashes=None) -> RunStats:
    """Make this shard's missing or broken chunks (locally or on Ray), then merge if the whole run exists.
    No `shard` means the whole run. `on_plan(images to make)` is called once, `on_chunk(images)` after every
    chunk written. `trust_native_code`/`trusted_hashes`: see `maskbit_runtime.trust` (checked before anything
    is written)."""
    if ray_address is None and workers not in (None, 1):
        raise InputError("--workers needs --ray; without Ray run one process per --shard i/n instead")
    if spec.backend != backend:
        raise RunMismatchError(f"the run is made with backend {spec.backend}, not {backend}; add --backend "
                               f"{spec.backend}")
    shard_chunks(spec, shard)
    check_run_bundle(spec, bundle)
    trust = _trust(backend, bundle, trust_native_code, trusted_hashes)
    if ray_address is not None:                 # fail fast: Ray missing or the address unreachable
        from .runs_ray import check_address
        check_address(ray_address)
    spec = open_run(out, spec)
    clear_stale(out)                   # a killed shard's chunk locks and temporaries, even when nothing is left
    chunks = shard_chunks(spec, shard)
    stats = RunStats(chunks=len(chunks))
    for chunk in chunks:
        problem = chunk_problem(out, spec, chunk)
        if problem is None:
            stats.kept += 1
        elif problem != "missing":
            stats.redone[chunk] = problem
    todo = [c for c in chunks if c in stats.redone or not chunk_path(out, c).is_file()]
    if on_plan:
        on_plan(sum(len(spec.chunk_range(c)) for c in todo))
    if todo and ray_address is not None:
        from .runs_ray import run_on_ray
        run_on_ray(out, spec, todo, bundle, stats, backend=backend, batch_size=batch_size, address=ray_address,
                   workers=workers, gpus_per_worker=gpus_per_worker, on_chunk=on_chunk, on_workers=on_workers,
                   options=trust)
    elif todo:
        _run_here(out, spec, todo, bundle, stats, backend, batch_size, on_chunk, trust)
    stats.missing = sum(not chunk_path(out, c).is_file() for c in range(spec.num_chunks))
    if stats.missing == 0:
        stats.samples = str(merge(out, spec, png=png))
    return stats


def check_run_bundle(spec: RunSpec, bundle: str | Path) -> None:
    """Refuse a bundle that is not the run's, before anything is written (and even when nothing is left to make)."""
    from .manifest import Manifest
    spec.check_bundle(bundle_facts(Manifest.load(bundle)), str(bundle))


def _trust(backend: str, bundle, trust_native_code: bool, trusted_hashes) -> dict:
    """The backend options that carry the user's trust, checked now against the bundle; an allow-list file is
    read here, so workers on other machines get its hashes."""
    from .manifest import Manifest
    from .trust import NATIVE_FILES, check_native_code, read_trusted_hashes
    if backend not in NATIVE_FILES:
        return {}
    check_native_code(backend, Manifest.load(bundle), trust_native_code, trusted_hashes)
    hashes = None if trusted_hashes is None else sorted(read_trusted_hashes(trusted_hashes))
    return {"trust_native_code": bool(trust_native_code), "trusted_hashes": hashes}


def _run_here(out, spec, todo, bundle, stats, backend, batch_size, on_chunk, options) -> None:
    with load_run_pipeline(bundle, spec, backend, **options) as pipe:
        start = time.perf_counter()
        for chunk, claim in claims(out, spec, todo):
            try:
                t0 = time.perf_counter()
                tokens, images = generate_chunk(pipe, spec, chunk, batch_size)
                stats.compute_s += time.perf_counter() - t0
                write_chunk(out, spec, chunk, tokens, images)
            finally:
                claim.release()
            stats.generated.append(chunk)
            if on_chunk:
                on_chunk(len(tokens))
        stats.wall_s = time.perf_counter() - start


def merge(out: str | Path, spec: RunSpec, png: bool = False) -> Path:
    """samples.npz from every chunk (each verified): arr_0 uint8 [N,H,W,3] in image order, arr_1 int64 labels.
    Streamed chunk by chunk, so memory holds one chunk, not the whole array."""
    out = Path(out)
    target = out / SAMPLES
    with exclusive_lock(out / RUN_LOCK):
        remove_temporaries(target)     # what a merge killed midway left; the run lock makes this the only writer
        with atomic_file(target) as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(zip_info("arr_0"), "w", force_zip64=True) as f:
                header = {"descr": "|u1", "fortran_order": False, "shape": (spec.num_images, *spec.image_shape)}
                np.lib.format.write_array_header_1_0(f, header)
                for chunk in range(spec.num_chunks):
                    arrays = read_chunk(out, spec, chunk)
                    f.write(arrays["images"].tobytes())
                    if png:
                        _write_pngs(out / PNG_DIR, spec, arrays)
            with zf.open(zip_info("arr_1"), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, spec.labels, allow_pickle=False)
    return target


def _write_pngs(folder: Path, spec: RunSpec, arrays: dict) -> None:
    from .images import safe_filename, save_png
    for index, label, image in zip(arrays["indices"], arrays["labels"], arrays["images"]):
        name = spec.class_names[label] if label < len(spec.class_names) else str(label)
        path = folder / f"{index:06d}_{safe_filename(name)}.png"
        if not path.exists():
            save_png(image, path)
