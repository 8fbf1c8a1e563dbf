"""Quality checks of the demo model: a small classifier of the 8 demo classes trained on real crops, and PSNR.

The classifier never sees generated images or reconstructions while training; it judges whether the demo
generator's images are recognisable as crops of the photo they were generated for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .demo_data import DEMO_CLASSES, demo_crops

# crops for the classifier use seeds far from the training data's seed 0
CLASSIFIER_TRAIN_SEED = 1000
HELD_OUT_SEED = 2000


class CropClassifier(nn.Module):
    """A small CNN over RGB crops (pooled to 32x32 first) -> 8 class logits."""

    def __init__(self, num_classes: int = len(DEMO_CLASSES), width: int = 16):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = F.adaptive_avg_pool2d(images, 32)      # (B, 3, 32, 32)
        x = self.features(images)                       # (B, 4*width, 4, 4)
        return self.head(x.mean(dim=(2, 3)))            # (B, classes)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B,H,W,3] -> predicted class indices [B]."""
        self.eval()
        return self(_to_tensor(images)).argmax(-1).numpy()


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def crops_dataset(per_class: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    images = np.concatenate([demo_crops(name, per_class, size, seed) for name in DEMO_CLASSES])
    labels = np.repeat(np.arange(len(DEMO_CLASSES)), per_class)
    return images, labels


def train_classifier(per_class: int = 96, steps: int = 200, batch_size: int = 32, seed: int = 0) -> CropClassifier:
    """Train on real crops (seed CLASSIFIER_TRAIN_SEED), with light blur/noise augmentation, deterministically."""
    torch.manual_seed(seed)
    images, labels = crops_dataset(per_class, CLASSIFIER_TRAIN_SEED)
    x, y = _to_tensor(images), torch.from_numpy(labels)
    model = CropClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=generator)
        batch = x[idx]
        if torch.rand((), generator=generator) < 0.5:    # robustness to the softness of decoded images
            batch = F.avg_pool2d(F.pad(batch, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        batch = batch + 0.02 * torch.randn(batch.shape, generator=generator)
        loss = F.cross_entropy(model(batch), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@dataclass
class Accuracy:
    accuracy: float
    per_class: dict[str, float]


def accuracy(classifier: CropClassifier, images: np.ndarray, labels: np.ndarray) -> Accuracy:
    predicted = classifier.predict(images)
    per_class = {name: float((predicted[labels == i] == i).mean()) for i, name in enumerate(DEMO_CLASSES)
                 if (labels == i).any()}
    return Accuracy(float((predicted == labels).mean()), per_class)


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Mean per-image PSNR in dB of uint8 images (MASKBIT_SPEC 7.1: 10 log10(1 / (MSE + 1e-10)) on [0,1])."""
    a = original.astype(np.float64) / 255.0
    b = reconstruction.astype(np.float64) / 255.0
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(1.0 / (mse + 1e-10))))


def evaluate_bundle(bundle, classifier: CropClassifier | None = None, samples_per_class: int = 16,
                    seeds: tuple[int, ...] = (0,), held_out_per_class: int = 16) -> dict:
    """Recognition rate of generated images (by the classifier) and reconstruction PSNR on held-out crops."""
    from maskbit_runtime import Pipeline
    classifier = classifier or train_classifier()
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
