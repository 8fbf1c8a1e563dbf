"""Hostile and careless input to `maskbit-eval`: images follow the runtime's one image rule (16-bit PNGs scaled,
not white; the pixel limit read from the header, before decoding), and statistics that are not finite real
numbers are one `Error:` line, never `fid: nan` with exit status 0."""

import struct
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from maskbit.evaluation.cli import main as eval_cli
from maskbit.evaluation.images import open_images
from maskbit.evaluation.metrics import FeatureStats
from maskbit_runtime.errors import InputError
from maskbit_runtime.images import MAX_PIXELS


def forged_png(path, width, height):
    """A valid 1x1 grey PNG whose header claims width x height."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def one_line_error(result, fragment: str) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    return errors[0]


def test_16bit_pngs_read_like_their_8bit_originals(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 8, 8), dtype=np.uint16)
    for folder, make in (("eight", lambda g: Image.fromarray(g.astype(np.uint8), "L")),
                         ("sixteen", lambda g: Image.fromarray(g * 257))):
        (tmp_path / folder).mkdir()
        for i, g in enumerate(gray):
            make(g).save(tmp_path / folder / f"{i}.png")
    assert Image.open(tmp_path / "sixteen" / "0.png").mode.startswith("I")
    eight, sixteen = open_images(tmp_path / "eight").load(), open_images(tmp_path / "sixteen").load()
    assert np.array_equal(sixteen, eight)                  # the old reader made every 16-bit pixel 255 (white)
    report = tmp_path / "r.json"
    result = CliRunner().invoke(eval_cli, ["metrics", "--samples", str(tmp_path / "sixteen"), "--reference",
                                           str(tmp_path / "eight"), "--features", "pixels", "--out", str(report)])
    assert result.exit_code == 0, result.output
    import json
    assert abs(json.loads(report.read_text())["fid"]) < 1e-3, report.read_text()      # the old reader: FID 288


@pytest.mark.parametrize(("width", "height", "fragment"), [(100_000, 100_000, "is a decompression bomb"),
                                                            (MAX_PIXELS + 1, 1, "above the limit")])
def test_the_pixel_limit_is_read_from_the_header(tmp_path, width, height, fragment):
    (tmp_path / "set").mkdir()
    forged_png(tmp_path / "set" / "bomb.png", width, height)
    with pytest.raises(InputError, match=fragment):
        open_images(tmp_path / "set")
    result = CliRunner().invoke(eval_cli, ["stats", str(tmp_path / "set"), "--out", str(tmp_path / "s.npz"),
                                           "--features", "pixels"])
    one_line_error(result, fragment)
    assert not (tmp_path / "s.npz").exists()


def test_an_npz_of_huge_images_is_refused_from_its_header(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, arr_0=np.zeros((1, 1, 1, 3), np.uint8))
    import zipfile
    with zipfile.ZipFile(path) as zf:
        raw = bytearray(zf.read("arr_0.npy"))
    header = raw.decode("latin1")
    raw = header.replace("(1, 1, 1, 3)", "(1, 100000, 100000, 3)").encode("latin1")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", bytes(raw))
    with pytest.raises(InputError, match="above the limit"):
        open_images(path)


def _stats(path, **arrays):
    base = {"mu": np.zeros(3), "sigma": np.eye(3)}
    np.savez(path, **{**base, **arrays})
    return path


@pytest.mark.parametrize(("arrays", "fragment"), [
    ({"mu": np.array([0.0, np.nan, 0.0])}, "mu holds NaN or infinity"),
    ({"sigma": np.full((3, 3), np.inf)}, "sigma holds NaN or infinity"),
    ({"mu": np.array(["a", "b", "c"])}, "mu must hold real numbers, found dtype <U1"),
    ({"sigma": np.array([["x"] * 3] * 3)}, "sigma must hold real numbers"),
    ({"mu": np.array([True, False, True])}, "mu must hold real numbers"),
    ({"mu": np.zeros(3, np.complex64)}, "mu must hold real numbers"),
    ({"count": np.array("many")}, "count must be one integer"),
    ({"network": np.array([1, 2])}, "network must be one string"),
    ({"features": np.full((4, 3), np.nan)}, "features holds NaN or infinity"),
])
def test_bad_statistics_are_one_line(tmp_path, arrays, fragment):
    path = _stats(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        FeatureStats.load(path)
    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / "images" / f"{i}.png")
    result = CliRunner().invoke(eval_cli, ["metrics", "--samples", str(tmp_path / "images"), "--reference",
                                           str(path), "--features", "pixels"])
    one_line_error(result, fragment)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=3, max_size=3))
def test_statistics_are_finite_or_refused(tmp_path_factory, values):
    path = _stats(tmp_path_factory.mktemp("s") / "s.npz", mu=np.array(values))
    try:
        stats = FeatureStats.load(path)
    except InputError as exc:
        assert not np.all(np.isfinite(values)) and len(str(exc).splitlines()) == 1
    else:
        assert np.all(np.isfinite(stats.mu))
