"""Atomic file writes, the one way every result, cache and checkpoint of pdcbdm reaches the disk.

A temporary file in the destination's folder is filled, flushed to disk and moved over the destination with
``os.replace``, so a reader (or a resumed run) sees either the old file or the complete new one, never half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "is_temp_name", "write_json_atomic"]

_TMP_SUFFIX = ".tmp"


def is_temp_name(filename: str) -> bool:
    """Whether ``filename`` looks like the temporary file of an interrupted atomic write."""
    return filename.startswith(".") and filename.endswith(_TMP_SUFFIX)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary temporary file, which then replaces ``path``.

    The folder is created if missing. The file gets mode 0644 (``mkstemp`` makes 0600; results are shared).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented, key-sorted JSON atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode())
