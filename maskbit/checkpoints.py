"""Checkpoints: official `.bin` files, our safetensors (config in the metadata), and hub references.

Official files are flat key -> tensor mappings written with torch.save; they load with
`torch.load(weights_only=True)`, so a pickle that would run code is refused. Key checks are strict, and a
mismatch error names the missing, unexpected and mis-shaped keys and the config the file probably belongs to.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, ModelConfig
from maskbit_runtime.errors import MaskbitError

FORMAT = "maskbit/1"
HUB_PREFIX = "hf://"
GENERATOR_RENAMES = {"token_emb": "input_proj"}   # older generator checkpoints name the bit projection token_emb


class CheckpointError(MaskbitError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# ----------------------------------------------------------------------------------------------------------
# Locating and reading files


def resolve_hub(ref: str) -> Path:
    """`hf://owner/repo[/file]` -> a local file through huggingface_hub (honours HF_HUB_OFFLINE and its cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    parts = ref[len(HUB_PREFIX):].strip("/").split("/")
    if len(parts) < 2:
        raise CheckpointError(f"hub reference {ref!r} must look like hf://owner/repo or hf://owner/repo/file")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    candidates = [filename] if filename else [f"{parts[1]}.bin", "pytorch_model.bin", "model.safetensors"]
    last_error: Exception | None = None
    for name in candidates:
        try:
            return Path(hf_hub_download(repo_id, name))
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError) as exc:
            last_error = exc
        except OSError as exc:   # connection errors surface as OSError subclasses
            last_error = exc
    offline = " (offline: HF_HUB_OFFLINE is set and the file is not in the cache)" if os.environ.get(
        "HF_HUB_OFFLINE") else ""
    raise CheckpointError(f"cannot fetch {ref}: none of {candidates} found{offline}: "
                          f"{str(last_error).splitlines()[0] if last_error else ''}")


def locate(checkpoint: str | os.PathLike) -> Path:
    text = str(checkpoint)
    if text.startswith(HUB_PREFIX):
        return resolve_hub(text)
    path = Path(text)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"directory {path} holds neither model.safetensors nor pytorch_model.bin")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def read_state_dict(checkpoint: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(flat state dict, safetensors metadata or {}) of a checkpoint file, directory or hub reference."""
    path = locate(checkpoint)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
                return tensors, dict(f.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"refused to load {path}: it is not a plain tensor checkpoint and loading it would run "
                              f"arbitrary code (weights_only): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt ({first}); "
                              f"download it again") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a flat mapping of tensor names to tensors")
    return dict(state), {}


# ----------------------------------------------------------------------------------------------------------
# Matching keys against a model


def guess_config(state: Mapping[str, torch.Tensor]) -> str:
    """A short description of what a state dict looks like, with the preset it probably belongs to."""
    if "encoder.conv_in.weight" in state:
        if "quantize.embedding.weight" in state:
            size, dim = state["quantize.embedding.weight"].shape
            legacy = "decoder.up.0.upsample_conv.weight" not in state and "decoder.up.4.upsample_conv.weight" in state
            hint = {(1024, 256): "maskgit_tokenizer" if legacy else "vqgan_plus_10bit",
                    (4096, 64): "vqgan_plus_12bit"}.get((size, dim))
            what = f"a VQ (lookup) tokenizer with {size} codes of dimension {dim}"
        else:
            bits = state["encoder.conv_out.weight"].shape[0]
            hint = f"maskbit_tokenizer_{bits}bit" if bits in (10, 12, 14, 16, 18) else None
            what = f"a {bits}-bit lookup-free tokenizer"
        return what + (f" (preset {hint!r})" if hint else "")
    proj = state.get("input_proj.weight", state.get("token_emb.weight"))
    if proj is not None and "class_emb.weight" in state:
        hidden, bits = proj.shape
        depth = len({k.split(".")[2] for k in state if k.startswith("transformer.layers.")})
        groups = bits // max(1, state["bits_to_indices"].numel()) if "bits_to_indices" in state else "?"
        hint = f"maskbit_generator_{bits}bit" if hidden == 1024 and depth == 24 and groups == 2 else None
        what = f"a {bits}-bit generator with {groups} groups, hidden {hidden}, depth {depth}"
        return what + (f" (preset {hint!r})" if hint else "")
    return "neither a MaskBit tokenizer nor a generator"


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, config_name: str) -> None:
    """Strictly load `state` into `model`, or raise one line naming every kind of mismatch."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshaped:
        def few(keys):
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        problems = [f"{len(keys)} {kind} ({few(keys)})" for kind, keys in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise CheckpointError(f"{source} does not fit config {config_name!r}: {'; '.join(problems)}. "
                              f"The file looks like {guess_config(state)}; pass the matching config.")
    model.load_state_dict(state, strict=True)


def rename_keys(state: Mapping[str, torch.Tensor], renames: Mapping[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# Our format


def save_checkpoint(model: nn.Module, path: str | os.PathLike, config: ModelConfig, kind: str) -> Path:
    """Write `model`'s state dict as safetensors with the config in the metadata (atomically)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": FORMAT, "kind": kind, "config": config.to_json()})
    os.replace(tmp, path)
    return path


def config_from_metadata(metadata: Mapping[str, str], source: str) -> ModelConfig | None:
    if not metadata.get("config"):
        return None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{source} has format {metadata.get('format')!r}; this version reads {FORMAT!r}")
    try:
        return ModelConfig.from_dict(json.loads(metadata["config"]))
    except (json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"{source} carries an unreadable config: {exc}") from exc
