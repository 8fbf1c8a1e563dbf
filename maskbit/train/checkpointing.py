"""Training checkpoints: `step-NNNNNNNN/` folders with safetensors for weights and `state.pt` for the rest.

A folder is written under a unique temporary name (removed again if writing fails) and renamed into place
(`maskbit_runtime.files.atomic_directory`), so a killed run leaves either a complete checkpoint or none; only the
newest `keep` are kept. Resuming takes the newest checkpoint that reads back completely and reports the ones it had
to pass over. `state.pt` holds plain containers and tensors only (optimisers, schedulers, RNG states, data
position, step) and loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from maskbit_runtime.errors import MaskbitError
from maskbit_runtime.files import atomic_directory, atomic_write_json

PREFIX = "step-"


class ResumeError(MaskbitError, ValueError):
    """No usable checkpoint to resume from."""


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def save(root: str | os.PathLike, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict,
         meta: dict, keep: int = 3) -> Path:
    """Write weights (name -> state dict, one safetensors file each), `state` and `meta` as checkpoint `step`."""
    from safetensors.torch import save_file
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    with atomic_directory(final, replace=True) as tmp:
        for name, tensors in weights.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(tmp / f"{name}.safetensors"))
        torch.save(state, tmp / "state.pt")
        atomic_write_json(tmp / "meta.json", {**meta, "step": step})
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """(weights by name, state, meta) of one checkpoint folder."""
    from safetensors.torch import load_file
    path = Path(path)
    weights = {p.name[:-len(".safetensors")]: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return weights, state, meta


STATE_KEYS = ("step", "optimizers", "schedulers", "data", "rng")


def load_checked(path: Path, required: set[str]) -> tuple[dict, dict, dict]:
    """`load` plus the checks a resume needs: every `required` weights file and every state key is present."""
    from safetensors import SafetensorError
    try:
        weights, state, meta = load(path)
    except (OSError, RuntimeError, EOFError, ValueError, SafetensorError, pickle.UnpicklingError, zipfile.BadZipFile,
            KeyError) as exc:
        raise ResumeError(f"{path.name} is unreadable: {_first_line(exc)}") from None
    missing = sorted(required - set(weights)) + [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(meta, dict):
        raise ResumeError(f"{path.name} is incomplete (missing {', '.join(missing) or 'meta.json content'})")
    return weights, state, meta


def load_latest(root: str | os.PathLike, required: set[str]) -> tuple[Path, tuple[dict, dict, dict],
                                                                     list[tuple[Path, str]]]:
    """(path, (weights, state, meta), skipped) of the newest checkpoint that loads completely; `skipped` lists the
    newer ones passed over with the reason. ResumeError when none is usable."""
    found = checkpoint_dirs(root)
    if not found:
        raise ResumeError(f"--resume: no checkpoint in {root} (expected {PREFIX}NNNNNNNN folders)")
    skipped: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            return path, load_checked(path, required), skipped
        except ResumeError as exc:
            skipped.append((path, str(exc)))
    raise ResumeError(f"--resume: none of the {len(found)} checkpoints in {root} is usable; newest: {skipped[0][1]}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
