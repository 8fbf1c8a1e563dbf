"""maskbit.evaluation: the metrics against closed forms, input checks, the CLI, and the demo's ordering."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("torch_fidelity", reason="the eval extra (torch-fidelity) is not installed")

from maskbit.evaluation import FeatureStats, frechet_distance, kernel_distance, precision_recall  # noqa: E402
from maskbit.evaluation.cli import main as eval_cli  # noqa: E402
from maskbit.evaluation.images import open_images  # noqa: E402
from maskbit.evaluation.metrics import inception_score  # noqa: E402
from maskbit_runtime.errors import InputError  # noqa: E402


def _gaussian_stats(mu, sigma):
    return FeatureStats(np.asarray(mu, float), np.asarray(sigma, float), count=0)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- metrics against closed forms

def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    # commuting covariances: FID = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the standard deviations
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()          # 7.25 + 6.25
    got = frechet_distance(_gaussian_stats(mu1, np.diag(s1 ** 2)), _gaussian_stats(mu2, np.diag(s2 ** 2)))
    assert got == pytest.approx(expected, rel=1e-10) and expected == pytest.approx(13.5)


def test_frechet_distance_matches_the_closed_form_for_full_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = _random_spd(rng, 6), _random_spd(rng, 6)
    root1 = scipy_linalg.sqrtm(s1).real
    cross = scipy_linalg.sqrtm(root1 @ s2 @ root1).real          # symmetric form of (S1 S2)^(1/2)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * cross)
    assert frechet_distance(_gaussian_stats(mu1, s1), _gaussian_stats(mu2, s2)) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("n, d", [(200, 16), (12, 64)])      # full rank, and rank-deficient covariance
def test_fid_of_a_set_with_itself_is_zero(n, d):
    features = np.random.default_rng(1).normal(size=(n, d)) * 3.0
    stats = FeatureStats.from_features(features)
    assert abs(frechet_distance(stats, stats)) < 1e-6 * np.trace(stats.sigma)
    other = FeatureStats.from_features(features + 0.5)
    float_error = 1e-6 * np.trace(stats.sigma)          # eigenvalues of a singular S1 S2 carry rounding error
    assert frechet_distance(stats, other) == pytest.approx(0.25 * d, abs=float_error)      # shift only: |dmu|^2


def test_precision_recall_directions():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 8))
    assert precision_recall(real, real) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(far, real) == (0.0, 0.0)
    # a collapsed generator: every sample near one real mode -> precise, but covers little of the real set
    collapsed = real[:1] + 0.01 * rng.normal(size=(300, 8))
    precision, recall = precision_recall(collapsed, real)
    assert precision == 1.0 and recall < 0.05


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = kernel_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = kernel_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.01 < shifted


def test_inception_score_bounds():
    classes = 10
    confident = np.full((100, classes), -50.0)
    confident[np.arange(100), np.arange(100) % classes] = 50.0         # sure, and evenly spread: IS = classes
    assert inception_score(confident, splits=1)[0] == pytest.approx(classes, rel=1e-6)
    one_class = np.zeros((100, classes))
    one_class[:, 0] = 50.0                                             # every image the same class: IS = 1
    assert inception_score(one_class, splits=1)[0] == pytest.approx(1.0, rel=1e-6)


def test_stats_files_round_trip_and_refuse_bad_shapes(tmp_path):
    stats = FeatureStats.from_features(np.random.default_rng(4).normal(size=(20, 5)), "demo-crop-classifier")
    loaded = FeatureStats.load(stats.save(tmp_path / "s.npz"))
    np.testing.assert_allclose(loaded.sigma, stats.sigma)
    assert loaded.network == "demo-crop-classifier" and loaded.count == 20 and loaded.features.shape == (20, 5)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(5), sigma=np.zeros((4, 4)))
    with pytest.raises(InputError, match=r"sigma \[4, 4\]"):
        FeatureStats.load(tmp_path / "bad.npz")
    with pytest.raises(InputError, match="2048-dimensional"):
        loaded.check_network("inception-v3-compat", 2048, "ref")


# ---------------------------------------------------------------- image sets

def _write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def test_npz_images_stream_in_batches_compressed_or_not(tmp_path):
    images = np.random.default_rng(5).integers(0, 256, (7, 9, 11, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=images)
    np.savez_compressed(tmp_path / "b.npz", arr_0=images)
    for name in ("a.npz", "b.npz"):
        image_set = open_images(tmp_path / name)
        assert (image_set.count, image_set.height, image_set.width) == (7, 9, 11)
        assert [len(b) for b in image_set.batches(3)] == [3, 3, 1]
        np.testing.assert_array_equal(image_set.load(), images)
    np.savez(tmp_path / "f.npz", arr_0=images.astype(np.float32))
    with pytest.raises(InputError, match="uint8"):
        open_images(tmp_path / "f.npz")


def test_folders_convert_to_rgb_and_refuse_mixed_sizes(tmp_path):
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(tmp_path / "rgba.png")
    loaded = open_images(tmp_path).load()
    assert loaded.shape == (2, 8, 8, 3) and (loaded[0] == 77).all()
    Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(InputError, match="mixed sizes"):
        open_images(tmp_path)


# ---------------------------------------------------------------- the command line: one line, nothing written

@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    from maskbit.evaluation.demo_network import crops_dataset
    root = tmp_path_factory.mktemp("crops")
    a, _ = crops_dataset(3, seed=11)                  # 24 crops
    b, _ = crops_dataset(3, seed=12)
    np.savez(root / "a.npz", arr_0=a)
    return {"a_npz": root / "a.npz", "b_dir": _write_folder(root / "b", b), "a": a, "b": b, "root": root}


def test_metrics_demo_features_folder_vs_npz(crops, tmp_path):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(eval_cli, ["metrics", "--samples", str(crops["b_dir"]), "--reference",
                                           str(crops["a_npz"]), "--features", "demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["features"] == "demo-crop-classifier" and report["samples"] == report["reference"] == 24
    assert report["fid"] > 0 and 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
    assert "inception_score" not in report and "fid:" in result.output


def test_pixel_features_are_area_averaged_thumbnails(crops, tmp_path):
    from maskbit.evaluation.features import PixelFeatures
    images = np.zeros((2, 64, 64, 3), np.uint8)
    images[0, :4, :4, 0] = 255                          # one 4x4 block -> one thumbnail pixel of the red channel
    images[1, :, 32:] = 255                             # right half white
    features, logits = PixelFeatures()(images)
    assert features.shape == (2, 768) and logits.shape == (2, 0)
    assert features[0, 0] == 1.0 and features[0].sum() == 1.0
    assert features[1].reshape(3, 16, 16)[:, :, 8:].min() == 1.0 and features[1].reshape(3, 16, 16)[:, :, :8].max() == 0
    out = tmp_path / "m.json"
    result = CliRunner().invoke(eval_cli, ["metrics", "--samples", str(crops["b_dir"]), "--reference",
                                           str(crops["a_npz"]), "--features", "pixels", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["features"] == "pixels-16x16" and report["fid"] > 0 and 0 < report["recall"] <= 1


def test_stats_then_metrics_against_them_gives_the_same_numbers(crops, tmp_path):
    runner = CliRunner()
    result = runner.invoke(eval_cli, ["stats", str(crops["a_npz"]), "--features", "demo",
                                      "--out", str(tmp_path / "ref.npz")])
    assert result.exit_code == 0, result.output
    reports = []
    for reference in (crops["a_npz"], tmp_path / "ref.npz"):
        result = runner.invoke(eval_cli, ["metrics", "--samples", str(crops["b_dir"]), "--reference", str(reference),
                                          "--features", "demo", "--out", str(tmp_path / "m.json")])
        assert result.exit_code == 0, result.output
        reports.append(json.loads((tmp_path / "m.json").read_text()))
    assert reports[0]["fid"] == pytest.approx(reports[1]["fid"], rel=1e-5)
    assert reports[0]["precision"] == pytest.approx(reports[1]["precision"])
    # statistics without features (like pytorch-fid's or ADM's mu/sigma): FID alone
    result = runner.invoke(eval_cli, ["stats", str(crops["a_npz"]), "--features", "demo", "--no-features",
                                      "--out", str(tmp_path / "mu_sigma.npz")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(eval_cli, ["metrics", "--samples", str(crops["b_dir"]), "--reference",
                                      str(tmp_path / "mu_sigma.npz"), "--features", "demo",
                                      "--out", str(tmp_path / "f.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["fid"] == pytest.approx(reports[0]["fid"], rel=1e-5) and report["precision"] is None


def _fails_with_one_line(args, expected, out):
    result = CliRunner().invoke(eval_cli, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.output
    assert not out.exists() and not any(out.parent.glob(f".{out.name}*"))


def test_bad_input_is_one_line_and_writes_nothing(crops, tmp_path, monkeypatch):
    out = tmp_path / "m.json"
    (tmp_path / "empty").mkdir()
    _write_folder(tmp_path / "mixed", [np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)])
    _write_folder(tmp_path / "three", list(crops["a"][:3]))
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(10), sigma=np.zeros((10, 10)))
    common = ["--out", str(out), "--reference", str(crops["a_npz"])]
    _fails_with_one_line(["metrics", "--samples", str(tmp_path / "empty"), "--features", "demo", *common],
                         "no images in", out)
    _fails_with_one_line(["metrics", "--samples", str(tmp_path / "mixed"), "--features", "demo", *common],
                         "mixed sizes", out)
    _fails_with_one_line(["metrics", "--samples", str(tmp_path / "three"), "--features", "demo", *common],
                         "needs at least 4 images", out)
    _fails_with_one_line(["metrics", "--samples", str(crops["b_dir"]), "--features", "demo", "--out", str(out),
                          "--reference", str(tmp_path / "wrong.npz")], "10-dimensional statistics", out)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))          # an empty hub cache
    _fails_with_one_line(["metrics", "--samples", str(crops["b_dir"]), *common], "Inception weights not found", out)
    _fails_with_one_line(["metrics", "--samples", str(crops["b_dir"]), "--inception-weights",
                          str(tmp_path / "nope.pth"), *common], "nope.pth", out)
    _fails_with_one_line(["stats", str(tmp_path / "three"), "--features", "demo", "--out", str(tmp_path / "s.npz")],
                         "at least 4 images", tmp_path / "s.npz")


def test_foreign_inception_weights_are_refused_in_one_line(crops, tmp_path):
    import torch
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    _fails_with_one_line(["metrics", "--samples", str(crops["b_dir"]), "--reference", str(crops["a_npz"]),
                          "--inception-weights", str(tmp_path / "other.pth"), "--out", str(tmp_path / "m.json")],
                         "does not fit the FID Inception network", tmp_path / "m.json")


# ---------------------------------------------------------- Inception plumbing (random weights: meaningless numbers)

def test_inception_plumbing_with_random_weights(crops):
    from maskbit.evaluation import evaluate_samples, load_inception, open_images, open_reference
    network = load_inception(random_init=True)
    samples = open_images(crops["a_npz"])
    small = crops["root"] / "small.npz"
    np.savez(small, arr_0=crops["a"][::6])                                 # 4 images, one of each of 4 classes
    report = evaluate_samples(open_images(small), open_reference(small), network, batch_size=4)
    assert report["features"] == "inception-v3-compat" and report["samples"] == 4
    assert abs(report["fid"]) < 1e-6 and report["precision"] == report["recall"] == 1.0   # X against X
    assert report["inception_score"] >= 1.0 - 1e-9 and samples.count == 24
