"""A deterministic corpus of real text nobody on the team wrote: the Python standard library's sources.

Files are every ``.py`` under the running interpreter's ``stdlib`` directory (``site-packages`` and
``__pycache__`` excluded; files that are not valid UTF-8 are skipped and listed), in sorted order of their
relative path. The split is by file and depends only on the relative path (a hash), so it is stable across
machines: about 1 in 16 files is held out. :func:`manifest` records every file's SHA-256 so a run can state
exactly which corpus it saw.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELDOUT_EVERY = 16


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the stdlib root, with "/" separators
    text: str
    sha256: str

    @property
    def split(self) -> str:
        return split_of(self.path)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """``"heldout"`` for about one file in :data:`HELDOUT_EVERY`, else ``"train"``; a pure function of the path."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:4], "little")
    return "heldout" if h % HELDOUT_EVERY == 0 else "train"


def iter_files(root: Path | None = None, split: str | None = None) -> list[SourceFile]:
    """All corpus files in sorted order, optionally one split (``"train"`` or ``"heldout"``)."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for f in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = f.relative_to(root).as_posix()
        parts = set(rel.split("/"))
        if "site-packages" in parts or "__pycache__" in parts:
            continue
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        sf = SourceFile(rel, text, hashlib.sha256(raw).hexdigest())
        if split is None or sf.split == split:
            out.append(sf)
    return out


def manifest(files: list[SourceFile]) -> dict:
    """File list + hashes, and one hash over all of them (what a training log records)."""
    total = hashlib.sha256()
    for f in files:
        total.update(f.path.encode() + b"\0" + f.sha256.encode() + b"\n")
    return {"root": str(stdlib_root()), "files": [[f.path, f.sha256, f.split] for f in files],
            "n_files": len(files), "n_chars": sum(len(f.text) for f in files), "sha256": total.hexdigest()}
