"""Tokenizer reconstruction quality: PSNR, SSIM (`maskbit.image_quality`, as training logs them), rFID and codebook
usage, from a bundle.

`evaluate_reconstruction(bundle, images)` encodes and decodes every image with the bundle's ONNX tokenizer in
batches (memory stays bounded), so it measures exactly what `maskbit-run reconstruct` produces.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from maskbit_runtime.errors import InputError

from .. import image_quality
from .images import ImageSet
from .metrics import FeatureStats, frechet_distance


def psnr_per_image(original: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """PSNR in dB of each uint8 image pair [B,H,W,3] (`maskbit.image_quality.psnr`)."""
    return image_quality.psnr(image_quality.from_uint8(original), image_quality.from_uint8(reconstruction)).numpy()


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean per-image PSNR in dB of uint8 images [B,H,W,3]."""
    return float(psnr_per_image(original, reconstruction).mean())


def ssim_per_image(original: np.ndarray, reconstruction: np.ndarray, chunk: int = 8) -> np.ndarray:
    """SSIM of each uint8 image pair [B,H,W,3] (`maskbit.image_quality.ssim`: 11x11 Gaussian, the official
    evaluation's), `chunk` images at a time to bound memory."""
    return np.concatenate([image_quality.ssim(image_quality.from_uint8(original[i:i + chunk]),
                                              image_quality.from_uint8(reconstruction[i:i + chunk])).numpy()
                           for i in range(0, len(original), chunk)] or [np.zeros(0)])


def codebook_usage(counts: np.ndarray) -> dict:
    """From token counts per codebook entry: fraction of entries used and the perplexity exp(H) of their use."""
    total = counts.sum()
    p = counts[counts > 0] / total
    return {"codebook_size": int(len(counts)), "codes_used": int((counts > 0).sum()),
            "usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum())),
            "tokens": int(total)}


def evaluate_reconstruction(pipe, images: ImageSet, network=None, batch_size: int = 32,
                            progress: Callable[[int], None] | None = None) -> dict:
    """PSNR/SSIM (mean over images), codebook usage of the encoded tokens and, given a feature network, rFID
    (FID of the reconstructions against the originals, over the same images)."""
    size = pipe.manifest.dims.image_size
    if (images.height, images.width) != (size, size):
        raise InputError(f"{images.path} holds {images.width}x{images.height} images but the bundle's tokenizer "
                         f"takes {size}x{size}; resize or crop them first")
    if network is not None and images.count < 2:
        raise InputError(f"rFID needs at least 2 images, {images.path} has {images.count}")
    counts = np.zeros(pipe.manifest.codebook_size, dtype=np.int64)
    psnrs, ssims, real_features, recon_features = [], [], [], []
    for batch in images.batches(batch_size):
        tokens = pipe.encode(batch, batch_size)                          # (b, h, w)
        recon = pipe.decode(tokens, batch_size)                          # (b, H, W, 3)
        counts += np.bincount(tokens.ravel(), minlength=len(counts))
        psnrs.append(psnr_per_image(batch, recon))
        ssims.append(ssim_per_image(batch, recon))
        if network is not None:
            real_features.append(network(batch)[0])
            recon_features.append(network(recon)[0])
        if progress:
            progress(len(batch))
    report = {"images": images.count, "image_size": size, "psnr": float(np.concatenate(psnrs).mean()),
              "ssim": float(np.concatenate(ssims).mean()), "rfid": None, "features": None,
              "codebook": codebook_usage(counts)}
    if network is not None:
        real = FeatureStats.from_features(np.concatenate(real_features), network.name)
        recon = FeatureStats.from_features(np.concatenate(recon_features), network.name)
        report["rfid"], report["features"] = frechet_distance(recon, real), network.name
    return report


def reconstruction_features(features: str, pipe, inception_weights: str | Path | None = None):
    """'auto': the demo network for a bundle of the demo classes, else Inception when its weights are found,
    else None (rFID is skipped); 'none': None; 'demo' / 'inception': that network."""
    from .demo_network import DEMO_CLASSES
    from .features import default_inception_weights, load_features
    if features == "none":
        return None
    if features == "auto":
        if list(pipe.class_names or []) == list(DEMO_CLASSES):
            features = "demo"
        elif inception_weights or default_inception_weights().is_file():
            features = "inception"
        else:
            return None
    return load_features(features, inception_weights)
