"""Checkpoints: official `.bin` files, our safetensors (config in the metadata), and hub references.

Official files are flat key -> tensor mappings written with torch.save; they load with
`torch.load(weights_only=True)`, so a pickle that would run code is refused. Key checks are strict, and a
mismatch error names the missing, unexpected and mis-shaped keys and the config the file probably belongs to.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, ModelConfig
from maskbit_runtime.errors import MaskbitError
from maskbit_runtime.files import atomic_output

FORMAT = "maskbit/1"
HUB_PREFIX = "hf://"
GENERATOR_RENAMES = {"token_emb": "input_proj"}   # older generator checkpoints name the bit projection token_emb


class CheckpointError(MaskbitError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# ----------------------------------------------------------------------------------------------------------
# Locating and reading files


HUB_PROBE_TIMEOUT = 3.0   # seconds to wait for the hub's host before calling the network unreachable


def _hub_reachable(endpoint: str) -> str | None:
    """None when the hub answers an HTTP request (any status) within HUB_PROBE_TIMEOUT, else why not."""
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{endpoint} is unreachable ({str(reason).splitlines()[0] if str(reason) else type(exc).__name__})"
    return None


_HUB_PART = re.compile(r"[A-Za-z0-9._-]{1,96}")


def resolve_hub(ref: str) -> Path:
    """`hf://owner/repo[/file]` -> a local file: the huggingface_hub cache first, then a download.

    With HF_HUB_OFFLINE set, or when the hub's host does not answer within a few seconds, a file that is not
    cached fails at once (no retries) with the cache folder it would be read from."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    parts = ref[len(HUB_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(_HUB_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise CheckpointError(f"hub reference {ref[:200]!r} must look like hf://owner/repo or hf://owner/repo/file "
                              f"(letters, digits, '-', '_' and '.', no '..')")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    candidates = [filename] if filename else [f"{parts[1]}.bin", "pytorch_model.bin", "model.safetensors"]
    for name in candidates:
        cached = try_to_load_from_cache(repo_id, name)
        if isinstance(cached, str):
            return Path(cached)
    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_reachable(constants.ENDPOINT)
    if offline:
        raise CheckpointError(f"cannot fetch {ref}: none of {candidates} is in the local cache ({cache}) and "
                              f"the hub cannot be reached (offline: {offline}); download it where there is "
                              f"network and copy that folder here")
    last_error: Exception | None = None
    for name in candidates:
        try:
            return Path(hf_hub_download(repo_id, name))
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError) as exc:
            last_error = exc
        except OSError as exc:   # connection errors surface as OSError subclasses
            last_error = exc
    raise CheckpointError(f"cannot fetch {ref}: none of {candidates} found: "
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
                metadata = dict(f.metadata() or {})
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (not iterable)
                check_stored_config(metadata, shapes, path.name)      # before any tensor is read
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
                return tensors, metadata
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
    mistyped = [f"{k} {state[k].dtype} into {v.dtype}" for k, v in expected.items()
                if k in state and _kind(state[k].dtype) != _kind(v.dtype)]
    if missing or unexpected or misshaped or mistyped:
        def few(keys):
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        problems = [f"{len(keys)} {kind} ({few(keys)})" for kind, keys in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                     ("of another dtype kind", mistyped)) if keys]
        raise CheckpointError(f"{source} does not fit config {config_name!r}: {'; '.join(problems)}. "
                              f"The file looks like {guess_config(state)}; pass the matching config.")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source} holds NaN or infinite weights in {len(bad)} tensor(s) "
                              f"({', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}); it is damaged")
    model.load_state_dict(state, strict=True)


