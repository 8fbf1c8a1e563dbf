"""The demo model shipped with the package: works out of the box, and its images are recognisable."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import maskbit
from maskbit.demo_data import DEMO_CLASSES, demo_crops
from maskbit.evaluation.demo import evaluate_demo, evaluation_labels
from maskbit.evaluation.demo_network import HELD_OUT_SEED, accuracy, crops_dataset, train_classifier
from maskbit.evaluation.reconstruction import psnr
from maskbit.evaluation.features import PixelFeatures, load_demo_features
from maskbit_runtime import Pipeline
from maskbit_runtime.cli import DEMO_BUNDLE
from maskbit_runtime.cli import main as run_cli

DEMO_WEIGHTS = maskbit.DEMO_DIR
RECONSTRUCTION_PSNR_MIN = 21.0          # dB on held-out crops; measured 22.0 (scripts/evaluate_demo.py)
RECOGNITION_MIN = 0.90          # the bar; measured 0.992 at seed 0 (maskbit-eval demo)
# `maskbit-eval demo --per-class 16 --seed 0` (128 samples against 512 held-out crops, 16x16 thumbnails):
# measured precision 0.789, recall 0.648 (the 2500-step generator: 0.64, 0.53; the first demo generator: 0.60,
# 0.16); the goal is 0.6 for both
PRECISION_MIN = 0.70
RECALL_MIN = 0.60


def test_demo_assets_are_shipped_and_verified():
    pipe = Pipeline.load(DEMO_BUNDLE)
    report = pipe.manifest.verification
    assert report["performed"] and report["generation"]["passed"]
    assert list(pipe.class_names) == list(DEMO_CLASSES) and pipe.num_classes == 8
    assert report["generation_unguided"]["passed"]
    size = sum(p.stat().st_size for p in DEMO_BUNDLE.iterdir()) + sum(
        p.stat().st_size for p in DEMO_WEIGHTS.glob("*.safetensors"))
    assert size < 30e6


def test_generate_with_no_bundle_uses_the_demo(tmp_path):
    result = CliRunner().invoke(run_cli, ["generate", "--labels", "coffee,rocket", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert "wrote 2 image(s) of 64x64" in result.output
    assert np.asarray(Image.open(tmp_path / "s.png")).shape == (68, 2 + 2 * 66, 3)


def test_reconstruct_and_bitflip_with_the_demo(tmp_path):
    Image.fromarray(demo_crops("retina", 1, seed=HELD_OUT_SEED)[0]).save(tmp_path / "r.png")
    runner = CliRunner()
    result = runner.invoke(run_cli, ["reconstruct", str(tmp_path / "r.png"), "--out", str(tmp_path / "rec.png")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(run_cli, ["bitflip", "--image", str(tmp_path / "r.png"), "--out", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(tmp_path / "b.png"))
    assert grid.shape == (68, 2 + 12 * 66, 3)           # original, reconstruction, 10 flipped bits
    result = runner.invoke(run_cli, ["bitflip", "--image", str(tmp_path / "r.png"), "--bits", "0,10",
                                     "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 1 and "bit 10 does not exist" in result.output


def test_demo_weights_load_and_match_the_bundle():
    tok = maskbit.load_tokenizer(DEMO_WEIGHTS / "tokenizer.safetensors")
    gen = maskbit.load_generator(DEMO_WEIGHTS / "generator.safetensors", "demo64")
    eager = maskbit.generate(tok, gen, labels=[2, 3], num_steps=6, seed=5)
    with Pipeline.load(DEMO_BUNDLE) as pipe:
        np.testing.assert_array_equal(pipe.generate(labels=[2, 3], num_steps=6, seed=5).tokens, eager.tokens)


@pytest.fixture(scope="module")
def classifier():
    return train_classifier()


@pytest.fixture(scope="module")
def demo_samples():
    """The shipped defaults on the evaluation seed (`maskbit-eval demo --per-class 16 --seed 0`), generated once and
    judged by every test below: (pipeline, labels, images)."""
    labels = evaluation_labels(16)
    with Pipeline.load(DEMO_BUNDLE) as pipe:
        yield pipe, labels, pipe.generate(labels.tolist(), seed=0).images


def test_demo_images_are_recognised_and_reconstructions_are_faithful(classifier, demo_samples):
    pipe, labels, images = demo_samples
    real, real_labels = crops_dataset(8, HELD_OUT_SEED)
    assert accuracy(classifier, real, real_labels).accuracy >= 0.95        # the judge itself works on real crops
    assert accuracy(classifier, images, labels).accuracy >= RECOGNITION_MIN
    assert psnr(real, pipe.reconstruct(real)) >= RECONSTRUCTION_PSNR_MIN


def _spread(images: np.ndarray) -> float:
    """Mean distance between the 16x16 thumbnails of every pair of images."""
    features = PixelFeatures()(images)[0]
    distances = np.sqrt(((features[:, None] - features[None]) ** 2).sum(-1))
    return float(distances[np.triu_indices(len(features), 1)].mean())


def test_demo_samples_cover_the_real_crops(demo_samples):
    """Recognisable, and as varied as the data (the first demo generator drew nearly one image per class: recall
    0.11 in an independent check)."""
    pipe, labels, images = demo_samples
    report = evaluate_demo(pipe, load_demo_features(), per_class=16, seed=0, generated=images)
    generated = report["generated"]
    assert generated["class_accuracy"] >= RECOGNITION_MIN, generated
    assert generated["pixels"]["precision"] >= PRECISION_MIN, generated
    assert generated["pixels"]["recall"] >= RECALL_MIN, generated
    for label, name in [(2, "coffee"), (6, "retina")]:       # images differ within a class like real crops do
        assert _spread(images[labels == label]) >= 0.6 * _spread(demo_crops(name, 16, seed=HELD_OUT_SEED)), name
