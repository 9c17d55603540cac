"""The version of the code that trained and scored a run: ``code_version()``, a content hash of the library's
source and of the trial's own code (tune/worker.py, tune/trainable.py, tune/entry.py), read from the files next to
this one. A finished run is reused only by the code that made it: a number from older code is not this code's
number. No git needed (a Ray node gets the code as an upload, without .git)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__all__ = ["code_version"]

_PACKAGE = Path(__file__).resolve().parent
_TRIAL_CODE = ("tune/worker.py", "tune/trainable.py", "tune/entry.py")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """16 hex digits of the sha256 over the library's ``.py`` files and the trial code, by relative path."""
    root = _PACKAGE.parent
    files = sorted(_PACKAGE.rglob("*.py")) + [root / name for name in _TRIAL_CODE if (root / name).is_file()]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
