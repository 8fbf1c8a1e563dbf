"""One output directory holds one run: what makes a run (stage, model config, training settings, seed) is written to
`run.json` when it starts and stored in every checkpoint's `meta.json`; a later run there must be the same run and
ask to `--resume` it.

Loop bookkeeping (max steps, save/eval/log intervals, checkpoints kept, eval images) may change between a run and
its resumption, so a run can be extended; everything else must match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maskbit_runtime.errors import MaskbitError
from maskbit_runtime.files import atomic_write_json

from .checkpointing import checkpoint_dirs
from .settings import SETTING_PATHS

RUN_FILE = "run.json"
BOOKKEEPING = ("max_train_steps", "save_every", "eval_every", "log_every", "keep_checkpoints", "eval_images")


class OutputDirError(MaskbitError, ValueError):
    """The output directory holds another run, or this run's checkpoints without --resume."""


def identity(stage: str, config: dict, settings: dict) -> dict:
    """What must match between a run and its resumption (from `ModelConfig.to_dict` and `TrainSettings.to_dict`)."""
    return {"stage": stage, "tokenizer": config.get("tokenizer"), "generator": config.get("generator"),
            "settings": {SETTING_PATHS.get(k, k): v for k, v in settings.items() if k not in BOOKKEEPING}}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs (settings are named by their official dotted path)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        name = key if prefix in ("", "settings.") else f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif _norm(a) != _norm(b):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _describe(diffs: list[str]) -> str:
    return "; ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")


def check_new_run(out: Path, run: dict) -> None:
    """Before a run without --resume: refuse a directory that holds checkpoints or another run's run.json."""
    found = checkpoint_dirs(out / "checkpoints")
    recorded = read_run_file(out)
    if recorded is not None and recorded != json.loads(json.dumps(run)):
        diffs = differences(recorded, json.loads(json.dumps(run)))
        raise OutputDirError(f"--output-dir {out} holds another run (differs in {_describe(diffs)}); choose another "
                             f"directory")
    if found:
        raise OutputDirError(f"--output-dir {out} already holds this run's checkpoints (newest {found[-1].name}); "
                             f"pass --resume to continue it or choose another directory")


def check_resumed_run(out: Path, run: dict, meta: dict, checkpoint: Path) -> None:
    """On --resume: the checkpoint must belong to this run (same config, settings and seed)."""
    stored = identity(meta.get("stage", ""), meta.get("config") or {}, meta.get("settings") or {})
    diffs = differences(json.loads(json.dumps(stored)), json.loads(json.dumps(run)))
    if diffs:
        raise OutputDirError(f"--resume: {checkpoint.name} in {out} belongs to another run (differs in "
                             f"{_describe(diffs)}); resume with the original settings or choose another directory")


def read_run_file(out: Path) -> dict | None:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OutputDirError(f"{path} is unreadable ({exc}); remove it or choose another directory") from None
    return data if isinstance(data, dict) else {}


def write_run_file(out: Path, run: dict) -> None:
    atomic_write_json(Path(out) / RUN_FILE, run)
