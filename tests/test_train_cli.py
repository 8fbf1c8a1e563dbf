"""`maskbit-train` errors are one clear line and a non-zero exit; corrupt images are skipped, warned and counted."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from train_support import FAST, cli, make_photo_folder

from maskbit.train.cli import main

CONFIGS = Path("/work/shared/reference/official_configs")
RUN = ("--max-steps", "2", "--batch-size", "4", "--eval-every", "0", "--save-every", "0", "--quiet", *FAST)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"), per_photo=2, size=40)


def _invoke(*args):
    result = CliRunner().invoke(main, list(args))
    return result


def _one_line_error(result, pattern):
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and pattern in lines[0], result.output


def test_bad_dataset_path(tmp_path):
    result = _invoke("tokenizer", "--config", "tiny_lfq10", "--data", str(tmp_path / "missing"),
                     "--output-dir", str(tmp_path / "o"), *RUN)
    _one_line_error(result, "does not exist")


def test_empty_class_folder(photos, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    (data / "5_empty").mkdir()
    result = _invoke("tokenizer", "--config", "tiny_lfq10", "--data", str(data), "--output-dir", str(tmp_path / "o"),
                     *RUN)
    _one_line_error(result, "5_empty holds no images")


def test_tokenizer_only_config_refused_by_generator_stage(photos, tmp_path):
    result = _invoke("generator", "--config", "tiny_vq", "--data", str(photos), "--output-dir", str(tmp_path / "o"),
                     "--tokenizer", str(tmp_path / "tok.safetensors"), *RUN)
    _one_line_error(result, "describes only a tokenizer")


@pytest.mark.skipif(not CONFIGS.exists(), reason="official configs not present")
def test_generator_yaml_refused_by_tokenizer_stage(photos, tmp_path):
    result = _invoke("tokenizer", "--config", str(CONFIGS / "generator" / "maskbit_generator_10bit.yaml"),
                     "--data", str(photos), "--output-dir", str(tmp_path / "o"), *RUN)
    _one_line_error(result, "generator training config")


def test_unknown_override_and_missing_perceptual_weights(photos, tmp_path):
    result = _invoke("tokenizer", "--config", "tiny_lfq10", "--data", str(photos), "--output-dir", str(tmp_path),
                     *RUN, "losses.discriminator_strat=3")
    _one_line_error(result, "unknown setting 'losses.discriminator_strat'")
    result = _invoke("tokenizer", "--config", "tiny_lfq10", "--data", str(photos), "--output-dir", str(tmp_path),
                     *RUN, "losses.perceptual_weight=0.1", "--perceptual-weights", str(tmp_path / "resnet.pth"))
    _one_line_error(result, "perceptual weights")


def test_corrupt_image_is_skipped_with_a_warning_and_counted(photos, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photos, data)
    (data / "1_chelsea" / "000.png").write_bytes(b"\x89PNG truncated")
    proc = cli("tokenizer", "--config", "tiny_lfq10", "--data", str(data), "--output-dir", str(tmp_path / "o"),
               "--threads", "1", *RUN[:-len(FAST)], "--max-steps", "3", *FAST)
    assert "warning: skipped corrupt image" in proc.stderr and "000.png" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["corrupt_images"] == 1
    bad = cli("tokenizer", "--config", "tiny_lfq10", "--data", str(tmp_path / "nowhere"), "--output-dir",
              str(tmp_path / "o2"), *RUN, check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
