"""Hostile and careless input to `maskbit-run sample`: each is one `Error:` line, checked before any file or folder
is created; a run folder never gets a file this tool did not mean to write, and files it did not write are never
overwritten."""

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskbit_runtime.cli import DEMO_BUNDLE, main
from maskbit_runtime.errors import InputError
from maskbit_runtime.manifest import MANIFEST, Manifest
from maskbit_runtime.run_spec import MAX_IMAGES, RunSpec, make_spec
from maskbit_runtime.runs import RUN_FILE, load_run, run_shard

ARGS = ["--labels", "1,2", "--num-steps", "2", "--chunk-size", "1"]


def invoke(*args):
    return CliRunner().invoke(main, ["sample", *map(str, args)])


def one_line_error(result, fragment: str) -> str:
    assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, (AssertionError, TypeError, ValueError, ZeroDivisionError)), \
        repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    return errors[0]


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A complete 2-image run (demo bundle, 2 steps)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = invoke("--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--shard", "\u00b2/3"], "--shard expects i/n"),            # '²'.isdigit() is True, int('²') is not
    (["--shard", "\u0663/4"], "--shard expects i/n"),            # Arabic-Indic three
    (["--guidance-scale", "nan"], "guidance_scale must be a finite number"),
    (["--guidance-scale", "inf"], "guidance_scale must be a finite number"),
])
def test_bad_settings_are_one_line_and_create_nothing(tmp_path, extra, fragment):
    out = tmp_path / "run"
    one_line_error(invoke("--out", out, *ARGS, *extra), fragment)
    assert not out.exists()


def test_a_huge_per_class_is_one_line_before_anything_is_allocated(tmp_path):
    out = tmp_path / "run"
    one_line_error(invoke("--out", out, "--per-class", 99999999999999, "--num-steps", 2), "a run makes at most")
    assert not out.exists()
    with pytest.raises(InputError, match="a run makes at most"):
        make_spec(Manifest.load(DEMO_BUNDLE), {"per_class": MAX_IMAGES, "classes": [0, 1]})


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("chunk_size", 0, "chunk_size must be an integer in 1.."),
    ("chunk_size", -3, "chunk_size must be an integer in 1.."),
    ("chunk_size", 1.5, "chunk_size must be an integer"),
    ("chunk_size", "2", "chunk_size must be an integer"),
    ("seed", -1, "seed must be an integer in 0.."),
    ("seed", True, "seed must be an integer"),
    ("plan", {"per_class": 10 ** 12, "classes": [1, 2]}, "a run makes at most"),
    ("plan", {"labels": "1,2"}, "labels must be a list"),
    ("plan", {"labels": [1.5]}, "labels must be integers"),
    ("plan", [1, 2], "plan must be an object"),
    ("bundle", "x", "is damaged"),
    ("backend", 7, "backend must be a backend name"),
])
def test_a_damaged_run_json_is_one_line_and_changes_nothing(finished, tmp_path, key, value, fragment):
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    data = json.loads((out / RUN_FILE).read_text())
    data[key] = value
    data.pop("run_id")
    (out / RUN_FILE).write_text(json.dumps(data))
    before = tree(out)
    one_line_error(invoke("--out", out), fragment)
    assert tree(out) == before


def test_nan_in_run_json_is_refused_and_never_written(finished, tmp_path):
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    data = json.loads((out / RUN_FILE).read_text())
    (out / RUN_FILE).write_text(json.dumps({**data, "seed": math.nan}))        # json.dumps writes NaN
    one_line_error(invoke("--out", out), "seed must be an integer")
    data["sampling"]["guidance_scale"] = math.nan
    (out / RUN_FILE).write_text(json.dumps(data))
    one_line_error(invoke("--out", out), "guidance_scale must be a finite number")
    json.loads((finished / RUN_FILE).read_text(), parse_constant=_no_constants)       # strict JSON


