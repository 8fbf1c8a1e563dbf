"""Hostile bundles, manifests, tokens and concurrent writers: each is refused with one clear error (a MaskbitError in
the API; one `Error:` line, exit status 1 and no traceback in the CLIs), and nothing is read, written or deleted
outside its place. Most tests edit a copy of the shipped demo bundle; the export tests use a tiny preset."""

import copy
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from maskbit_runtime.backends.base import BackendError
from maskbit_runtime.cli import main as run_cli
from maskbit_runtime.cli_common import DEMO_BUNDLE
from maskbit_runtime.errors import InputError, MaskbitError
from maskbit_runtime.images import make_grid
from maskbit_runtime.manifest import MANIFEST, BundleError, Manifest, sha256_file
from maskbit_runtime.pipeline import Pipeline

from bundle_support import edit
from maskbit_runtime.sampling import SamplingError

DEMO_MANIFEST = json.loads((DEMO_BUNDLE / MANIFEST).read_text())
SIDE = DEMO_MANIFEST["dims"]["latent_size"]             # 16: tokens are [B,16,16] in [0, 1024)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tree(root: Path) -> dict[str, str]:
    """Every file (and link) under root -> its sha256 (or link target): what 'nothing changed' compares."""
    return {str(p.relative_to(root)): (f"-> {os.readlink(p)}" if p.is_symlink() else
                                       hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def one_line_error(result, fragment: str, code: int = 1) -> str:
    """A CliRunner result that is exactly one `Error:` line (our ClickException), without a traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)     # not an uncaught exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert "Traceback" not in result.output
    if code == 1:          # nothing else, except a progress bar that was cleared with \r
        lines = [line.strip() for line in re.split(r"[\r\n]", result.output) if line.strip()]
        assert [line for line in lines if not line.startswith("unmasking:")] == errors, result.output
    return errors[0]


def run(*args):
    return CliRunner().invoke(run_cli, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------------------------
# Component paths: nothing outside the bundle is opened


@pytest.mark.parametrize("name", ["../decoder.onnx", "ABSOLUTE", "sub/decoder.onnx", ".."])
def test_component_path_outside_the_bundle_is_refused_at_load(bundle, tmp_path, name):
    outside = shutil.copy(bundle / "decoder.onnx", tmp_path / "decoder.onnx")      # a valid model, right sha256
    name = str(outside) if name == "ABSOLUTE" else name
    edit(bundle, lambda d: d["components"]["decoder"].update(file=name, file_sha256=sha256_file(outside)))
    with pytest.raises(BundleError, match=re.escape(f"file {name!r} is not a plain file name inside the bundle")):
        Pipeline.load(bundle)
    one_line_error(run("decode", "--bundle", bundle, _npy(tmp_path, np.zeros((1, SIDE, SIDE), np.int64)),
                       "--out", tmp_path / "d.png"), "is not a plain file name inside the bundle")
    assert not (tmp_path / "d.png").exists()


def test_symlink_out_of_the_bundle_is_refused_before_it_is_read(bundle, tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere" / "decoder.onnx"
    outside.parent.mkdir()
    shutil.move(bundle / "decoder.onnx", outside)                   # valid ONNX; the manifest's hash matches it
    (bundle / "decoder.onnx").symlink_to(outside)
    edit(bundle, lambda d: d["components"]["decoder"].update(file_sha256=sha256_file(outside)))
    hashed = []
    monkeypatch.setattr("maskbit_runtime.manifest.sha256_file", lambda path, *a: hashed.append(path) or "0" * 64)
    with pytest.raises(BundleError, match=r"decoder.onnx points outside the bundle \(to .*elsewhere"):
        Pipeline.load(bundle)
    assert hashed == []                                             # refused at load: the file was never read
    one_line_error(run("info", "--bundle", bundle), "decoder.onnx points outside the bundle")


def test_component_of_another_kind_is_refused_when_used(bundle, tmp_path):
    """combine.onnx copied over decoder.onnx with a matching sha256: the hash passes, the tensors do not."""
    shutil.copy(bundle / "combine.onnx", bundle / "decoder.onnx")
    edit(bundle, lambda d: d["components"]["decoder"].update(file_sha256=sha256_file(bundle / "decoder.onnx")))
    tokens = np.zeros((1, SIDE, SIDE), np.int64)
    with Pipeline.load(bundle) as pipe, pytest.raises(BackendError, match="decoder.onnx has tensors .* the file "
                                                                           "does not belong to this bundle"):
        pipe.decode(tokens)
    one_line_error(run("decode", "--bundle", bundle, _npy(tmp_path, tokens), "--out", tmp_path / "d.png"),
                   "the file does not belong to this bundle")
    assert not (tmp_path / "d.png").exists()


def test_manifest_dims_that_the_graphs_do_not_have_are_refused_when_used(bundle, tmp_path):
    """A manifest consistent in itself (128-pixel images, every tensor shape edited to match) whose graphs are
    64-pixel ones: used to reach ONNX Runtime and die there with a RuntimeError traceback."""
    def to_128(d):
        d["dims"]["image_size"] = 128
        d["components"]["encoder"]["inputs"][0]["shape"] = ["batch", 3, 128, 128]
        d["components"]["decoder"]["outputs"][0]["shape"] = ["batch", 128, 128, 3]
    edit(bundle, to_128)
    with Pipeline.load(bundle) as pipe:
        with pytest.raises(BackendError, match=r"decoder.onnx: tensor images has shape \['batch', 64, 64, 3\], "
                                               r"but the manifest's dims give \['batch', 128, 128, 3\]"):
            pipe.decode(np.zeros((1, SIDE, SIDE), np.int64))
        with pytest.raises(BackendError, match="encoder.onnx: tensor images has shape"):
            pipe.encode(np.zeros((1, 128, 128, 3), np.uint8))
    one_line_error(run("generate", "--bundle", bundle, "--labels", "0", "--num-steps", "2", "--out",
                       tmp_path / "g.png"), "does not belong to this bundle")
    assert not (tmp_path / "g.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# Class names


@pytest.mark.parametrize(("names", "message"), [
    (["a/b"], "class name 'a/b' must be printable text"),
    (["../../etc"], "class name '../../etc' must be printable text"),
    (["a\\b"], "class name 'a\\\\\\\\b' must be printable"),
    ([".."], "class name '..' must be printable text"),
    (["tab\there"], "class name 'tab\\\\there' must be printable text"),
    (["new\nline"], "class name 'new\\\\nline' must be printable text"),
    (["\x1b[31mred"], "class name '\\\\x1b\\[31mred' must be printable text"),
    ([""], "class name '' must be printable text"),
    ([7], "class name 7 must be printable text"),
    (None, "7 class names for 8 classes"),
])
def test_bad_class_names_are_refused_at_load(bundle, names, message):
    good = list(DEMO_MANIFEST["class_names"])
    edit(bundle, lambda d: d.update(class_names=good[:7] if names is None else names + good[1:]))
    with pytest.raises(BundleError, match=message):
        Manifest.load(bundle)
    assert re.search(message, one_line_error(run("info", "--bundle", bundle), "class name"))


def test_odd_but_printable_class_names_write_only_inside_the_output_folder(bundle, tmp_path):
    names = ["a b", "x.y", "..x", "~", "$HOME", "-rf", "*", "stereo motorcycle"]
    edit(bundle, lambda d: d.update(class_names=names))
    before = tree(tmp_path)
    result = run("generate", "--bundle", bundle, "--labels", "a b,x.y,..x,~,$HOME,-rf,*", "--num-steps", "2",
                 "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = sorted(p for p in tmp_path.rglob("*") if str(p.relative_to(tmp_path)) not in before)
    assert [p.parent for p in written[1:]] == [tmp_path / "out"] * 7 and written[0] == tmp_path / "out"
    assert [p.name[:4] for p in written[1:]] == [f"{i:03d}_" for i in range(7)]
    assert all(p.suffix == ".png" and p.is_file() and not p.is_symlink() for p in written[1:])
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before


# ---------------------------------------------------------------------------------------------------------------
# Export: class names, --force, two writers of one --out


def export(checkpoints: Path, *args):
    from maskbit_export.cli import main as export_cli
    return CliRunner().invoke(export_cli, ["build-engines", "--tokenizer", str(checkpoints / "tok.safetensors"),
                                           "--max-batch", "2", "--no-verify", *map(str, args)])


@pytest.mark.parametrize(("bad", "message"), [
    ("a/b", "class name 'a/b' must be printable text"),
    ("..", "class name '..' must be printable text"),
    ("bell\x07", "class name 'bell\\x07' must be printable text"),
    (None, "999 class names for 1000 classes"),
])
def test_export_refuses_bad_class_names_and_writes_nothing(checkpoints, tmp_path, bad, message):
    names = [f"c{i}" for i in range(999)] + ([bad] if bad is not None else [])
    before = tree(tmp_path)
    result = export(checkpoints, "--generator", checkpoints / "gen.safetensors", "--out", tmp_path / "b",
                    "--class-names", ",".join(names))
    one_line_error(result, message)
    assert tree(tmp_path) == before


def test_export_force_never_replaces_a_folder_that_is_not_a_bundle(checkpoints, tmp_path):
    (tmp_path / "D").mkdir()
    (tmp_path / "D" / "thesis.tex").write_text("years of work")
    before = tree(tmp_path)
    one_line_error(export(checkpoints, "--force", "--out", tmp_path / "D"),
                   "--force replaces only a bundle directory, and")
    assert tree(tmp_path) == before                  # D, its file, and no lock or partial folder next to it


def test_second_concurrent_export_to_one_out_fails_at_once(checkpoints, tmp_path):
    out = tmp_path / "B"
    code = "from maskbit_export.cli import main; main()"
    first = subprocess.Popen([sys.executable, "-c", code, "build-engines", "--tokenizer",
                              str(checkpoints / "tok.safetensors"), "--max-batch", "2", "--no-verify", "--out",
                              str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".B.*.partial")):               # made while the first holds .B.lock
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        assert (tmp_path / ".B.lock").exists()
        start = time.monotonic()
        second = export(checkpoints, "--out", out)
        took = time.monotonic() - start
        assert first.poll() is None                                 # the first was still exporting meanwhile
        one_line_error(second, f"another export is writing {out} right now")
        assert took < 10
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert "Traceback" not in stderr and f"wrote bundle {out}" in stdout
    manifest = Manifest.load(out)
    assert manifest.complete and sorted(manifest.components) == ["decoder", "encoder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B"]      # no lock, no partial folder left


# ---------------------------------------------------------------------------------------------------------------
# Manifests: partial, missing keys, wrong types, values out of range


def test_partial_bundle_is_refused(bundle, tmp_path):
    edit(bundle, lambda d: d.update(complete=False))
    with pytest.raises(BundleError, match="is incomplete: its build did not finish"):
        Pipeline.load(bundle)
    one_line_error(run("generate", "--bundle", bundle, "--labels", "0", "--out", tmp_path / "g.png"),
                   "is incomplete: its build did not finish")
    assert not (tmp_path / "g.png").exists()


def _set(path: str, value):
    def change(d):
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return change


@pytest.mark.parametrize(("change", "message"), [
    (_set("dims", KeyError), "dims is missing"),
    (_set("dims", "64x64"), "dims must be dict, got '64x64'"),
    (_set("dims.image_size", 64.5), "image_size must be int, got 64.5"),
    (_set("num_bits", "10"), "num_bits must be int, got '10'"),
    (_set("num_bits", 64), "num_bits = 64 is outside [1, 24]"),
    (_set("num_classes", True), "num_classes must be int, got True"),
    (_set("components", []), "components must be dict, got []"),
    (_set("components.step.batch_profile.min", -1), "min = -1 is outside [1, 4096]"),
    (_set("components.step.batch_profile.max", 10 ** 12), "max = 1000000000000 is outside [1, 4096]"),
    (_set("components.step.inputs", [{"name": "tokens"}]), "inputs: shape is missing"),
    (_set("components.decoder.file_sha256", None), "file needs a file name and a sha256"),
    (_set("sampling.guidance_scale", float("nan")), "guidance_scale must be a finite number in [0, 1000], got nan"),
    (_set("sampling.softmax_temperature", 0), "softmax_temperature must be a finite number in [0.001, 1000]"),
    (_set("sampling.num_steps", 10 ** 9), "num_steps must be in [1, 4096], got 1000000000"),
    (_set("sampling", [1, 2]), "sampling must be a mapping, got list"),
    (_set("format_version", True), "has format version True"),
    (_set("opset", 10 ** 5000), "is not valid JSON"),            # Python refuses > 4300 digits: was a ValueError
])
def test_malformed_manifest_values_are_one_bundle_error(bundle, change, message):
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)                    # only to write the 5001-digit number
    try:
        edit(bundle, change)
    finally:
        sys.set_int_max_str_digits(limit)
    with pytest.raises(BundleError) as info:
        Pipeline.load(bundle)
    assert message in str(info.value) and "\n" not in str(info.value)
    one_line_error(run("info", "--bundle", bundle), message)


# ---------------------------------------------------------------------------------------------------------------
# Sampling settings and inputs


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--guidance-scale", "nan", "guidance_scale must be a finite number in [0, 1000], got nan"),
    ("--guidance-scale", "inf", "guidance_scale must be a finite number in [0, 1000], got inf"),
    ("--softmax-temperature", "0", "softmax_temperature must be a finite number in [0.001, 1000], got 0.0"),
    ("--randomize-temperature", "-inf", "randomize_temperature must be a finite number"),
])
def test_bad_sampling_options_fail_fast_with_one_line(bundle, tmp_path, option, value, message):
    start = time.monotonic()
    one_line_error(run("generate", "--bundle", bundle, "--labels", "0", option, value, "--out", tmp_path / "g.png"),
                   message)
    with Pipeline.load(bundle) as pipe, pytest.raises(SamplingError, match=message.replace("[", r"\[")):
        pipe.generate([0], **{option[2:].replace("-", "_"): float(value)})
    assert time.monotonic() - start < 10 and not (tmp_path / "g.png").exists()


def test_too_many_steps_fail_fast(bundle, tmp_path):
    """The option's range is checked by click (a usage error: exit status 2), the API's by SamplingSettings."""
    start = time.monotonic()
    one_line_error(run("generate", "--bundle", bundle, "--labels", "0", "--num-steps", "100000000", "--out",
                       tmp_path / "g.png"), "100000000 is not in the range 1<=x<=4096", code=2)
    with Pipeline.load(bundle) as pipe, pytest.raises(SamplingError, match=r"num_steps must be in \[1, 4096\]"):
        pipe.generate([0], num_steps=100_000_000)
    assert time.monotonic() - start < 10 and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize(("labels", "message"), [
    ("²", "label '²' is not a number"),                       # isdigit() but not int(): was a ValueError
    ("1" * 5000, "label 11111111111111111111... is out of range"),   # int() refuses 5000 digits: was a ValueError
])
def test_labels_that_look_like_numbers(bundle, tmp_path, labels, message):
    edit(bundle, lambda d: d.update(class_names=None))
    one_line_error(run("generate", "--bundle", bundle, "--labels", labels, "--out", tmp_path / "g.png"), message)


def _npy(folder: Path, array: np.ndarray, name: str = "tokens.npy") -> Path:
    np.save(folder / name, array, allow_pickle=True)
    return folder / name


def _huge_header(folder: Path) -> Path:
    """A 100-byte .npy whose header claims 10**9 x 16 x 16 int64 (1.9 TiB)."""
    path = folder / "tokens.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10 ** 9, 16, 16)})
        f.write(bytes(64))
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: _npy(d, np.zeros((1, SIDE, SIDE), np.float32)), "token indices must be integers, got dtype float32"),
    (lambda d: _npy(d, np.full((1, SIDE, SIDE), np.nan)), "token indices must be integers, got dtype float64"),
    (lambda d: _npy(d, np.zeros((1, SIDE, SIDE), np.complex64)), "must be integers, got dtype complex64"),
    (lambda d: _npy(d, np.zeros((1, SIDE, SIDE), bool)), "token indices must be integers, got dtype bool"),
    (lambda d: _npy(d, np.zeros((1, SIDE, SIDE), object)), "cannot read tokens from"),
    (lambda d: _npy(d, np.full((1, SIDE, SIDE), 1024)), "token indices must be in [0, 1024), got 1024..1024"),
    (lambda d: _npy(d, np.full((1, SIDE, SIDE), -1, np.int8)), "token indices must be in [0, 1024), got -1..-1"),
    (lambda d: _npy(d, np.full((1, SIDE, SIDE), 2 ** 64 - 1, np.uint64)), "must be in [0, 1024), got 18446744"),
    (lambda d: _npy(d, np.zeros((SIDE, SIDE), np.int64)), "indices must be [B,16,16] with B >= 1, got [16, 16]"),
    (_huge_header, "cannot read tokens from"),                 # was a MemoryError traceback
])
def test_bad_token_files_are_one_line_and_write_nothing(bundle, tmp_path, make, message):
    tokens = make(tmp_path)
    before = tree(tmp_path)
    one_line_error(run("decode", "--bundle", bundle, tokens, "--out", tmp_path / "d.png"), message)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("value", [-0.01, 1.01, np.nan, np.inf])
def test_float_images_outside_0_1_are_refused(bundle, value):
    images = np.full((1, 3, 64, 64), 0.5, np.float32)
    images[0, 1, 2, 3] = value
    with Pipeline.load(bundle) as pipe, pytest.raises(InputError, match=r"float images must be finite and in \[0, 1\]"):
        pipe.encode(images)


# ---------------------------------------------------------------------------------------------------------------
# Concurrent writers of one image


def test_concurrent_generations_to_one_png_leave_one_valid_image(bundle, tmp_path):
    seeds = [0, 1, 2, 3]
    with Pipeline.load(bundle) as pipe:
        expected = {seed: make_grid(pipe.generate([2], num_steps=4, seed=seed).images) for seed in seeds}
    assert len({grid.tobytes() for grid in expected.values()}) == len(seeds)       # distinguishable outcomes
    folder = tmp_path / "shared"
    folder.mkdir()
    code = "from maskbit_runtime.cli import main; main()"
    procs = [subprocess.Popen([sys.executable, "-c", code, "generate", "--bundle", str(bundle), "--labels", "2",
                               "--num-steps", "4", "--seed", str(seed), "--out", str(folder / "same.png")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for seed in seeds]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(seeds), results
    assert sorted(p.name for p in folder.iterdir()) == ["same.png"]                  # no temporary file left
    with Image.open(folder / "same.png") as img:
        final = np.asarray(img.convert("RGB"))
    assert any(np.array_equal(final, grid) for grid in expected.values())


# ---------------------------------------------------------------------------------------------------------------
# Fuzz: random manifests and component headers raise only MaskbitError


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory):
    return Path(shutil.copytree(DEMO_BUNDLE, tmp_path_factory.mktemp("fuzz") / "bundle"))


def _exercise(root: Path) -> None:
    """Load, generate two steps and decode; only MaskbitError may escape."""
    try:
        with Pipeline.load(root) as pipe:
            if pipe.manifest.has_generator:
                pipe.generate([0], num_steps=2)
            side = pipe.manifest.dims.latent_size
            pipe.decode(np.zeros((1, side, side), np.int64))
    except MaskbitError:
        pass


def _paths(node, prefix=()):
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, (*prefix, key))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
NUMBERS = st.sampled_from([0, -1, 1, 2, 3, 2 ** 31, 2 ** 63, 10 ** 30, 0.5, -0.0, math.nan, math.inf, -math.inf])
STRINGS = st.sampled_from(["", "batch", "../x", "a/b", "/etc/passwd", "step.onnx", "manifest.json", "int64",
                           "float16", "\x00", "é", "fp32", "tensorrt", "lookup-free"])


def _mutate(value, op: str, draw) -> object:
    if op == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return draw(NUMBERS | st.just(value + 1) | st.just(value * 2) | st.just(-value))
    if op == "string" and isinstance(value, str):
        return draw(STRINGS | st.just(value + "/") | st.just(value.upper()) | st.just(value[:-1]))
    if op == "nest":
        return draw(st.sampled_from([[value], {"value": value}, {}, []]))
    return draw(JSON)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_manifests_raise_only_maskbit_errors(fuzz_bundle, data):
    manifest = copy.deepcopy(DEMO_MANIFEST)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        path = data.draw(st.sampled_from([p for p in _paths(manifest) if p]), label="path")
        try:
            parent = manifest
            for key in path[:-1]:
                parent = parent[key]
            op = data.draw(st.sampled_from(["drop", "replace", "number", "string", "nest"]), label="op")
            if op == "drop":
                del parent[path[-1]]
            else:
                parent[path[-1]] = _mutate(parent[path[-1]], op, data.draw)
        except (KeyError, IndexError, TypeError):      # the path went away with an earlier mutation
            continue
    (fuzz_bundle / MANIFEST).write_text(json.dumps(manifest))
    _exercise(fuzz_bundle)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(component=st.sampled_from(["combine", "decoder", "step"]),
       edits=st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzzed_component_headers_raise_only_maskbit_errors(fuzz_bundle, component, edits):
    """Bytes of an ONNX file's header changed and its sha256 updated, so the hash check lets it through."""
    original = (DEMO_BUNDLE / f"{component}.onnx").read_bytes()
    mutated = bytearray(original)
    for offset, byte in edits:
        mutated[offset] = byte
    target = fuzz_bundle / f"{component}.onnx"
    (fuzz_bundle / "new.tmp").write_bytes(bytes(mutated))
    os.replace(fuzz_bundle / "new.tmp", target)                       # a new inode: no stale hash cache entry
    manifest = copy.deepcopy(DEMO_MANIFEST)
    manifest["components"][component]["file_sha256"] = sha256_file(target)
    (fuzz_bundle / MANIFEST).write_text(json.dumps(manifest))
    try:
        _exercise(fuzz_bundle)
    finally:
        shutil.copy(DEMO_BUNDLE / f"{component}.onnx", fuzz_bundle / "new.tmp")
        os.replace(fuzz_bundle / "new.tmp", target)


class _FakeOrt:
    """onnxruntime as a package built with CUDA whose CUDA provider fails to load (the common broken install)."""

    __version__ = "0.0-test"

    def __init__(self, real):
        self.real, self.SessionOptions, self.OrtValue = real, real.SessionOptions, real.OrtValue

    def get_available_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, path, options, providers, provider_options):   # noqa: N802 (onnxruntime's name)
        assert provider_options[0] == {"use_tf32": "0"} and provider_options[1] == {}
        return self.real.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def test_a_cuda_provider_that_does_not_load_is_one_clear_error(monkeypatch, tmp_path):
    import onnxruntime

    from maskbit_runtime.backends import ort as ort_backend
    monkeypatch.setattr(ort_backend, "import_ort", lambda: _FakeOrt(onnxruntime))
    with Pipeline.load(DEMO_BUNDLE, provider_options={"CUDAExecutionProvider": {"use_tf32": "0"}}) as pipe:
        assert pipe.backend.primitives.device == "cuda"
        with pytest.raises(BackendError, match="could not start its CUDA provider for decoder.onnx .*fell back to "
                                               "CPUExecutionProvider"):
            pipe.backend.primitives.session("decoder")
        with pytest.raises(BackendError, match="cannot allocate cuda memory .* is its cuda provider usable here"):
            pipe.decode(np.zeros((1, 16, 16), np.int64))      # this CPU package cannot allocate on cuda at all
    with pytest.raises(BackendError, match="provider options for TensorrtExecutionProvider"):
        Pipeline.load(DEMO_BUNDLE, provider_options={"TensorrtExecutionProvider": {}})


def test_cpu_and_gpu_onnxruntime_installed_together_is_one_clear_error(monkeypatch, tmp_path):
    from importlib import metadata
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.20.0" if name == "onnxruntime-gpu" else real_version(name))
    with pytest.raises(BackendError, match="both onnxruntime and onnxruntime-gpu are installed.*pip uninstall -y "
                                           "onnxruntime onnxruntime-gpu"):
        Pipeline.load(DEMO_BUNDLE)
    result = CliRunner().invoke(run_cli, ["generate", "--labels", "0", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "both onnxruntime" in result.output
    assert not (tmp_path / "x.png").exists()
