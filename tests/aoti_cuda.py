"""The GPU tier's one tiny_lfq10 bundle with AOTInductor packages compiled for cuda, shared by its tests.

Compiling the five packages is most of the GPU tier's time, so they are compiled once per pytest session (the
bundle is remembered in this module) and, when MASKBIT_AOTI_CACHE names a folder (scripts/gpu_suite.sh sets one
under $TMPDIR), once per machine: a later session reuses the bundle found there when it was built by this torch
from the same models. Max batch 4, so a batch of three labels runs as one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import maskbit

MAX_BATCH = 4
_BUILT: dict[str, Path] = {}


def cpu_models():
    """The tiny_lfq10 tokenizer and generator the bundle is built from (seed 0), on the CPU."""
    torch.manual_seed(0)
    return maskbit.build_tokenizer("tiny_lfq10"), maskbit.build_generator("tiny_lfq10")


def cuda_models():
    return tuple(m.cuda() for m in cpu_models())


def _complete(root: Path) -> bool:
    from maskbit_runtime.manifest import Manifest
    try:
        entries = Manifest.load(root).components.values()
    except Exception:  # absent or half-written: build again
        return False
    return all(e.package and e.package_device == "cuda" and e.torch_version == torch.__version__ for e in entries)


def cuda_bundle(tmp_path_factory) -> tuple[Path, bool]:
    """(bundle folder, whether it was compiled now); compiled at most once per session and per cache folder."""
    from maskbit_export.aoti import build_aoti
    from maskbit_export.bundle import ExportOptions, build_bundle
    if "bundle" in _BUILT:
        return _BUILT["bundle"], False
    cache = os.environ.get("MASKBIT_AOTI_CACHE")
    root = (Path(cache) / f"tiny_lfq10-b{MAX_BATCH}-torch{torch.__version__}" if cache
            else tmp_path_factory.mktemp("aoti_cuda") / "b")
    built = not _complete(root)
    if built:
        tok, gen = cpu_models()
        build_bundle(root, tok, gen, options=ExportOptions(max_batch=MAX_BATCH, verify=False), force=root.exists())
        build_aoti(root, tok, gen, device="cuda")
    _BUILT["bundle"] = root
    return root, built
