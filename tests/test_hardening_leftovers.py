"""What killed writers leave behind is cleaned by the next writer, once it holds the lock that makes it the only one:
an export's `.<out>.<random>.partial` folder and temporary files (its lock file is reused), and a sample run's
chunk locks and temporary chunk files, whichever shard they belong to. Nothing else is touched."""

import os
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskbit_runtime.chunks import CHUNK_DIR, clear_stale
from maskbit_runtime.cli import main as run_cli
from maskbit_runtime.files import FileLock
from maskbit_runtime.manifest import Manifest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SAMPLE = ["--labels", "1,2", "--num-steps", "2", "--chunk-size", "1"]


def export_args(checkpoints: Path, out: Path) -> list[str]:
    return ["build-engines", "--tokenizer", str(checkpoints / "tok.safetensors"), "--generator",
            str(checkpoints / "gen.safetensors"), "--max-batch", "2", "--no-verify", "--out", str(out)]


def test_a_killed_export_leaves_nothing_after_the_next_one(checkpoints, tmp_path):
    """Old code: the killed export's .B.<random>.partial folder (a whole half-written bundle) stayed forever."""
    out = tmp_path / "B"
    killed = subprocess.Popen([sys.executable, "-c", "from maskbit_export.cli import main; main()",
                               *export_args(checkpoints, out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not any(p.is_file() for p in tmp_path.glob(".B.*.partial/*.onnx")):
            assert killed.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert ".B.lock" in left and any(name.endswith(".partial") for name in left), left
    (tmp_path / ".B.x7f3.tmp").write_bytes(b"half a file")          # what a killed atomic write leaves
    (tmp_path / ".C.x7f3.partial").mkdir()                           # another target's: not this export's to remove
    from maskbit_export.cli import main as export_cli
    result = CliRunner().invoke(export_cli, export_args(checkpoints, out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".C.x7f3.partial", "B"]
    assert Manifest.load(out).complete


def sample(out: Path, *args):
    return CliRunner().invoke(run_cli, ["sample", "--out", str(out), *SAMPLE, *map(str, args)])


def test_stale_chunk_locks_and_temporaries_of_any_shard_are_cleared(tmp_path):
    """A writer of chunk 0 killed after its file was renamed in (lock left) and another killed mid-write (temporary
    left): old code left both when the next process was shard 1/2 (it claims chunk 1 only), forever."""
    out = tmp_path / "run"
    assert sample(out, "--shard", "0/2").exit_code == 0
    chunks = out / CHUNK_DIR
    (chunks / "chunk_000000.lock").write_bytes(b"")
    (chunks / ".chunk_000000.npz.k2j4x.tmp").write_bytes(b"half a chunk")
    (chunks / ".chunk_000007.npz.k2j4x.tmp.npz").write_bytes(b"half a chunk")      # a chunk of no one left
    result = sample(out, "--shard", "1/2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in chunks.iterdir()) == ["chunk_000000.npz", "chunk_000001.npz"]
    assert (out / "samples.npz").is_file()


def test_a_finished_run_clears_stale_locks_and_merge_temporaries(tmp_path):
    """Nothing left to make: old code never claimed a chunk, so a lock a killed writer left after its chunk was
    renamed in stayed; and the temporary of a merge killed midway stayed beside samples.npz."""
    out = tmp_path / "run"
    assert sample(out).exit_code == 0
    (out / CHUNK_DIR / "chunk_000001.lock").write_bytes(b"")
    (out / ".samples.npz.q9z1.tmp.npz").write_bytes(b"half a merge")
    result = sample(out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / CHUNK_DIR).iterdir()) == ["chunk_000000.npz", "chunk_000001.npz"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".samples.npz")]


def test_a_chunk_another_process_holds_is_left_alone(tmp_path):
    """Control: a live writer's lock and temporary file survive the sweep."""
    chunks = tmp_path / CHUNK_DIR
    chunks.mkdir()
    live = FileLock(chunks / "chunk_000003.lock")
    assert live.acquire(blocking=False)
    try:
        (chunks / ".chunk_000003.npz.abc.tmp").write_bytes(b"being written")
        (chunks / "chunk_000004.lock").write_bytes(b"")
        assert clear_stale(tmp_path) == [4]
        assert sorted(p.name for p in chunks.iterdir()) == [".chunk_000003.npz.abc.tmp", "chunk_000003.lock"]
    finally:
        live.release()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=30))
def test_the_sweep_removes_nothing_but_chunk_leftovers(tmp_path_factory, name):
    """Any file in chunks/ that is not a chunk lock or a chunk's temporary (chunk files included) stays."""
    import re
    chunks = tmp_path_factory.mktemp("s") / CHUNK_DIR
    chunks.mkdir()
    if name in (".", ".."):
        return
    (chunks / name).write_bytes(b"mine")
    (chunks / "chunk_000001.npz").write_bytes(b"a chunk")
    clear_stale(chunks.parent)
    leftover = re.fullmatch(r"chunk_(\d{6,})\.lock|\.chunk_(\d{6,})\.npz\..*\.tmp(\..*)?", name)
    digits = leftover and (leftover.group(1) or leftover.group(2))
    removed = bool(digits) and digits == f"{int(digits):06d}"        # the names chunk_path gives chunk int(digits)
    assert (chunks / name).exists() == (not removed)
    assert (chunks / "chunk_000001.npz").read_bytes() == b"a chunk"


def test_engine_and_package_builds_take_the_bundle_lock_and_clear_killed_builds(tmp_path):
    """Old code: build_engines/build_aoti on an existing bundle took no lock (two builds raced on the same files)
    and left a killed build's staged plans and packages in the bundle forever."""
    import shutil

    from maskbit_export.aoti import build_aoti
    from maskbit_export.tensorrt import build_engines
    from maskbit_runtime.cli_common import DEMO_BUNDLE
    from maskbit_runtime.errors import MaskbitError
    bundle = tmp_path / "B"
    shutil.copytree(DEMO_BUNDLE, bundle)
    stale = [bundle / ".step.engine.k2j4x.tmp.engine", bundle / ".decoder.pt2.k2j4x.tmp.pt2",
             bundle / ".tensorrt.timing-cache.k2j4x.tmp"]
    for path in stale:
        path.write_bytes(b"half a build")
    lock = FileLock(tmp_path / ".B.lock")
    assert lock.acquire(blocking=False)
    try:
        for build in (lambda: build_engines(bundle), lambda: build_aoti(bundle, None, None)):
            with pytest.raises(MaskbitError, match="another export is writing"):
                build()
        assert all(path.exists() for path in stale)              # nothing touched while another writer holds it
    finally:
        lock.release()
    with pytest.raises(Exception):                                # no TensorRT here: fails after the cleanup
        build_engines(bundle)
    with pytest.raises(Exception):                                # no generator given: fails after the cleanup
        build_aoti(bundle, None, None, components=("nothing",))
    assert not any(path.exists() for path in stale)
