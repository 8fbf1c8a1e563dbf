"""Writing files so that readers never see half of one: atomic files, atomic directories and exclusive locks.

Every writer of the toolkit goes through this module. Pure Python (no numpy, no torch), so every package may
import it.

- `atomic_file(path)` / `atomic_write_bytes|text|json(path, ...)`: the content is written to a unique temporary
  file next to `path` (`.<name>.<random>.tmp`, made by `tempfile`), flushed to disk and renamed over `path`. Two
  writers of one target never share a temporary file; the last rename wins and the target is always one whole
  version. When writing fails, the old file is left as it was and the temporary file is removed.
- `atomic_output(path)`: the same for libraries that want a file name rather than a file object
  (safetensors `save_file`, `np.savez`, the ONNX Runtime quantizer).
- `atomic_directory(path)`: a folder is built under a unique `.<name>.<random>.partial` folder in the same parent
  and renamed into place when complete; removed again when building fails.
- `FileLock(path)` / `exclusive_lock(path)`: an exclusive `flock` on `path` (a lock file), released and the file
  removed on exit. Processes and threads exclude each other alike (each holder opens its own descriptor).

Temporary names carry the target's name, so `remove_temporaries(path)` can clear what a killed writer left.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import MaskbitError

TMP_SUFFIX = ".tmp"
PARTIAL_SUFFIX = ".partial"


class LockBusyError(MaskbitError, RuntimeError):
    """Another holder has the lock and the caller asked not to wait."""


class StrictJsonError(MaskbitError, ValueError):
    """A value JSON cannot hold (NaN, infinity) was to be written."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()     # read once at import: os.umask can only be read by setting it, which is not thread-safe


def _temporary_file(path: Path) -> tuple[int, Path]:
    """A unique temporary file next to `path`, with the permissions a plain open() gives (mkstemp makes 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, Path(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """`with atomic_file(p) as f: f.write(...)`: `p` gets the whole content on success and is untouched on failure."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_file(path)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding or "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A unique temporary file name for a library that writes by name; renamed over `path` when the block ends
    without an error, removed otherwise. The name ends like `path` (`np.savez` adds `.npz` to other names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{TMP_SUFFIX}{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1, sort_keys: bool = True) -> Path:
    """Strict JSON, newline-terminated: NaN and infinity are refused (StrictJsonError) before anything is written."""
    try:
        text = json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=False)
    except ValueError as exc:
        raise StrictJsonError(f"cannot write {path}: {exc} (JSON has no NaN or infinity)") from None
    return atomic_write_text(path, text + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Build a folder in the yielded temporary folder; it becomes `path` when the block ends without an error.
    An existing `path` is refused (FileExistsError) unless `replace`, which moves it aside, renames the new
    folder in and then removes the old one. The temporary folder is removed when building fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)         # mkdtemp makes 0700
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            if not replace:
                raise FileExistsError(f"{path} already exists")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)          # onto an empty folder: allowed for a folder, refused for a file
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)      # put the old one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class StagedFiles:
    """Several files built under unique temporary names and renamed into place one by one once all of them exist
    (`with StagedFiles() as staged: tmp = staged.path(target) ... staged.commit(target)`); whatever was not
    committed is removed when the block ends."""

    def __init__(self):
        self._pending: dict[Path, Path] = {}

    def path(self, target: str | os.PathLike) -> Path:
        target = Path(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f"{TMP_SUFFIX}{target.suffix}", dir=target.parent)
        os.close(fd)
        self._pending[target] = Path(tmp)
        return Path(tmp)

    def commit(self, target: str | os.PathLike) -> Path:
        target = Path(target)
        tmp = self._pending.pop(target)
        os.chmod(tmp, 0o666 & ~_UMASK)
        _fsync_file(tmp)
        os.replace(tmp, target)
        _fsync_directory(target.parent)
        return target

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc) -> None:
        for tmp in self._pending.values():
            tmp.unlink(missing_ok=True)
        self._pending.clear()


def is_temporary_of(name: str, target: str) -> bool:
    """Whether a file or folder `name` is a temporary this module made for `target`: `.<target>.<random>` then
    `.tmp` (with the target's suffix after it) or `.partial`, the random part without dots, so the temporaries of
    another target whose name starts with this one's (`bundle.v2` for `bundle`) never match."""
    pattern = rf"\.{re.escape(target)}\.[A-Za-z0-9_]+({re.escape(TMP_SUFFIX)}(\..*)?|{re.escape(PARTIAL_SUFFIX)})"
    return re.fullmatch(pattern, name, re.DOTALL) is not None


def remove_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders writers of `path` left behind (a killed process). Call it only
    while holding the lock that makes you the one writer of `path`."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if is_temporary_of(stale.name, path.name):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


class FileLock:
    """An exclusive lock on the file `path` (created when missing, removed on release).

    `acquire(blocking=False)` returns False when another holder has it. Removing the file on release is safe:
    a waiter that locked the removed file sees that it is no longer the file at `path` and tries again.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> bool:
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:                      # still the lock file on disk, not one a releasing holder removed
                self._fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()            # while held: no one else holds this file's lock
        os.close(self._fd)                # closing the descriptor drops the lock
        self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()                    # blocks until held
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, blocking: bool = True, busy: str | None = None) -> Iterator[FileLock]:
    """Hold the lock `path` for the block; without `blocking`, LockBusyError (message `busy`) when it is taken."""
    lock = FileLock(path)
    if not lock.acquire(blocking):
        raise LockBusyError(busy or f"{path} is locked by another process")
    try:
        yield lock
    finally:
        lock.release()


def writer_lock(target: str | os.PathLike, busy: str) -> contextlib.AbstractContextManager[FileLock]:
    """The lock that makes this process the one writer of `target` (a file or a folder): `.<name>.lock` beside
    it, taken without waiting (LockBusyError with `busy` when another process holds it)."""
    target = Path(target)
    return exclusive_lock(target.parent / f".{target.name}.lock", blocking=False, busy=busy)


def _fsync_file(path: Path) -> None:
    """Flush a file written by name (by a library) to the disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in `folder` durable (a power loss after it keeps the new file, not an empty one)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:          # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)
