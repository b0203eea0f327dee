"""A hash of distree's own source, for caches that must not outlive the code that filled them."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """distree's own source: after an upgrade (or a local edit) cached stages and measurements are made again,
    never served stale (e.g. a plan from an older solver, a dispatch cost timed by older code)."""
    return source_fingerprint(Path(__file__).resolve().parent)


def source_fingerprint(root: Path) -> str:
    """Hash of every .py file under ``root`` (relative path and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]
