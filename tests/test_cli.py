"""The command lines as a new user types them: maskbit-export build-engines, maskbit-run generate|encode|..."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import maskbit
from maskbit_export import build_bundle
from maskbit_runtime.cli import main as run_cli


@pytest.fixture(scope="module")
def official_bundle(official, tmp_path_factory):
    """Built exactly as the README tells a new user, in a subprocess."""
    work = tmp_path_factory.mktemp("cli")
    cmd = ["maskbit-export", "build-engines", "--tokenizer", str(official / "tokenizer_lfq10.bin"),
           "--generator", str(official / "generator_lfq10.bin"), "--config", str(official / "generator_lfq10.yaml"),
           "--out", "bundle"]
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    return work / "bundle"


def test_generate_writes_a_grid_of_model_resolution_images(official_bundle, official, tmp_path):
    result = subprocess.run(["maskbit-run", "generate", "--bundle", str(official_bundle), "--labels", "1,2,3",
                             "--num-steps", "8", "--seed", "0", "--out", "grid.png"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 image(s) of 32x32 to grid.png" in result.stdout
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 2 * 34, 2 + 2 * 34, 3)           # 2x2 layout of 32x32 images, 2 px padding
    tok = maskbit.load_tokenizer(official / "tokenizer_lfq10.bin", official / "generator_lfq10.yaml")
    gen = maskbit.load_generator(official / "generator_lfq10.bin", official / "generator_lfq10.yaml")
    eager = maskbit.generate(tok, gen, labels=[1, 2, 3], num_steps=8, seed=0)
    first = grid[2:34, 2:34]
    assert np.abs(first.astype(int) - eager.images[0].astype(int)).max() <= 1


def test_generate_by_class_name_into_a_directory(official_bundle, tmp_path):
    runner = CliRunner()
    result = runner.invoke(run_cli, ["generate", "--bundle", str(official_bundle), "--labels", "goldfish,tiger cat",
                                     "--num-steps", "4", "--out", str(tmp_path / "imgs")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["000_goldfish.png", "001_tiger_cat.png"]


@pytest.mark.parametrize("labels, message", [
    ("1,1000", "label 1000 is out of range"),
    ("goldfsh", "unknown class name 'goldfsh'"),
    ("crane", "ambiguous"),
])
def test_bad_labels_give_one_line_and_write_nothing(official_bundle, tmp_path, labels, message):
    result = CliRunner().invoke(run_cli, ["generate", "--bundle", str(official_bundle), "--labels", labels,
                                          "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "g.png").exists()


def test_encode_decode_reconstruct_and_info(official_bundle, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    runner = CliRunner()
    result = runner.invoke(run_cli, ["encode", "--bundle", str(official_bundle), str(tmp_path / "a.png"),
                                     "--out", str(tmp_path / "tokens.npy")])
    assert result.exit_code == 0, result.output
    tokens = np.load(tmp_path / "tokens.npy")
    assert tokens.shape == (1, 8, 8) and tokens.dtype == np.int64
    result = runner.invoke(run_cli, ["decode", "--bundle", str(official_bundle), str(tmp_path / "tokens.npy"),
                                     "--out", str(tmp_path / "decoded.png")])
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(tmp_path / "decoded.png")).shape == (36, 36, 3)
    result = runner.invoke(run_cli, ["reconstruct", "--bundle", str(official_bundle), str(tmp_path / "a.png"),
                                     "--out", str(tmp_path / "recon.png")])
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(tmp_path / "recon.png")).shape == (70, 36, 3)     # original above reconstruction
    result = runner.invoke(run_cli, ["info", "--bundle", str(official_bundle)])
    info = json.loads(result.output)
    assert info["runtime"]["providers"] == ["CPUExecutionProvider"] and info["num_classes"] == 1000


def test_corrupt_png_is_one_line_error_and_nothing_written(official_bundle, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    result = CliRunner().invoke(run_cli, ["encode", "--bundle", str(official_bundle), str(tmp_path / "bad.png"),
                                          "--out", str(tmp_path / "t.npy")])
    assert result.exit_code == 1 and "cannot read image" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "t.npy").exists()


def test_tampered_bundle_via_cli(official_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(official_bundle, copy)
    with open(copy / "step.onnx", "ab") as f:
        f.write(b"\0")
    result = CliRunner().invoke(run_cli, ["generate", "--bundle", str(copy), "--labels", "1", "--out",
                                          str(tmp_path / "g.png")])
    assert result.exit_code == 1 and "step.onnx does not match its sha256" in result.output


def test_missing_bundle_and_no_demo(tmp_path):
    result = CliRunner().invoke(run_cli, ["info", "--bundle", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_export_cli_errors_are_one_line(tmp_path, official):
    from maskbit_export.cli import main as export_cli
    runner = CliRunner()
    result = runner.invoke(export_cli, ["build-engines", "--tokenizer", str(official / "generator_lfq10.bin"),
                                        "--config", str(official / "generator_lfq10.yaml"),
                                        "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "is a generator checkpoint, not a tokenizer" in result.output
    torch.save(maskbit.build_tokenizer("maskbit_tokenizer_12bit").state_dict(), tmp_path / "t12.bin")
    result = runner.invoke(export_cli, ["build-engines", "--tokenizer", str(tmp_path / "t12.bin"),
                                        "--config", "maskbit_tokenizer_10bit", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "maskbit_tokenizer_12bit" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_batch_size_option_splits(official_bundle, tmp_path):
    runner = CliRunner()
    a = runner.invoke(run_cli, ["generate", "--bundle", str(official_bundle), "--labels", "5,6,7", "--num-steps", "3",
                                "--batch-size", "1", "--out", str(tmp_path / "a")])
    b = runner.invoke(run_cli, ["generate", "--bundle", str(official_bundle), "--labels", "5,6,7", "--num-steps", "3",
                                "--out", str(tmp_path / "b")])
    assert a.exit_code == 0 and b.exit_code == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 3
    for name in names:
        a_image, b_image = (np.asarray(Image.open(tmp_path / d / name)) for d in "ab")
        assert np.array_equal(a_image, b_image)


def test_build_bundle_rejects_mismatched_models(tmp_path):
    with pytest.raises(ValueError, match="predicts 6-bit tokens"):
        build_bundle(tmp_path / "x", maskbit.build_tokenizer("tiny_lfq10"), maskbit.build_generator("tiny_lfq6_g1"))
