"""Feature spaces: torch-fidelity's Inception-v3 (the TF FID network, ported), the demo crop classifier, and
thumbnail pixels.

A network maps uint8 images [B,H,W,3] to (features float64 [B,D], logits float64 [B,C]). Inception weights are
read from a local file or the torch hub cache and never downloaded; `load_inception(random_init=True)` builds the
same network with random weights, for plumbing tests only (its numbers mean nothing).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from maskbit_runtime.errors import InputError, require

from .images import ImageSet
from .metrics import FeatureStats

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"      # torch-fidelity's conversion of the TF weights
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
FEATURES = ("inception", "demo", "pixels")
PIXEL_SIDE = 16


def default_inception_weights() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def find_inception_weights(weights: str | Path | None = None) -> Path:
    """The weights file given, else the torch hub cache's; a missing file is one line saying where to put it."""
    path = Path(weights) if weights else default_inception_weights()
    if not path.is_file():
        raise InputError(f"Inception weights not found: {path} (they are never downloaded); fetch {INCEPTION_URL} "
                         f"on a connected machine and put it at {default_inception_weights()} or pass "
                         f"--inception-weights FILE")
    return path


class InceptionFeatures:
    """Pool features (2048) for FID/KID/PR and the unbiased logits (1008) for the Inception Score."""

    name = "inception-v3-compat"
    dim = 2048
    inception_score = True

    def __init__(self, model: torch.nn.Module, device: str = "cpu"):
        self.model = model.to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)   # (B, 3, H, W)
        pool, logits = self.model(x)                                                   # (B, 2048), (B, 1008)
        return pool.double().cpu().numpy(), logits.double().cpu().numpy()


def load_inception(weights: str | Path | None = None, random_init: bool = False,
                   device: str = "cpu") -> InceptionFeatures:
    """torch-fidelity's FeatureExtractorInceptionV3 with weights loaded by us (`torch.load(weights_only=True)`,
    so a file that would run code is refused). `random_init=True` skips the weights: tests only."""
    fe = require("torch_fidelity.feature_extractor_inceptionv3", "eval", "Inception features")

    class _Inception(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if not state_dict:          # the constructor's load of our empty placeholder: keep the layers as built
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    state = None if random_init else _read_inception_state(find_inception_weights(weights))
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    model = _Inception("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=empty)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise InputError(f"{weights or default_inception_weights()} does not fit the FID Inception network "
                             f"({str(exc).splitlines()[0]}); use {INCEPTION_FILE}") from None
    return InceptionFeatures(model.eval(), device)


def _read_inception_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:      # pickle errors of a foreign or corrupt file come in many types
        raise InputError(f"cannot read Inception weights {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not state:
        raise InputError(f"{path} is not a state dict of Inception weights")
    return state


class DemoFeatures:
    """The demo crop classifier: pooled penultimate features (64) and the 8 class logits."""

    name = "demo-crop-classifier"
    inception_score = False

    def __init__(self, classifier):
        self.classifier = classifier
        self.dim = classifier.feature_dim

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.classifier.features_and_logits(images)


class PixelFeatures:
    """Thumbnails: every image area-averaged to 16x16 RGB in [0, 1], flattened (768 values); no logits.

    A feature space that learns nothing and so depends on nothing in this project: for small images of few
    scenes (the demo's crops) neighbourhoods in it follow what the images show and where (layout, colour), and a
    decoder's softness barely moves them, unlike a classifier's features. Meaningless across image sizes far from
    16 px per side of content; use Inception for natural images."""

    name = f"pixels-{PIXEL_SIDE}x{PIXEL_SIDE}"
    dim = 3 * PIXEL_SIDE * PIXEL_SIDE
    inception_score = False

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).double() / 255.0   # (B, 3, H, W)
        thumbs = torch.nn.functional.adaptive_avg_pool2d(x, PIXEL_SIDE)                             # (B, 3, 16, 16)
        return thumbs.flatten(1).numpy(), np.zeros((len(images), 0))


def load_demo_features(path: str | Path | None = None) -> DemoFeatures:
    from .demo_network import load_demo_network
    return DemoFeatures(load_demo_network(path))


def load_features(features: str, inception_weights: str | Path | None = None, device: str = "cpu"):
    """'inception', 'demo' or 'pixels' -> a feature network."""
    if features == "inception":
        return load_inception(inception_weights, device=device)
    if features == "demo":
        return load_demo_features()
    if features == "pixels":
        return PixelFeatures()
    raise InputError(f"unknown features {features!r}; expected one of {', '.join(FEATURES)}")


def extract(network, images: ImageSet | np.ndarray, batch_size: int = 50,
            progress: Callable[[int], None] | None = None) -> tuple[FeatureStats, np.ndarray]:
    """Features of every image -> (their statistics, with the features kept; the logits [N,C])."""
    if isinstance(images, np.ndarray):
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    else:
        batches = images.batches(batch_size)
    features, logits = [], []
    for batch in batches:
        f, lg = network(batch)
        features.append(f)
        logits.append(lg)
        if progress:
            progress(len(batch))
    return FeatureStats.from_features(np.concatenate(features), network.name), np.concatenate(logits)
