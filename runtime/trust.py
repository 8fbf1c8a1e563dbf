"""Trust in a bundle's native code: the rule that runs before any backend module reads a component file.

An ONNX graph is data: ONNX Runtime interprets it with its own kernels. An AOTInductor package (`.pt2`) holds a
compiled shared library whose constructors run when it is loaded, and a TensorRT plan can carry plugins that
are deserialized with it. The bundle's manifest proves integrity (each file matches its sha256), not trust:
whoever can edit a bundle can edit its hashes too. So loading native code is the user's explicit choice, in the
spirit of `torch.load(weights_only=...)` and `trust_remote_code`: `trust_native_code=True` (the command lines'
`--trust-native-code`), optionally narrowed by an allow-list of sha256 kept outside the bundle
(`trusted_hashes=`, `--trusted-hashes FILE`): then only packages or plans whose hash is listed load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .errors import MaskbitError

NATIVE_FILES = {"aoti": "package", "tensorrt": "engine"}      # backend -> the manifest's kind of native file
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_LIST_BYTES = 1 << 20


class UntrustedCodeError(MaskbitError, RuntimeError):
    """Loading the bundle would run native code the user has not trusted."""


def check_native_code(backend: str, manifest, trust_native_code: bool = False,
                      trusted_hashes: str | Path | Iterable[str] | None = None) -> None:
    """Raise UntrustedCodeError unless `backend` loads no native code, or the user trusts every native file of
    `manifest` it would load: `trust_native_code=True`, or an allow-list (`trusted_hashes`: a file of sha256, one
    per line, '#' comments, or an iterable of them) that lists each file's sha256. Given both, the list decides."""
    kind = NATIVE_FILES.get(backend)
    if kind is None:
        return
    what = "AOTInductor packages (.pt2: compiled libraries)" if kind == "package" else "TensorRT plans (plugins)"
    if trusted_hashes is None:
        if trust_native_code is True:
            return
        raise UntrustedCodeError(
            f"backend {backend!r} runs native code from bundle {manifest.root}: its {what} execute when loaded, and "
            f"the manifest proves integrity, not trust; if you trust this bundle's source, pass "
            f"--trust-native-code (Python: trust_native_code=True), or --trusted-hashes FILE listing their sha256")
    allowed = read_trusted_hashes(trusted_hashes)
    for name, entry in sorted(manifest.components.items()):
        if getattr(entry, kind) is None:
            continue
        sha = getattr(entry, f"{kind}_sha256").lower()
        if sha not in allowed:
            raise UntrustedCodeError(f"{getattr(entry, kind)} (component {name}, sha256 {sha}) of bundle "
                                     f"{manifest.root} is not in the trusted hashes; add its sha256 there if you "
                                     f"trust it")


def read_trusted_hashes(source: str | Path | Iterable[str]) -> frozenset[str]:
    """The sha256 digests of an allow-list: a file (one per line; '#' starts a comment; `sha256sum` output works)
    or an iterable of hex strings."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            if path.stat().st_size > MAX_LIST_BYTES:
                raise UntrustedCodeError(f"trusted hashes {path}: larger than {MAX_LIST_BYTES >> 20} MiB")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UntrustedCodeError(f"cannot read trusted hashes from {path}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None
        lines = [line.split("#", 1)[0].split() for line in text.splitlines()]
        items, where = [words[0] for words in lines if words], str(path)
    else:
        items, where = list(source), "trusted_hashes"
    found = set()
    for item in items:
        digest = str(item).strip().lower()
        if not _SHA256.fullmatch(digest):
            raise UntrustedCodeError(f"{where}: {str(item)[:80]!r} is not a sha256 (64 hexadecimal digits)")
        found.add(digest)
    return frozenset(found)