def _kind(dtype: torch.dtype) -> str:
    """float (any precision: casting between them is a checkpoint's normal life), complex, bool or integer."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


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
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "kind": kind, "config": config.to_json()})
    return path


def config_from_metadata(metadata: Mapping[str, str], source: str) -> ModelConfig | None:
    """The config stored in a safetensors file's metadata (None when there is none), validated field by field and
    refused when the model it describes is larger than MAX_STATE_VALUES."""
    if not metadata.get("config"):
        return None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{source} has format {metadata.get('format')!r}; this version reads {FORMAT!r}")
    kind = metadata.get("kind", "tokenizer")
    if kind not in KINDS:
        raise CheckpointError(f"{source} has kind {kind!r}; expected one of {KINDS}")
    try:
        data = json.loads(metadata["config"])
        if not isinstance(data, dict) or not isinstance(data.get("tokenizer"), dict) or \
                not all(isinstance(data.get(k) or {}, dict) for k in ("generator", "sampling")) or \
                not isinstance(data.get("name", ""), str):
            raise ConfigError("expected an object with a tokenizer (and optionally a generator) object")
        config = ModelConfig.from_dict(data)
    except (json.JSONDecodeError, RecursionError, ConfigError) as exc:
        raise CheckpointError(f"{source} carries an unreadable config: {str(exc).splitlines()[0]}") from None
    if kind == "generator" and config.generator is None:
        raise CheckpointError(f"{source} is a generator checkpoint but its stored config has no generator")
    size = state_size(config, kind)
    if size > MAX_STATE_VALUES:
        raise CheckpointError(f"{source}: its stored config describes a {kind} of {size:,} values "
                              f"(~{size * 4 / 2 ** 30:.1f} GiB in float32), above the limit of "
                              f"{MAX_STATE_VALUES:,}; the file is corrupt or not a MaskBit checkpoint")
    return config


def check_stored_config(metadata: Mapping[str, str], shapes: Mapping[str, list[int]], source: str) -> None:
    """Before any tensor is read or any module built: the stored config (if any) must be valid, within the size
    limit, and describe exactly as many values as the file holds."""
    config = config_from_metadata(metadata, source)
    if config is None:
        return
    kind = metadata.get("kind", "tokenizer")
    expected, found = state_size(config, kind), sum(math.prod(shape) for shape in shapes.values())
    if expected != found:
        raise CheckpointError(f"{source}: its stored config describes a {kind} of {expected:,} values but the file "
                              f"holds {found:,} in {len(shapes)} tensors; the file is corrupt or its metadata "
                              f"belongs to another model")


# ----------------------------------------------------------------------------------------------------------
# Model size from a config, without building anything

KINDS = ("tokenizer", "generator")
# 2x the largest released model (maskbit_generator_18bit, ~306M values; tests/test_hardening_inputs.py checks it)
MAX_STATE_VALUES = 640_000_000


def _conv(c_in: int, c_out: int, k: int, bias: bool) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def _res_stage(c_in: int, c_out: int, blocks: int) -> int:
    def block(a: int, b: int) -> int:      # GroupNorm, conv3, GroupNorm, conv3, 1x1 shortcut when the width changes
        return 2 * a + _conv(a, b, 3, False) + 2 * b + _conv(b, b, 3, False) + (b * b if a != b else 0)
    return block(c_in, c_out) + (blocks - 1) * block(c_out, c_out)


def _tokenizer_size(cfg) -> int:
    width = [cfg.hidden_channels * m for m in (1, *cfg.channel_mult)]
    last = cfg.num_resolutions - 1
    enc = _conv(cfg.num_channels, cfg.hidden_channels, 3, False)
    for i in range(cfg.num_resolutions):
        enc += _res_stage(width[i], width[i + 1], cfg.num_res_blocks)
        enc += _conv(width[i + 1], width[i + 1], 3, True) if i < last and cfg.sample_with_conv else 0
    enc += _res_stage(width[-1], width[-1], cfg.num_res_blocks) + 2 * width[-1] + _conv(width[-1], cfg.token_size,
                                                                                         1, True)
    mult, blocks = (*cfg.channel_mult, cfg.channel_mult[-1]), cfg.num_res_blocks_decoder
    top = cfg.hidden_channels * cfg.channel_mult[-1]
    dec = _conv(cfg.token_size, top, 3, True) + _res_stage(top, top, blocks)
    for level in range(cfg.num_resolutions):
        c_in, c_out = cfg.hidden_channels * mult[level + 1], cfg.hidden_channels * mult[level]
        dec += _res_stage(c_in, c_out, blocks) + (_conv(c_out, c_out, 3, True) if level > 0 else 0)
    dec += 2 * cfg.hidden_channels + _conv(cfg.hidden_channels, cfg.num_channels, 3, True)
    if cfg.is_lookup_free:     # persistent buffers bits_to_indices [K] and codebook [2**K, K]
        quant = cfg.token_size + 2 ** cfg.token_size * cfg.token_size
    else:
        quant = cfg.codebook_size * cfg.token_size
    return enc + dec + quant


def _generator_size(cfg) -> int:
    d = cfg.hidden_dim
    layer = (3 * d * d + 3 * d + d * d + d + 2 * d) + (d * cfg.mlp_dim + cfg.mlp_dim + cfg.mlp_dim * d + d + 2 * d)
    return ((cfg.num_tokens + 1) * d + cfg.bits_per_group + (cfg.num_classes + 1) * d + cfg.num_bits * d + d
            + 2 * d + cfg.depth * layer + (2 * d if cfg.use_prenorm else 0) + d * d + d + 2 * d
            + d * cfg.codebook_splits * cfg.group_classes + cfg.codebook_splits * cfg.group_classes)


def state_size(config: ModelConfig, kind: str) -> int:
    """Number of values in the state dict (parameters and persistent buffers) of the `kind` model of `config`."""
    if kind == "generator":
        if config.generator is None:
            raise CheckpointError(f"config {config.name!r} describes no generator")
        return _generator_size(config.generator)
    return _tokenizer_size(config.tokenizer)
