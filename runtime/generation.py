"""What a generation takes and gives: checked class labels in, images and token indices out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

MAX_IMAGES = 1_000_000      # per call; `maskbit-run sample` splits larger runs into chunks


@dataclass
class GenerationOutput:
    images: np.ndarray      # uint8 (B, H, W, 3)
    tokens: np.ndarray      # int64 (B, h, w) full token indices


def check_labels(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Labels as int64 [B]; raises InputError naming the first label outside [0, num_classes)."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise InputError(f"labels must be a non-empty list of class indices, got shape {array.shape}")
    if array.size > MAX_IMAGES:
        raise InputError(f"{array.size} labels in one call; at most {MAX_IMAGES} (use maskbit-run sample)")
    if not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        raise InputError(f"labels must be integers, got {array.dtype}")
    bad = array[(array < 0) | (array >= num_classes)]
    if bad.size:
        raise InputError(f"label {int(bad[0])} is out of range: this model has classes 0..{num_classes - 1}")
    return array.astype(np.int64)
