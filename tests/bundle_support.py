"""In-place manifest edits, for tests that tamper with bundles (their `bundle` fixture, a private copy of the
demo bundle, is in conftest.py)."""

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
