"""Samples against a reference: `evaluate_samples` (FID, KID, precision/recall, IS) and `compute_stats`.

    samples = open_images("samples.npz"); reference = open_reference("VIRTUAL_imagenet256_labeled.npz")
    check_inputs(samples, reference)                 # one-line InputError before any work
    report = evaluate_samples(samples, reference, load_features("inception"))
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from maskbit_runtime.errors import InputError

from .features import extract
from .images import ImageSet, is_npz_with, open_images
from .metrics import PRC_NEIGHBORHOOD, FeatureStats, check_count, compare, inception_score

MIN_IMAGES = PRC_NEIGHBORHOOD + 1       # k-th neighbour radii need k+1 points; also enough for a covariance


def open_reference(path: str | Path) -> ImageSet | FeatureStats:
    """An image folder, an `.npz` with `arr_0` images, or precomputed statistics (`mu`, `sigma` [, `features`])."""
    path = Path(path)
    if path.is_dir() or is_npz_with(path, "arr_0") or not is_npz_with(path, "mu"):
        return open_images(path)
    return FeatureStats.load(path)


def check_inputs(samples: ImageSet, reference: ImageSet | FeatureStats, network=None) -> None:
    """Refuse sets too small for precision/recall and statistics of another network, before any feature is made."""
    if isinstance(reference, FeatureStats):
        if network is not None:
            reference.check_network(network.name, network.dim, "the reference statistics")
        ref_count = len(reference.features) if reference.features is not None else MIN_IMAGES
    else:
        ref_count = reference.count
    check_count("precision/recall", samples.count, ref_count, MIN_IMAGES, f"k={PRC_NEIGHBORHOOD} neighbours")


def evaluate_samples(samples: ImageSet, reference: ImageSet | FeatureStats, network, batch_size: int = 50,
                     progress: Callable[[int], None] | None = None) -> dict:
    """FID, KID, precision/recall (k=3) of `samples` against `reference`, plus the Inception Score of the
    samples with Inception features."""
    check_inputs(samples, reference, network)
    sample_stats, logits = extract(network, samples, batch_size, progress)
    if isinstance(reference, ImageSet):
        reference, _ = extract(network, reference, batch_size, progress)
    report = {"features": network.name, "samples": samples.count, "reference": reference.count,
              **compare(sample_stats, reference)}
    if network.inception_score:
        report["inception_score"], report["inception_score_std"] = inception_score(logits)
    return report


def compute_stats(images: ImageSet, network, batch_size: int = 50,
                  progress: Callable[[int], None] | None = None) -> FeatureStats:
    """Reusable reference statistics (mu, sigma and the features, for KID and precision/recall)."""
    check_stats_input(images)
    return extract(network, images, batch_size, progress)[0]


def check_stats_input(images: ImageSet) -> None:
    if images.count < MIN_IMAGES:
        raise InputError(f"statistics for precision/recall need at least {MIN_IMAGES} images; "
                         f"{images.path} has {images.count}")
