"""Demo evaluation and bundle comparison, in the demo network's feature space (or Inception's).

`evaluate_demo` scores three sets of the same size against one reference of held-out real crops, in two feature
spaces: the demo network's (class accuracy, demo-FID; its features also see a decoder's softness, so even
reconstructions score low precision/recall there) and 16x16 thumbnails (`PixelFeatures`: precision/recall of
what the crops show and where, the variety of the demo data):
  generated      the bundle's samples, `per_class` per class, seed `seed`
  reconstructed  the tokenizer's reconstructions of other held-out real crops (the ceiling for generation)
  real           those real crops themselves (the floor: real-vs-real at this sample size)
`compare_bundles` asks whether bundle B is the same generator as bundle A: B's samples against A's for the same
seeds and labels, next to A's own seed-to-seed spread.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np

from maskbit_runtime.errors import InputError

from .demo_network import DEMO_CLASSES, HELD_OUT_SEED, accuracy, crops_dataset, load_demo_network
from .features import PixelFeatures, extract
from .metrics import PRC_NEIGHBORHOOD, FeatureStats, compare
from .reconstruction import psnr

REFERENCE_SEED = HELD_OUT_SEED          # the reference real crops
REAL_SEED = HELD_OUT_SEED + 1           # the real crops that are reconstructed, and the real-vs-real floor


def _check_demo_bundle(pipe) -> None:
    if list(pipe.class_names or []) != list(DEMO_CLASSES):
        raise InputError(f"bundle {pipe.manifest.root} is not a demo bundle: its classes are "
                         f"{pipe.class_names or 'unnamed'}, the demo's are {', '.join(DEMO_CLASSES)}")
    if pipe.manifest.dims.image_size != 64:
        raise InputError(f"bundle {pipe.manifest.root} makes {pipe.manifest.dims.image_size}px images; "
                         f"the demo crops are 64px")


def _score(network, images: np.ndarray, labels: np.ndarray, reference: FeatureStats,
           pixel_reference: FeatureStats) -> dict:
    stats, logits = extract(network, images)
    report = compare(stats, reference)
    report["class_accuracy"] = float((logits.argmax(-1) == labels).mean())
    pixels = compare(extract(PixelFeatures(), images)[0], pixel_reference)
    report["pixels"] = {key: pixels[key] for key in ("fid", "kid", "precision", "recall")}
    return report


def evaluate_demo(pipe, network, per_class: int = 16, seed: int = 0, reference_per_class: int = 64,
                  generated: np.ndarray | None = None, **sampling) -> dict:
    """Class accuracy, demo-FID, KID and precision/recall of generated, reconstructed and real crops; `sampling`
    overrides the bundle's sampling defaults (keyword arguments of `Pipeline.generate`). `generated`: the images
    `evaluation_labels(per_class)` give with this seed and these settings, when the caller already made them."""
    _check_demo_bundle(pipe)
    if per_class * len(DEMO_CLASSES) < PRC_NEIGHBORHOOD + 1:
        raise InputError(f"--per-class {per_class} is too few for precision/recall (k={PRC_NEIGHBORHOOD})")
    reference_images, _ = crops_dataset(reference_per_class, REFERENCE_SEED)
    references = extract(network, reference_images)[0], extract(PixelFeatures(), reference_images)[0]
    real, labels = crops_dataset(per_class, REAL_SEED)
    settings = pipe.sampling.with_overrides(**sampling)
    if generated is None:
        generated = pipe.generate(labels.tolist(), seed=seed, **settings.to_dict()).images
    elif len(generated) != len(labels):
        raise InputError(f"{len(generated)} generated images given for {len(labels)} labels")
    reconstructed = pipe.reconstruct(real)
    return {"bundle": str(pipe.manifest.root), "features": network.name, "pixel_features": PixelFeatures.name,
            "per_class": per_class, "seed": seed, "sampling": settings.to_dict(),
            "images_per_set": int(len(labels)), "reference_images": int(len(reference_images)),
            "generated": _score(network, generated, labels, *references),
            "reconstructed": _score(network, reconstructed, labels, *references),
            "real": _score(network, real, labels, *references)}


def evaluation_labels(per_class: int) -> np.ndarray:
    """The labels `evaluate_demo` generates, in order."""
    return crops_dataset(per_class, REAL_SEED)[1]


def _generate(pipe, labels: list[int], seed: int):
    out = pipe.generate(labels, seed=seed)
    return out.images, out.tokens


def compare_bundles(pipe_a, pipe_b, network, labels: list[int], seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """B's samples vs A's (same labels and seeds) next to A's seed-to-seed spread. Same generator: every B-vs-A
    FID is within the spread (and, for a faithful build, tokens agree and pixels barely differ)."""
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise InputError(f"compare needs at least 2 distinct seeds for A's seed-to-seed spread, got {list(seeds)}")
    if len(labels) < PRC_NEIGHBORHOOD + 1:
        raise InputError(f"compare needs at least {PRC_NEIGHBORHOOD + 1} samples per seed for precision/recall, "
                         f"got {len(labels)}")
    if pipe_a.num_classes != pipe_b.num_classes or \
            pipe_a.manifest.dims.image_size != pipe_b.manifest.dims.image_size:
        raise InputError(f"bundles differ in classes ({pipe_a.num_classes} vs {pipe_b.num_classes}) or image size "
                         f"({pipe_a.manifest.dims.image_size} vs {pipe_b.manifest.dims.image_size})")
    a = {s: _generate(pipe_a, labels, s) for s in seeds}
    b = {s: _generate(pipe_b, labels, s) for s in seeds}
    stats_a = {s: extract(network, a[s][0])[0] for s in seeds}
    stats_b = {s: extract(network, b[s][0])[0] for s in seeds}
    cross = {}
    for s in seeds:
        report = compare(stats_b[s], stats_a[s])
        report["token_agreement"] = float((a[s][1] == b[s][1]).mean())
        report["mean_abs_pixel_diff"] = float(np.abs(a[s][0].astype(np.int16) - b[s][0]).mean())
        cross[str(s)] = report
    spread = {f"{s}-{t}": compare(stats_a[t], stats_a[s]) for s, t in combinations(seeds, 2)}
    worst_cross = max(r["fid"] for r in cross.values())
    widest_spread = max(r["fid"] for r in spread.values())
    return {"bundle_a": str(pipe_a.manifest.root), "bundle_b": str(pipe_b.manifest.root), "features": network.name,
            "samples_per_seed": len(labels), "seeds": list(seeds), "b_vs_a": cross, "a_seed_spread": spread,
            "max_fid_b_vs_a": worst_cross, "max_fid_a_spread": widest_spread,
            "same_generator": bool(worst_cross <= widest_spread)}


def demo_labels(pipe, per_class: int) -> list[int]:
    return np.repeat(np.arange(pipe.num_classes), per_class).tolist()


def default_features_for(pipe, features: str, inception_weights: str | Path | None):
    """'auto': the demo network for demo bundles, Inception otherwise."""
    from .features import load_features
    if features == "auto":
        features = "demo" if list(pipe.class_names or []) == list(DEMO_CLASSES) else "inception"
    return load_features(features, inception_weights)


def evaluate_bundle(bundle, classifier=None, samples_per_class: int = 16, seeds: tuple[int, ...] = (0,),
                    held_out_per_class: int = 16) -> dict:
    """Recognition rate of generated images by the demo classifier (default: the shipped demo network) and
    reconstruction PSNR on held-out crops (`scripts/evaluate_demo.py`)."""
    from maskbit_runtime import Pipeline
    classifier = classifier or load_demo_network()
    labels = np.repeat(np.arange(len(DEMO_CLASSES)), samples_per_class)
    with Pipeline.load(bundle) as pipe:
        generated = [pipe.generate(labels.tolist(), seed=seed).images for seed in seeds]
        real, real_labels = crops_dataset(held_out_per_class, HELD_OUT_SEED)
        recon = pipe.reconstruct(real)
    recognised = accuracy(classifier, np.concatenate(generated), np.tile(labels, len(seeds)))
    return {"generated_accuracy": recognised.accuracy, "generated_per_class": recognised.per_class,
            "samples": int(len(labels) * len(seeds)), "seeds": list(seeds),
            "reconstruction_psnr": psnr(real, recon),
            "held_out_accuracy": accuracy(classifier, real, real_labels).accuracy,
            "reconstruction_accuracy": accuracy(classifier, recon, real_labels).accuracy}
