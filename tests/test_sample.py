"""`maskbit-run sample`: deterministic, sharded, resumable generation into the ADM evaluator's samples.npz."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from maskbit_runtime import Pipeline
from maskbit_runtime.cli import DEMO_BUNDLE, main
from maskbit_runtime.manifest import Manifest
from maskbit_runtime.chunks import chunk_path, read_chunk, try_claim, write_chunk
from maskbit_runtime.errors import InputError
from maskbit_runtime.run_spec import RunMismatchError, RunSpec, make_spec
from maskbit_runtime.sampling import SamplingError, SamplingSettings
from maskbit_runtime.runs import run_shard



def run_args(**changes) -> list[str]:
    """16 images (2 per class of the demo's 8), 2 steps, 8 chunks of 2: a few seconds on a busy CPU."""
    options = {"--per-class": 2, "--num-steps": 2, "--chunk-size": 2, "--seed": 3, **changes}
    return [text for key, value in options.items() for text in (key, str(value))]


RUN_ARGS = run_args()


def demo_spec(**changes):
    options = {"seed": 3, "chunk_size": 2, "num_steps": 2, **changes}
    return make_spec(Manifest.load(DEMO_BUNDLE), {"per_class": 2, "classes": list(range(8))}, **options)


def make_reference(folder: Path) -> bytes:
    """The single-process run everything else must reproduce byte for byte."""
    stats = run_shard(folder, demo_spec(), DEMO_BUNDLE)
    assert stats.samples and sorted(stats.generated) == list(range(8))
    return (folder / "samples.npz").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("reference")
    return folder, make_reference(folder)


def invoke(*args):
    return CliRunner().invoke(main, ["sample", *map(str, args)])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_samples_npz_is_the_adm_format_and_equals_one_big_call(reference):
    folder, _ = reference
    with np.load(folder / "samples.npz") as data:
        assert data.files == ["arr_0", "arr_1"]
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (16, 64, 64, 3)
    assert labels.tolist() == [i % 8 for i in range(16)]                # image i gets class i mod C
    with Pipeline.load(DEMO_BUNDLE) as pipe:
        whole = pipe.generate(labels.tolist(), seed=3, num_steps=2)
    np.testing.assert_array_equal(images, whole.images)
    chunk = read_chunk(folder, demo_spec(), 5)
    assert chunk["indices"].tolist() == [10, 11] and chunk["labels"].tolist() == [2, 3]
    np.testing.assert_array_equal(chunk["tokens"], whole.tokens[10:12])


def test_batch_size_and_the_cli_do_not_change_a_byte(reference, tmp_path):
    result = invoke("--out", tmp_path, *RUN_ARGS, "--batch-size", "3", "--png")
    assert result.exit_code == 0, result.output
    assert "wrote 16 images" in result.output
    assert (tmp_path / "samples.npz").read_bytes() == reference[1]
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert len(pngs) == 16 and pngs[0] == "000000_astronaut.png" and pngs[-1] == "000015_stereo_motorcycle.png"


def test_two_shards_then_a_merge_equal_the_whole(reference, tmp_path):
    first = invoke("--out", tmp_path, *RUN_ARGS, "--shard", "0/2")
    assert first.exit_code == 0, first.output
    assert "4 of 8 chunks still missing" in first.output and not (tmp_path / "samples.npz").exists()
    assert sorted(p.name for p in (tmp_path / "chunks").glob("*.npz"))[:2] == ["chunk_000000.npz", "chunk_000002.npz"]
    second = invoke("--out", tmp_path, *RUN_ARGS, "--shard", "1/2")
    assert second.exit_code == 0, second.output
    assert (tmp_path / "samples.npz").read_bytes() == reference[1]      # the last shard merges
    (tmp_path / "samples.npz").unlink()
    merged = invoke("--out", tmp_path)                                   # plain merge of the recorded run
    assert merged.exit_code == 0, merged.output
    assert "0 chunk(s) made, 8 verified and kept" in merged.output
    assert (tmp_path / "samples.npz").read_bytes() == reference[1]


def test_a_killed_run_resumes_without_redoing_complete_chunks(reference, tmp_path):
    code = "import sys; from maskbit_runtime.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "sample", "--out", str(tmp_path), *RUN_ARGS,
                             "--batch-size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(list((tmp_path / "chunks").glob("*.npz"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL, proc.stderr.read().decode()
    done = {int(p.stem[6:]): (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "chunks").glob("*.npz")}
    assert 2 <= len(done) < 8 and not (tmp_path / "samples.npz").exists()
    stats = run_shard(tmp_path, demo_spec(), DEMO_BUNDLE)
    assert stats.kept == len(done) and sorted(stats.generated) == sorted(set(range(8)) - set(done))
    for chunk, before in done.items():
        path = chunk_path(tmp_path, chunk)
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == before   # untouched, not rewritten
    assert (tmp_path / "samples.npz").read_bytes() == reference[1]
    assert not list((tmp_path / "chunks").glob(".*.tmp"))


def test_corrupted_chunks_are_detected_and_redone(reference, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(reference[0], folder)
    spec = demo_spec()
    raw = bytearray(chunk_path(folder, 1).read_bytes())
    raw[len(raw) // 2] ^= 0xFF                                   # a flipped byte: the zip CRC or checksum catches it
    chunk_path(folder, 1).write_bytes(bytes(raw))
    arrays = dict(np.load(chunk_path(folder, 2)))
    arrays["images"][0, 0, 0, 0] ^= 1                            # a well-formed file whose pixels changed
    np.savez(chunk_path(folder, 2), **arrays)
    chunk_path(folder, 3).write_bytes(chunk_path(folder, 3).read_bytes()[:1000])   # truncated
    (folder / "chunks" / ".chunk_000003.npz.dead.tmp").write_bytes(b"left by a killed writer of chunk 3")
    stats = run_shard(folder, spec, DEMO_BUNDLE)
    assert sorted(stats.redone) == [1, 2, 3] and sorted(stats.generated) == [1, 2, 3] and stats.kept == 5
    assert "checksum" in stats.redone[2] and "unreadable" in stats.redone[3]
    assert (folder / "samples.npz").read_bytes() == reference[1]
    assert not list((folder / "chunks").glob(".*.tmp"))


def test_a_chunk_locked_by_another_process_is_not_written_twice(reference, tmp_path):
    spec = demo_spec()
    held = try_claim(tmp_path, 0)                # "another process" is making chunk 0
    assert held is not None and try_claim(tmp_path, 0) is None
    box = {}
    worker = threading.Thread(target=lambda: box.update(stats=run_shard(tmp_path, spec, DEMO_BUNDLE)))
    worker.start()
    deadline = time.monotonic() + 60
    while len(list((tmp_path / "chunks").glob("*.npz"))) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not chunk_path(tmp_path, 0).exists()  # left for last, waiting for the lock
    theirs = read_chunk(reference[0], spec, 0)
    write_chunk(tmp_path, spec, 0, theirs["tokens"], theirs["images"])
    held.release()
    worker.join(60)
    assert sorted(box["stats"].generated) == list(range(1, 8))
    assert (tmp_path / "samples.npz").read_bytes() == reference[1]


def test_another_run_in_the_folder_is_refused_naming_the_difference(reference, tmp_path):
    folder = reference[0]
    for change, named in (({"--seed": 4}, "seed differs: 3 there, 4 here"),
                          ({"--chunk-size": 4}, "chunk_size differs: 2 there, 4 here"),
                          ({"--num-steps": 3}, "sampling setting num_steps differs: 2 there, 3 here"),
                          ({"--guidance-scale": 2}, "sampling setting guidance_scale differs")):
        line = one_line_error(invoke("--out", folder, *run_args(**change)))
        assert "holds another run's chunks" in line and named in line, line
    labels = one_line_error(invoke("--out", folder, "--labels", "0,1", "--num-steps", "2", "--chunk-size", "2",
                                   "--seed", "3"))
    assert "number of images differs: 16 there, 2 here" in labels
    bundle = tmp_path / "bundle"                 # same model, but a different decoder file
    shutil.copytree(DEMO_BUNDLE, bundle)
    with open(bundle / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    manifest = json.loads((bundle / "manifest.json").read_text())
    digest = hashlib.sha256((bundle / "decoder.onnx").read_bytes()).hexdigest()
    manifest["components"]["decoder"]["file_sha256"] = digest
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(invoke("--out", folder, "--bundle", bundle, *RUN_ARGS))
    assert "bundle differs: decoder sha256" in line
    with pytest.raises(RunMismatchError, match="seed differs"):
        run_shard(folder, demo_spec(seed=9), DEMO_BUNDLE)
    assert (folder / "samples.npz").read_bytes() == reference[1]      # nothing was touched


@pytest.mark.parametrize("shard", ["2/2", "1/0", "-1/2", "a/b", "1"])
def test_a_bad_shard_is_one_line(tmp_path, shard):
    assert "--shard" in one_line_error(invoke("--out", tmp_path, *RUN_ARGS, "--shard", shard))
    assert not (tmp_path / "run.json").exists()


def test_bad_invocations_are_one_line(tmp_path):
    assert "holds no run" in one_line_error(invoke("--out", tmp_path / "empty"))
    assert "not both" in one_line_error(invoke("--out", tmp_path, "--per-class", "1", "--labels", "1"))
    assert "out of range" in one_line_error(invoke("--out", tmp_path, "--labels", "0,8"))
    assert "--workers needs --ray" in one_line_error(invoke("--out", tmp_path, *RUN_ARGS, "--workers", "2"))


def test_ray_not_installed_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)          # makes `import ray` fail as if it were absent
    line = one_line_error(invoke("--out", tmp_path, *RUN_ARGS, "--ray"))
    assert "pip install 'maskbit[distributed]'" in line


def test_an_unreachable_ray_address_is_one_line_and_fast(tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'maskbit[distributed]')")
    start = time.monotonic()
    line = one_line_error(invoke("--out", tmp_path, *RUN_ARGS, "--ray", "127.0.0.1:1"))
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in line and time.monotonic() - start < 30
    assert "expected host:port" in one_line_error(invoke("--out", tmp_path, *RUN_ARGS, "--ray", "nowhere"))


def test_the_run_modules_import_neither_ray_nor_torch():
    code = ("import sys, maskbit_runtime.runs, maskbit_runtime.cli  # cli registers runs_cli\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'ray'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ})
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_run_description_holds_typed_settings_and_round_trips():
    spec = demo_spec(guidance_scale=2)
    assert isinstance(spec.sampling, SamplingSettings) and spec.sampling.guidance_scale == 2.0
    again = RunSpec.from_json(json.loads(json.dumps(spec.to_json())), "run.json")
    assert again == spec and again.run_id == spec.run_id and isinstance(again.sampling, SamplingSettings)
    with pytest.raises(SamplingError, match="num_steps"):
        demo_spec(num_steps=0)
    with pytest.raises(SamplingError, match="unknown sampling setting"):
        demo_spec(temperature=1.0)
    damaged = {**spec.to_json(), "sampling": {**spec.sampling.to_dict(), "guidance_scale": "high"}}
    with pytest.raises(InputError, match="guidance_scale must be a number"):
        RunSpec.from_json(damaged, "run.json")
