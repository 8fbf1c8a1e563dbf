"""The bundle manifest: the only contract between export and runtime.

manifest.json holds the format version, the model configs, sampling defaults, class names, and for every
component its file, sha256, tensors (names, dtypes, shapes with the dynamic "batch" axis), precision, batch
profile and verification result; engines add the TensorRT version and the GPU they were built for.
`Manifest.load` checks all of it before anything is loaded and names exactly what does not match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .specs import COMPONENTS, Dims
from .errors import MaskbitError

FORMAT = "maskbit-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(MaskbitError, ValueError):
    """A bundle that is missing, incomplete, tampered with or of an unknown format."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def dims(self) -> Dims:
        return Dims(**self.data["dims"])

    @property
    def components(self) -> dict[str, dict]:
        return self.data["components"]

    @property
    def sampling(self) -> dict[str, Any] | None:
        return self.data.get("sampling")

    @property
    def num_classes(self) -> int | None:
        return self.data.get("num_classes")

    @property
    def num_bits(self) -> int:
        return int(self.data["num_bits"])

    @property
    def has_generator(self) -> bool:
        return "step" in self.components

    def max_batch(self, component: str) -> int:
        return int(self.components[component]["batch_profile"]["max"])

    def file(self, component: str, key: str = "file") -> Path:
        if component not in self.components:
            raise BundleError(f"bundle {self.root} has no {component} component "
                              f"(it has: {', '.join(sorted(self.components))})")
        return self.root / self.components[component][key]

    @classmethod
    def load(cls, root: str | Path, check_hashes: bool = True) -> Manifest:
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"bundle {root} does not exist or is not a directory")
        path = root / MANIFEST
        if not path.is_file():
            raise BundleError(f"{root} is not a complete bundle: {MANIFEST} is missing (was the build interrupted?)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError(f"{path} is not a maskbit bundle manifest")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{path} has format version {version!r}; this runtime reads version {FORMAT_VERSION} "
                              f"(rebuild the bundle with a matching maskbit-export)")
        manifest = cls(root, data)
        manifest.validate(check_hashes)
        return manifest

    def validate(self, check_hashes: bool = True) -> None:
        for name, entry in self.components.items():
            spec = COMPONENTS.get(name)
            if spec is None:
                raise BundleError(f"{self.root / MANIFEST}: unknown component {name!r}")
            declared = [(t["name"], t["dtype"]) for t in entry["inputs"] + entry["outputs"]]
            expected = [(t.name, t.dtype) for t in spec.inputs + spec.outputs]
            if declared != expected:
                raise BundleError(f"{name}: tensors {declared} differ from this runtime's {expected}")
            for key in ("file", "data_file", "engine"):
                if key not in entry:
                    continue
                file = self.root / entry[key]
                if not file.is_file():
                    raise BundleError(f"bundle {self.root} is incomplete: {entry[key]} is missing")
                if check_hashes and sha256_file(file) != entry[f"{key}_sha256"]:
                    raise BundleError(f"{file} does not match its sha256 in {MANIFEST}: the file was modified or "
                                      f"truncated; rebuild the bundle")


def write_manifest(root: Path, data: dict[str, Any]) -> Path:
    """Write manifest.json through a temporary file, so a reader never sees half of it."""
    path = root / MANIFEST
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
    return path
