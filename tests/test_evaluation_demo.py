"""maskbit-eval on the shipped demo: the feature network, the demo ordering, reconstruction and compare."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("torch_fidelity", reason="the eval extra (torch-fidelity) is not installed")

from maskbit.evaluation.cli import main as eval_cli  # noqa: E402
from maskbit.evaluation.demo import compare_bundles  # noqa: E402
from maskbit.evaluation.demo_network import (  # noqa: E402
    DEMO_NETWORK_FILE,
    HELD_OUT_SEED,
    accuracy,
    crops_dataset,
    load_demo_network,
)
from maskbit.evaluation.features import load_demo_features  # noqa: E402
from maskbit_runtime.cli import DEMO_BUNDLE  # noqa: E402


def test_shipped_demo_network_is_small_and_classifies_held_out_crops():
    assert DEMO_NETWORK_FILE.stat().st_size < 1e6
    images, labels = crops_dataset(32, HELD_OUT_SEED + 7)          # crops it was neither trained nor checked on
    assert accuracy(load_demo_network(), images, labels).accuracy >= 0.99


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo.json"
    args = ["demo", "--per-class", "4", "--reference-per-class", "16", "--out", str(out)]
    result = CliRunner().invoke(eval_cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_demo_ordering_real_then_reconstructions_then_generated(demo_report):
    real, recon, generated = (demo_report[k] for k in ("real", "reconstructed", "generated"))
    assert demo_report["images_per_set"] == 32
    assert real["fid"] < recon["fid"] < generated["fid"], demo_report
    assert real["class_accuracy"] >= 0.99 and recon["class_accuracy"] >= 0.9
    # in thumbnails, reconstructions are close to the real crops; the real crops bound both from above
    assert real["pixels"]["precision"] >= 0.8 and real["pixels"]["recall"] >= 0.7, demo_report
    assert recon["pixels"]["precision"] >= 0.6 and recon["pixels"]["recall"] >= 0.5, demo_report
    assert generated["recall"] < real["recall"], demo_report


def test_reconstruction_command_on_demo_crops(tmp_path):
    images, _ = crops_dataset(1, HELD_OUT_SEED)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    out = tmp_path / "rec.json"
    result = CliRunner().invoke(eval_cli, ["reconstruction", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["images"] == 8 and report["psnr"] > 18 and 0.3 < report["ssim"] <= 1
    assert report["rfid"] > 0 and report["features"] == "demo-crop-classifier"
    assert report["codebook"]["codebook_size"] == 1024 and 0 < report["codebook"]["usage"] <= 1
    (tmp_path / "wrong").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "wrong" / "a.png")
    result = CliRunner().invoke(eval_cli, ["reconstruction", str(tmp_path / "wrong")])
    assert result.exit_code == 1 and "takes 64x64" in result.output


class _StubPipeline:
    """Stands in for a Pipeline: a colour per class plus seeded noise; `drift` brightens every image (a different
    generator)."""

    num_classes = 8

    def __init__(self, drift=0):
        self.drift = drift
        self.manifest = SimpleNamespace(root="stub", dims=SimpleNamespace(image_size=64))

    def generate(self, labels, seed):
        colours = np.random.default_rng(123).integers(40, 216, (self.num_classes, 1, 1, 3))    # one per class
        noise = np.random.default_rng(seed).integers(-30, 31, (len(labels), 64, 64, 3))         # per seed
        images = np.clip(colours[labels] + noise + self.drift, 0, 255).astype(np.uint8)
        return SimpleNamespace(images=images, tokens=np.full((len(labels), 4, 4), seed + self.drift))


def test_compare_tells_a_different_generator_from_seed_to_seed_spread():
    network = load_demo_features()
    labels = list(range(8)) * 2
    same = compare_bundles(_StubPipeline(), _StubPipeline(), network, labels, seeds=(0, 1, 2))
    assert same["same_generator"] and same["b_vs_a"]["1"]["token_agreement"] == 1.0
    other = compare_bundles(_StubPipeline(), _StubPipeline(drift=40), network, labels, seeds=(0, 1, 2))
    assert not other["same_generator"] and other["max_fid_b_vs_a"] > other["max_fid_a_spread"]
    assert other["b_vs_a"]["0"]["token_agreement"] == 0.0 and other["b_vs_a"]["0"]["mean_abs_pixel_diff"] > 10


@pytest.mark.slow
def test_compare_a_bundle_with_itself_is_the_same_generator(tmp_path):
    out = tmp_path / "cmp.json"
    result = CliRunner().invoke(eval_cli, ["compare", str(DEMO_BUNDLE), str(DEMO_BUNDLE), "--per-class", "1",
                                           "--seeds", "0,1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["same_generator"] and report["b_vs_a"]["0"]["token_agreement"] == 1.0
    # identical images: FID 0 up to the rounding of a rank-deficient covariance (8 images, 64 features)
    assert abs(report["max_fid_b_vs_a"]) < 1e-3 * report["max_fid_a_spread"]
    result = CliRunner().invoke(eval_cli, ["compare", str(DEMO_BUNDLE), str(DEMO_BUNDLE), "--seeds", "0"])
    assert result.exit_code == 1 and "at least 2 distinct seeds" in result.output