def _no_constants(name):
    raise AssertionError(f"run.json holds {name}")


def test_a_samples_npz_this_tool_did_not_write_is_never_overwritten(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "samples.npz").write_bytes(b"my own samples")
    (out / "notes.txt").write_text("keep")
    before = tree(out)
    one_line_error(invoke("--out", out, *ARGS), "is not empty and holds no run")
    assert tree(out) == before                         # no run.json, no .run.lock, no chunks/
    (out / "notes.txt").unlink()
    one_line_error(invoke("--out", out, *ARGS), "samples.npz")
    assert (out / "samples.npz").read_bytes() == b"my own samples" and sorted(p.name for p in out.iterdir()) == \
        ["samples.npz"]


def test_backend_is_part_of_the_run(finished, tmp_path):
    spec = load_run(finished)
    assert spec.backend == "ort" and "backend" not in spec.identity()      # ids of earlier ort runs unchanged
    other = RunSpec.from_json({k: v for k, v in spec.to_json().items() if k != "run_id"} | {"backend": "aoti"},
                              "x")
    assert other.run_id != spec.run_id
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    one_line_error(invoke("--out", out, "--backend", "aoti", "--trust-native-code"),
                   "holds a run made with backend ort")
    with pytest.raises(InputError, match="backend differs: ort there, aoti here"):
        run_shard(out, other, DEMO_BUNDLE, backend="aoti", trust_native_code=True)


def test_bundle_is_checked_even_when_nothing_is_left(finished, tmp_path):
    out = Path(shutil.copytree(finished, tmp_path / "run"))
    other = Path(shutil.copytree(DEMO_BUNDLE, tmp_path / "other"))
    data = json.loads((other / MANIFEST).read_text())
    data["components"]["step"]["file_sha256"] = "0" * 64
    (other / MANIFEST).write_text(json.dumps(data))
    before = tree(out)
    one_line_error(invoke("--out", out, "--bundle", other), "is not this run's bundle")
    assert tree(out) == before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from("0123456789/ -+\u00b2\u00b9\u0663\uff11x"), max_size=8) |
       st.text(max_size=8))
def test_any_shard_text_is_one_line_or_a_shard(tmp_path, text):
    from maskbit_runtime.runs_cli import parse_shard
    try:
        index, count = parse_shard(text)
    except InputError as exc:
        assert len(str(exc).splitlines()) == 1
    else:
        assert 0 <= index < count


# -- Ray: a pool the cluster cannot hold fails in bounded time, naming what it asked for and what there is ----------
class FakeRay:
    """The parts of Ray's API the pool reads before it creates an actor."""

    def __init__(self, resources):
        self.resources = resources
        self.made = 0

    def cluster_resources(self):
        return dict(self.resources)

    def available_resources(self):
        return dict(self.resources)


@pytest.mark.parametrize(("workers", "gpus", "fragment"), [
    (1000, 0.0, "1000 Ray worker(s) x 1 CPU ask for 1000 CPU, but the cluster has 2 (2 free)"),
    (1, 1.0, "1 Ray worker(s) x 1 GPU ask for 1 GPU, but the cluster has 0 (0 free)"),
])
def test_a_pool_the_cluster_cannot_hold_is_refused_before_any_actor(workers, gpus, fragment):
    from maskbit_runtime.runs_ray import RayError, check_resources
    with pytest.raises(RayError) as error:
        check_resources(FakeRay({"CPU": 2.0}), workers, gpus)
    assert fragment in str(error.value) and len(str(error.value).splitlines()) == 1


@pytest.mark.slow
def test_ray_workers_1000_fails_within_a_bounded_time(tmp_path):
    pytest.importorskip("ray")
    start = time.monotonic()
    result = invoke("--out", tmp_path / "run", *ARGS, "--ray", "--workers", 1000)
    one_line_error(result, "1000 Ray worker(s) x 1 CPU ask for 1000 CPU")
    assert time.monotonic() - start < 120
