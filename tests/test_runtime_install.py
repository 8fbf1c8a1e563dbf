"""The base install is the runtime alone: `pip install .` in a fresh virtual environment brings no torch and no
onnx, and `maskbit-run generate` works there with the demo bundle that ships in the package.

This installs from the package registry (numpy, onnxruntime, Pillow, click, tqdm), like a user would; it takes
about a minute.
"""

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_only_install_generates_without_torch(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = tmp_path / "src"              # building in place would leave build/ in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".venv"))
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)], capture_output=True,
                             text=True, timeout=900, env=environ, cwd=tmp_path)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    code = ("import importlib.util, json; print(json.dumps("
            "{m: importlib.util.find_spec(m) is not None for m in ('torch', 'onnx', 'maskbit_runtime')}))")
    probe = subprocess.run([str(python), "-c", code],
                           capture_output=True, text=True, timeout=60, env=environ, cwd=tmp_path)
    assert json.loads(probe.stdout) == {"torch": False, "onnx": False, "maskbit_runtime": True}, probe.stderr
    out = tmp_path / "samples.png"
    run = subprocess.run([str(env_dir / "bin" / "maskbit-run"), "generate", "--labels", "coffee,rocket", "--out",
                          str(out)], capture_output=True, text=True, timeout=300, env=environ, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "wrote 2 image(s) of 64x64" in run.stdout and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
