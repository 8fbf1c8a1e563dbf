"""Bundles that carry native code (AOTInductor packages, TensorRT plans) load only with the user's trust, and the
runtime leaves nothing behind it: no ONNX Runtime telemetry under $HOME, no extracted package after a failed
load. Most tests give a copy of the demo bundle fake package or engine entries: the trust check must refuse them
before any backend reads a file, so the fake files are never opened."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from maskbit_runtime.cli import main as run_cli
from maskbit_runtime.cli_common import DEMO_BUNDLE
from maskbit_runtime.errors import MaskbitError
from maskbit_runtime.manifest import MANIFEST
from maskbit_runtime.pipeline import Pipeline
from maskbit_runtime.trust import UntrustedCodeError, check_native_code, read_trusted_hashes

FAKE = b"\x7fELF not a library: the trust check must refuse it before anything opens it"


def _native_bundle(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A copy of the demo bundle whose components each name a native file (kind 'package' or 'engine')."""
    root = Path(shutil.copytree(DEMO_BUNDLE, tmp_path / "bundle"))
    data = json.loads((root / MANIFEST).read_text())
    for name, entry in data["components"].items():
        path = root / f"{name}.{'pt2' if kind == 'package' else 'engine'}"
        path.write_bytes(FAKE + name.encode())
        entry[kind], entry[f"{kind}_sha256"] = path.name, hashlib.sha256(path.read_bytes()).hexdigest()
        if kind == "package":
            entry.update(package_precision="fp32", package_device="cpu", torch_version="0.0")
        else:
            entry.update(engine_precision="fp32", tensorrt_version="0.0",
                         gpu={"name": "none", "compute_capability": "0.0"})
    (root / MANIFEST).write_text(json.dumps(data))
    return root, data["components"]["step"][f"{kind}_sha256"]


@pytest.fixture
def loads(monkeypatch):
    """Every call that would load native code, recorded (and made to fail, so a test never runs one)."""
    calls = []
    torch = pytest.importorskip("torch")

    def record(path, **kwargs):
        calls.append(path)
        raise RuntimeError("recorded: a native package was opened")
    monkeypatch.setattr(torch._inductor, "aoti_load_package", record)
    return calls


