"""Shared test fixtures: paths to the official-format fixtures, tiny models built through the preset registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(os.environ.get("MASKBIT_SHARED", ROOT.parent / "shared"))
OFFICIAL = SHARED / "fixtures" / "official"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def official() -> Path:
    """The shared official-format fixtures; CI must have them, elsewhere their tests skip."""
    if not (OFFICIAL / "tokenizer_lfq10.bin").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"official fixtures missing at {OFFICIAL} (set MASKBIT_SHARED)")
        pytest.skip(f"official fixtures not found at {OFFICIAL}")
    return OFFICIAL


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Path:
    """tiny_lfq10 tokenizer and generator checkpoints (random weights) that carry their config, as
    `tok.safetensors` and `gen.safetensors` in one folder."""
    import maskbit
    root = tmp_path_factory.mktemp("ckpt")
    config = maskbit.resolve_config("tiny_lfq10")
    maskbit.save_tokenizer(maskbit.build_tokenizer("tiny_lfq10"), root / "tok.safetensors", config)
    maskbit.save_generator(maskbit.build_generator("tiny_lfq10"), root / "gen.safetensors", config)
    return root


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A private copy of the demo bundle at tmp_path/bundle (modules that build their own override this)."""
    import shutil

    from maskbit_runtime.cli_common import DEMO_BUNDLE
    return Path(shutil.copytree(DEMO_BUNDLE, tmp_path / "bundle"))
