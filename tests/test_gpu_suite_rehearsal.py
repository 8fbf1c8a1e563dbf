"""The GPU suite's rehearsal, without a GPU: `scripts/gpu_suite.sh --dry-run` in a Python shaped like the lent H200's.

The environment is a venv over this machine's packages (--system-site-packages) whose sitecustomize puts an import
hook first: a top-level module whose distribution (importlib.metadata.packages_distributions) is not in the image's
list (scripts/h200_packages.txt, read 2026-11-17) cannot be imported, as on the machine, where it is missing. This
project is found as the suite finds it there: `python3` on PATH, and the suite's PYTHONPATH shim
(MASKBIT_GPU_SUITE_SHIM=1), never this machine's editable install. The dry run must get past every dependency check
and import every module each part imports (the test tier's files are collected); the control adds a module that
is installed here but not in the image (omegaconf, which the suite once required) and must fail.

What this cannot show: the image's versions (torch 2.11 there), and packages in the list but not installed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "scripts" / "gpu_suite.sh"
PACKAGES = REPO / "scripts" / "h200_packages.txt"

HOOK = '''
"""Only the lent H200 image's distributions import here (tests/test_gpu_suite_rehearsal.py)."""
import importlib.abc
import importlib.machinery
import importlib.metadata
import re
import sys

def _canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()

_LIST = {PACKAGES!r}
_ALLOWED = {{_canon(line.strip()) for line in open(_LIST) if line.strip() and not line.startswith("#")}}
_PROJECT = {{"maskbit", "maskbit_export", "maskbit_runtime"}}
_DISTS = importlib.metadata.packages_distributions()


class ImageOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if path is not None or "." in name:          # submodules come with their top-level module
            return None
        if name in _PROJECT:                         # as the suite finds it there: on sys.path (its shim)
            spec = importlib.machinery.PathFinder.find_spec(name)
            if spec is None:
                raise ModuleNotFoundError(f"No module named {{name!r}} on sys.path (the suite's shim puts it there)",
                                          name=name)
            return spec
        dists = _DISTS.get(name)
        if not dists or any(_canon(d) in _ALLOWED for d in dists):
            return None
        raise ModuleNotFoundError(f"No module named {{name!r}}: its distribution ({{', '.join(dists)}}) is not in the "
                                  f"lent H200's image ({{_LIST}})", name=name)


sys.meta_path.insert(0, ImageOnly())
'''


@pytest.fixture(scope="module")
def image_python(tmp_path_factory) -> Path:
    """A venv over this machine's packages that refuses what the image lacks; returns its bin folder."""
    venv = tmp_path_factory.mktemp("h200") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    purelib = sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)})
    (Path(purelib) / "sitecustomize.py").write_text(HOOK.format(PACKAGES=str(PACKAGES)))
    return venv / "bin"


def suite(bin_folder: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHON", "OUT", "VIRTUAL_ENV")}
    environ.update(PATH=f"{bin_folder}{os.pathsep}{environ['PATH']}", MASKBIT_GPU_SUITE_SHIM="1",
                   MASKBIT_GPU_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path), **env)
    return subprocess.run(["bash", str(SUITE), "--dry-run"], capture_output=True, text=True, env=environ,
                          timeout=300, cwd=tmp_path)


def test_the_environment_is_shaped_like_the_image(image_python):
    """omegaconf is installed here but not there: refused; the project is not importable before the suite's shim."""
    for module, expected in (("omegaconf", "not in the lent H200's image"), ("maskbit_runtime", "on sys.path")):
        result = subprocess.run([str(image_python / "python3"), "-c", f"import {module}"], capture_output=True,
                                text=True, timeout=120, cwd="/", env={**os.environ, "PYTHONPATH": ""})
        assert result.returncode != 0 and expected in result.stderr, result.stderr[-2000:]


def test_the_suite_dry_run_passes_in_the_image_shaped_environment(image_python, tmp_path):
    result = suite(image_python, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "install: PYTHONPATH shim" in result.stdout
    for part in ("smoke", "throughput", "serving", "tests", "training"):
        assert f"== part {part}: exit 0" in result.stdout, part
    assert "gpu_suite: dry run: everything the parts would run is in place" in result.stdout


def test_the_rehearsal_fails_when_the_suite_needs_a_package_the_image_lacks(image_python, tmp_path):
    result = suite(image_python, tmp_path, MASKBIT_GPU_SUITE_NEED="omegaconf")
    assert result.returncode == 4, result.stdout[-4000:] + result.stderr[-4000:]
    assert "omegaconf: ModuleNotFoundError" in result.stderr and "not in the lent H200's image" in result.stderr
    assert "== part" not in result.stdout
