"""The demo feature network: a small CNN that classifies crops of the 8 demo photos, trained on real crops only.

It plays Inception's part for the demo (64x64 crops of 8 scikit-image photos, far from ImageNet): its pooled
penultimate activations are the features of demo-FID, KID and precision/recall, its logits judge class accuracy.
It never sees generated images or reconstructions while training. The shipped weights
(`maskbit/demo/feature_network.safetensors`) were written by

    maskbit-eval train-demo-network --out maskbit/demo/feature_network.safetensors

(`train_demo_network` with its defaults: crops of seed CLASSIFIER_TRAIN_SEED, checked on HELD_OUT_SEED crops).

Legend: B batch, H/W image side, D feature width (4 x width).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskbit.demo_data import DEMO_CLASSES, demo_crops
from maskbit_runtime.errors import InputError
from maskbit_runtime.files import atomic_output

DEMO_NETWORK_FILE = Path(__file__).resolve().parents[1] / "demo" / "feature_network.safetensors"
NETWORK_NAME = "demo-crop-classifier"
# crop seeds: the generator trained on seed 0; the classifier trains on one seed and is checked on another
CLASSIFIER_TRAIN_SEED = 1000
HELD_OUT_SEED = 2000


class CropClassifier(nn.Module):
    """A small CNN over RGB crops (pooled to 32x32 first) -> D pooled features -> 8 class logits."""

    def __init__(self, num_classes: int = len(DEMO_CLASSES), width: int = 16):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)
        self.width = width

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        images = F.adaptive_avg_pool2d(images, 32)      # (B, 3, 32, 32)
        return self.features(images).mean(dim=(2, 3))   # (B, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))            # (B, classes)

    @torch.no_grad()
    def features_and_logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B,H,W,3] -> (features float64 [B,D], logits float64 [B,classes])."""
        self.eval()
        features = self.embed(_to_tensor(images))
        return features.double().numpy(), self.head(features).double().numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B,H,W,3] -> predicted class indices [B]."""
        return self.features_and_logits(images)[1].argmax(-1)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def crops_dataset(per_class: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` real crops of every demo class (uint8 [8*per_class,size,size,3]) and their labels."""
    images = np.concatenate([demo_crops(name, per_class, size, seed) for name in DEMO_CLASSES])
    labels = np.repeat(np.arange(len(DEMO_CLASSES)), per_class)
    return images, labels


def train_classifier(per_class: int = 96, steps: int = 200, batch_size: int = 32, seed: int = 0,
                     width: int = 16, lr: float = 3e-3) -> CropClassifier:
    """Train on real crops (seed CLASSIFIER_TRAIN_SEED), with light blur/noise augmentation, deterministically."""
    torch.manual_seed(seed)
    images, labels = crops_dataset(per_class, CLASSIFIER_TRAIN_SEED)
    x, y = _to_tensor(images), torch.from_numpy(labels)
    model = CropClassifier(width=width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
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
        schedule.step()
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


# the shipped network's recipe: `maskbit-eval train-demo-network` uses these
SHIPPED_RECIPE = {"per_class": 256, "steps": 1500, "batch_size": 64, "seed": 0, "width": 16, "lr": 3e-3}


def train_demo_network(out: str | Path, held_out_per_class: int = 64, **recipe) -> dict:
    """Train the demo feature network with SHIPPED_RECIPE (overridable), check it on held-out crops and save it
    to `out` (safetensors; recipe and held-out accuracy in its metadata). Returns the metadata."""
    from safetensors.torch import save_file
    recipe = {**SHIPPED_RECIPE, **recipe}
    model = train_classifier(**recipe)
    held_out = accuracy(model, *crops_dataset(held_out_per_class, HELD_OUT_SEED))
    metadata = {"network": NETWORK_NAME, "classes": ",".join(DEMO_CLASSES), "train_seed": str(CLASSIFIER_TRAIN_SEED),
                "held_out_seed": str(HELD_OUT_SEED), "held_out_images": str(held_out_per_class * len(DEMO_CLASSES)),
                "held_out_accuracy": f"{held_out.accuracy:.6f}", **{k: str(v) for k, v in recipe.items()}}
    with atomic_output(out) as partial:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial), metadata=metadata)
    return metadata


def load_demo_network(path: str | Path | None = None) -> CropClassifier:
    """The shipped demo feature network (or one written by `train_demo_network`), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path or DEMO_NETWORK_FILE)
    if not path.is_file():
        raise InputError(f"demo feature network not found: {path}; write it with "
                         f"`maskbit-eval train-demo-network --out {path}`")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("network") != NETWORK_NAME:
        raise InputError(f"{path} is not a demo feature network (metadata network={metadata.get('network')!r})")
    model = CropClassifier(width=int(metadata["width"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()
