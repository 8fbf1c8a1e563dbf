"""Chunks of a sample run (see `runs.py`): making one, writing, reading and verifying its file, and the claims
that let one process alone write each chunk.

    chunks/chunk_000012.npz     chunk 12: indices, labels, tokens, images, the run id and a sha256 checksum
    chunks/chunk_000012.lock    lock held by the process producing chunk 12 (two processes never both write it)

Files are written through `files.py` (a unique temporary name, then a rename); the npz files are written with
fixed zip timestamps, so equal runs give byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import MaskbitError
from .files import FileLock, atomic_write_bytes, remove_temporaries
from .run_spec import RunSpec, bundle_facts

CHUNK_DIR = "chunks"
CHUNK_KEYS = ("indices", "labels", "tokens", "images")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_LEFTOVER = re.compile(r"chunk_(\d{6,})\.lock|\.chunk_(\d{6,})\.npz\..*\.tmp(?:\..*)?", re.DOTALL)


class ChunkError(MaskbitError, RuntimeError):
    """A chunk file that should be complete is missing or fails verification."""


# -- making a chunk --------------------------------------------------------------------------------------------
def load_run_pipeline(bundle: str | Path, spec: RunSpec, backend: str = "ort", **options):
    """The Pipeline of `bundle`, refused unless it is the bundle the run was started with."""
    from .manifest import Manifest
    from .pipeline import Pipeline
    spec.check_bundle(bundle_facts(Manifest.load(bundle)), str(bundle))
    return Pipeline.load(bundle, backend=backend, **options)


def generate_chunk(pipe, spec: RunSpec, chunk: int, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens int64 [n,h,w] and images uint8 [n,H,W,3] of one chunk, with the run's settings (not the bundle's)."""
    span = spec.chunk_range(chunk)
    out = pipe.generate([int(x) for x in spec.labels[span.start:span.stop]], seed=spec.seed, first_index=span.start,
                        batch_size=batch_size, **spec.sampling.to_dict())
    return out.tokens, out.images


# -- chunk files -----------------------------------------------------------------------------------------------
def chunk_path(out: str | Path, chunk: int) -> Path:
    return Path(out) / CHUNK_DIR / f"chunk_{chunk:06d}.npz"


def write_chunk(out: str | Path, spec: RunSpec, chunk: int, tokens: np.ndarray, images: np.ndarray) -> Path:
    span = spec.chunk_range(chunk)
    arrays = {"indices": np.arange(span.start, span.stop, dtype=np.int64), "labels": spec.labels[span.start:span.stop],
              "tokens": np.ascontiguousarray(tokens, dtype=np.int64), "images": np.ascontiguousarray(images, np.uint8)}
    bad = shape_problem(spec, len(span), arrays)
    if bad:
        raise ChunkError(f"chunk {chunk}: generated {bad}")
    arrays["run_id"] = np.asarray(spec.run_id)
    arrays["checksum"] = np.asarray(checksum(spec.run_id, arrays))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(zip_info(name), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
    return atomic_write_bytes(chunk_path(out, chunk), buffer.getvalue())


def read_chunk(out: str | Path, spec: RunSpec, chunk: int) -> dict[str, np.ndarray]:
    """A chunk's arrays, verified (run id, indices, labels, shapes, checksum); ChunkError says what is wrong."""
    path = chunk_path(out, chunk)
    if not path.is_file():
        raise ChunkError(f"chunk {chunk} is missing ({path})")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in (*CHUNK_KEYS, "run_id", "checksum")}
    except Exception as exc:   # zipfile, numpy or OS errors: all mean an unreadable file
        raise ChunkError(f"chunk {chunk} is unreadable ({type(exc).__name__}: {exc})") from None
    span = spec.chunk_range(chunk)
    if str(arrays["run_id"]) != spec.run_id:
        raise ChunkError(f"chunk {chunk} belongs to another run")
    bad = shape_problem(spec, len(span), arrays)
    if bad:
        raise ChunkError(f"chunk {chunk} holds {bad}")
    if not np.array_equal(arrays["indices"], np.arange(span.start, span.stop)):
        raise ChunkError(f"chunk {chunk} holds the wrong image indices")
    if not np.array_equal(arrays["labels"], spec.labels[span.start:span.stop]):
        raise ChunkError(f"chunk {chunk} holds the wrong labels")
    if str(arrays["checksum"]) != checksum(spec.run_id, arrays):
        raise ChunkError(f"chunk {chunk} fails its checksum")
    return arrays


def chunk_problem(out: str | Path, spec: RunSpec, chunk: int) -> str | None:
    """None when the chunk is complete and verified, else why not ('missing', or what is wrong)."""
    if not chunk_path(out, chunk).is_file():
        return "missing"
    try:
        read_chunk(out, spec, chunk)
    except ChunkError as exc:
        return str(exc)
    return None


# -- claims ----------------------------------------------------------------------------------------------------
def try_claim(out: str | Path, chunk: int, blocking: bool = False) -> FileLock | None:
    """Lock chunk `chunk` for writing (None when another process holds it and `blocking` is False); temporary
    files a killed writer left behind are removed once the lock is held. The caller calls `release()`."""
    path = chunk_path(out, chunk)
    claim = FileLock(path.with_suffix(".lock"))
    if not claim.acquire(blocking):
        return None
    remove_temporaries(path)
    return claim


def clear_stale(out: str | Path) -> list[int]:
    """Remove the lock files and temporary chunk files that killed writers left in the run folder (of any chunk,
    whichever shard it belongs to): each chunk that has some is claimed without waiting, its temporaries removed
    and the claim released, which removes the lock file. Chunks another process holds are left alone. Returns the
    chunks cleared."""
    folder = Path(out) / CHUNK_DIR
    found = {int(m.group(1) or m.group(2)) for p in (folder.iterdir() if folder.is_dir() else ())
             if (m := _LEFTOVER.fullmatch(p.name))}
    cleared = []
    for chunk in sorted(found):
        claim = try_claim(out, chunk)
        if claim is not None:
            claim.release()
            cleared.append(chunk)
    return cleared


def claims(out: str | Path, spec: RunSpec, chunks: Sequence[int]) -> Iterator[tuple[int, FileLock]]:
    """The chunks still to make, each claimed. Chunks another process is making are left for last, then waited
    for; chunks found complete once claimed are skipped. What killed writers left is cleared first
    (`clear_stale`). The caller releases each claim."""
    clear_stale(out)
    deferred = []
    for blocking, todo in ((False, chunks), (True, deferred)):
        for chunk in todo:
            claim = try_claim(out, chunk, blocking)
            if claim is None:
                deferred.append(chunk)
            elif chunk_problem(out, spec, chunk) is None:
                claim.release()
            else:
                yield chunk, claim


# -- file contents ---------------------------------------------------------------------------------------------
def shape_problem(spec: RunSpec, n: int, arrays: Mapping[str, np.ndarray]) -> str | None:
    expected = {"indices": ((n,), np.int64), "labels": ((n,), np.int64),
                "tokens": ((n, *spec.token_shape), np.int64), "images": ((n, *spec.image_shape), np.uint8)}
    for key, (shape, dtype) in expected.items():
        if arrays[key].shape != tuple(shape) or arrays[key].dtype != dtype:
            return f"{key} {arrays[key].dtype}{list(arrays[key].shape)}, expected {np.dtype(dtype)}{list(shape)}"
    return None


def checksum(run_id: str, arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256(run_id.encode())
    for key in CHUNK_KEYS:
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.data)
    return digest.hexdigest()


def zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)   # fixed time: equal runs, equal bytes
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info
