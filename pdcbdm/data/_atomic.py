"""Atomic file writes: a temporary file in the target's folder, then os.replace.

A reader therefore sees either the old file or the complete new one, never a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "is_temp_name"]

_TMP_SUFFIX = ".tmp"


def is_temp_name(filename: str) -> bool:
    """Whether `filename` looks like a temporary file left by an interrupted `atomic_write_bytes`."""
    return filename.startswith(".") and filename.endswith(_TMP_SUFFIX)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (the folder must exist).

    Args:
        path: destination file.
        data: the complete file content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); data files are meant to be shared like any other output.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