@pytest.mark.parametrize(("backend", "kind"), [("aoti", "package"), ("tensorrt", "engine")])
def test_native_code_is_refused_without_trust_in_one_line(tmp_path, loads, backend, kind):
    root, _ = _native_bundle(tmp_path, kind)
    with pytest.raises(UntrustedCodeError) as error:      # the old code loaded the backend (and for aoti, its files)
        Pipeline.load(root, backend=backend)
    text = str(error.value)
    assert len(text.splitlines()) == 1 and "integrity, not trust" in text and "--trust-native-code" in text
    assert "trust_native_code=True" in text and loads == []
    result = CliRunner().invoke(run_cli, ["generate", "--bundle", str(root), "--backend", backend, "--labels", "1",
                                          "--num-steps", "2", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.count("Error:") == 1 and "--trust-native-code" in result.output
    assert loads == [] and not (tmp_path / "x.png").exists()


def test_onnx_bundles_load_without_trust():
    with Pipeline.load(DEMO_BUNDLE) as pipe:
        assert pipe.generate([1], num_steps=2).images.shape[0] == 1


def test_trust_lets_the_backend_load_its_packages(tmp_path, loads):
    root, _ = _native_bundle(tmp_path, "package")
    import torch
    edit = json.loads((root / MANIFEST).read_text())
    for entry in edit["components"].values():
        entry["torch_version"] = torch.__version__
    (root / MANIFEST).write_text(json.dumps(edit))
    with Pipeline.load(root, backend="aoti", trust_native_code=True) as pipe, \
            pytest.raises(MaskbitError, match="AOTInductor cannot load"):
        pipe.generate([1], num_steps=2)
    assert len(loads) == 1
    result = CliRunner().invoke(run_cli, ["generate", "--bundle", str(root), "--backend", "aoti",
                                          "--trust-native-code", "--labels", "1", "--num-steps", "2",
                                          "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "AOTInductor cannot load" in result.output and len(loads) == 2


def test_an_allow_list_outside_the_bundle_decides(tmp_path, loads):
    root, step_sha = _native_bundle(tmp_path, "package")
    listed = tmp_path / "trusted.txt"
    listed.write_text(f"# packages we built\n{step_sha}  step.pt2\n")
    with pytest.raises(UntrustedCodeError, match=r"\.pt2 \(component \w+, sha256 [0-9a-f]{64}\) of bundle .* is "
                                                 r"not in the trusted hashes"):
        Pipeline.load(root, backend="aoti", trust_native_code=True, trusted_hashes=listed)
    data = json.loads((root / MANIFEST).read_text())
    everything = [e["package_sha256"] for e in data["components"].values()]
    listed.write_text("\n".join(everything))
    check_native_code("aoti", _manifest(root), trusted_hashes=listed)          # the list alone is trust
    check_native_code("aoti", _manifest(root), trusted_hashes=everything)
    result = CliRunner().invoke(run_cli, ["info", "--bundle", str(root), "--backend", "aoti", "--trusted-hashes",
                                          str(tmp_path / "missing.txt"), "--no-count-transfers"])
    assert result.exit_code == 1 and result.output.count("Error:") == 1
    assert "cannot read trusted hashes" in result.output and loads == []


@pytest.mark.parametrize("text", ["not-a-hash", "ab" * 31, "zz" * 32])
def test_a_malformed_allow_list_is_one_line(tmp_path, text):
    (tmp_path / "list").write_text(text)
    with pytest.raises(UntrustedCodeError, match="is not a sha256"):
        read_trusted_hashes(tmp_path / "list")


def test_sample_refuses_untrusted_native_code_before_writing(tmp_path, loads):
    root, _ = _native_bundle(tmp_path, "package")
    out = tmp_path / "run"
    result = CliRunner().invoke(run_cli, ["sample", "--out", str(out), "--bundle", str(root), "--backend", "aoti",
                                          "--labels", "1,2", "--num-steps", "2"])
    assert result.exit_code == 1 and result.output.count("Error:") == 1, result.output
    assert "--trust-native-code" in result.output and not out.exists() and loads == []


def _manifest(root):
    from maskbit_runtime.manifest import Manifest
    return Manifest.load(root)


# -- leftovers of a failed AOTInductor load ---------------------------------------------------------------------
def test_a_failed_package_load_leaves_no_extracted_folder(tmp_path, monkeypatch):
    """The package loader extracts a .pt2 into $TMPDIR/aotinductor_XXXXXX and removes it only when a loaded
    package is freed; a load that fails left the folder (seen with torch 2.14: 'File not found: .../
    aotinductor_OfqEdG/...'). A real broken package, hash-consistent with its manifest, trusted."""
    torch = pytest.importorskip("torch")
    temp = tmp_path / "tmp"
    temp.mkdir()
    (temp / "aotinductor_other").mkdir()               # another process's extraction: left alone
    monkeypatch.setenv("TMPDIR", str(temp))
    root, _ = _native_bundle(tmp_path, "package")
    data = json.loads((root / MANIFEST).read_text())
    for name, entry in data["components"].items():
        with zipfile.ZipFile(root / entry["package"], "w") as zf:
            zf.writestr(f"{name}/.data/version", "1")
            zf.writestr(f"{name}/data/aotinductor/model/model.wrapper.so", FAKE * 10)
        entry.update(package_sha256=hashlib.sha256((root / entry["package"]).read_bytes()).hexdigest(),
                     torch_version=torch.__version__)
    (root / MANIFEST).write_text(json.dumps(data))
    with Pipeline.load(root, backend="aoti", trust_native_code=True) as pipe, \
            pytest.raises(MaskbitError, match="AOTInductor cannot load"):
        pipe.decode(__import__("numpy").zeros((1, 16, 16), "int64"))
    assert sorted(p.name for p in temp.iterdir() if p.name.startswith("aotinductor_")) == ["aotinductor_other"]


# -- telemetry --------------------------------------------------------------------------------------------------
def test_no_file_is_written_under_home(tmp_path):
    """ONNX Runtime writes a device id and queued telemetry under ~/.cache/Microsoft/ unless told not to."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "ORT_", "ONNXRUNTIME"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_DATA_HOME=str(home / ".local/share"), XDG_STATE_HOME=str(home / ".local/state"),
               OMP_NUM_THREADS="1")
    code = ("import sys; from maskbit_runtime.cli import main; "
            "sys.argv = ['maskbit-run', 'generate', '--labels', '1', '--num-steps', '2', '--out', sys.argv[1]]; main()")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "x.png").is_file()
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
