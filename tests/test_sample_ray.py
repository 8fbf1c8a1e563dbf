"""`maskbit-run sample --ray` on a local Ray of 2 CPU workers: the same bytes as one process, even when an actor
is killed mid-run."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
from click.testing import CliRunner
from test_sample import RUN_ARGS, demo_spec, make_reference

from maskbit_runtime.cli import DEMO_BUNDLE, main
from maskbit_runtime.runs import run_shard

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'maskbit[distributed]')")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    return make_reference(tmp_path_factory.mktemp("reference"))


def test_two_ray_workers_write_the_single_process_bytes(local_ray, reference, tmp_path):
    result = CliRunner().invoke(main, ["sample", "--out", str(tmp_path), *RUN_ARGS, "--ray", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "8 chunk(s) made" in result.output and "on 2 worker(s)" in result.output
    assert (tmp_path / "samples.npz").read_bytes() == reference
    assert local_ray.is_initialized()        # a Ray this process started before is left running


def test_a_killed_actor_loses_and_duplicates_nothing(local_ray, reference, tmp_path):
    pids, killed = [], []

    def after_chunk(images):
        if not killed:                       # mid-run: one chunk written, the victim has chunks in flight
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    stats = run_shard(tmp_path, demo_spec(), DEMO_BUNDLE, ray_address="local", workers=2,
                on_workers=pids.extend, on_chunk=after_chunk)
    assert killed and stats.retried >= 1, stats
    assert sorted(stats.generated) == list(range(8))          # each chunk written exactly once
    assert (tmp_path / "samples.npz").read_bytes() == reference
    deadline = time.monotonic() + 10
    while _alive(killed[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(killed[0])


def test_a_worker_that_cannot_load_the_bundle_is_one_line(local_ray, tmp_path):
    missing = tmp_path / "gone"
    spec = demo_spec()
    with pytest.raises(Exception, match="Ray worker could not start: .*gone") as info:
        from maskbit_runtime.run_spec import RunStats
        from maskbit_runtime.runs import open_run
        from maskbit_runtime.runs_ray import run_on_ray
        open_run(tmp_path / "out", spec)
        run_on_ray(tmp_path / "out", spec, [0], missing, RunStats(), workers=1)
    assert len(str(info.value).splitlines()) == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                     # a zombie still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
