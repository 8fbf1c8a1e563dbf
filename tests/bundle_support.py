"""In-place manifest edits, for tests that tamper with bundles (their `bundle` fixture, a private copy of the
demo bundle, is in conftest.py), and the seeded tiny models that tests build bundles from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from maskbit_runtime.manifest import MANIFEST


def edit(root: Path, change: Callable[[dict], None]) -> None:
    """Apply `change` to the bundle's manifest.json as a dict and write it back."""
    data = json.loads((root / MANIFEST).read_text())
    change(data)
    (root / MANIFEST).write_text(json.dumps(data))


def sharpened_models(preset: str, seed: int = 0):
    """(tokenizer, generator) of a preset with seeded random weights; the generator's untrained, near-uniform logits
    sharpened a little, so sampling decisions are not all ties."""
    import torch

    import maskbit
    torch.manual_seed(seed)
    tok, gen = maskbit.build_tokenizer(preset), maskbit.build_generator(preset)
    with torch.no_grad():
        gen.prediction_layer.weight.mul_(20.0)
    return tok, gen
