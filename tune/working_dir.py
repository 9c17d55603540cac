"""What a search on a Ray cluster uploads as its working directory (the repository), decided before it connects.

The repository travels to every node through Ray's object store. Data, credentials and run outputs do not belong
there: a user's data folder or ``.env`` in the checkout would reach every node's disk and the cluster's GCS. The
upload leaves out the folders the project writes, ``/data/``, ``.env`` files, arrays and tables (``*.npy``,
``*.parquet``) and every file over ``MAX_FILE_BYTES``, on top of what Ray already leaves out (``.gitignore``,
``.rayignore``). The files are listed with Ray's own traversal so that the printed size is what Ray sends.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

MAX_FILE_BYTES = 10 * 1024 * 1024
EXCLUDES = [".venv/", ".git/", "/searches/", "/runs/", "/mlartifacts/", "/ablations/", "/notebooks/", "/data/",
            ".env", ".env.*", "*.db", "*.pt", "*.npy", "*.parquet"]


@dataclass(frozen=True)
class Upload:
    """The working directory as Ray will send it: its exclude patterns (``runtime_env["excludes"]``), and the
    files and bytes that remain."""

    root: Path
    excludes: list[str]
    files: int
    size: int
    too_big: list[str]

    def summary(self) -> str:
        """One line for the user before the search connects: what is uploaded, and what was left out for size."""
        line = (f"uploading {self.root} to the cluster as the trials' working directory: {self.files} files, "
                f"{self.size / 2**20:.1f} MiB (left out: .gitignore, {', '.join(EXCLUDES)}")
        if self.too_big:
            line += f", and {len(self.too_big)} file(s) over {MAX_FILE_BYTES // 2**20} MiB: " + \
                ", ".join(self.too_big[:5]) + (" ..." if len(self.too_big) > 5 else "")
        return line + ")"


def _listing(root: Path, excludes: list[str]) -> list[Path]:
    """The files Ray's packaging would take from ``root`` with ``excludes`` (and the ignore files it reads)."""
    # deferred: Ray, which --help and the checks of bad input never load
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    quiet = logging.getLogger("pdcbdm.upload")
    quiet.setLevel(logging.ERROR)
    found: list[Path] = []
    _dir_travel(root, [_get_excludes(root, excludes)], lambda p: found.append(p) if p.is_file() else None,
                include_gitignore=os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1", logger=quiet)
    return found


def plan_upload(root: Path) -> Upload:
    """The upload of ``root``: ``EXCLUDES`` plus every file over ``MAX_FILE_BYTES`` by its anchored path."""
    root = root.resolve()
    files = _listing(root, list(EXCLUDES))
    too_big = sorted(p.relative_to(root).as_posix() for p in files if p.stat().st_size > MAX_FILE_BYTES)
    excludes = [*EXCLUDES, *(f"/{rel}" for rel in too_big)]
    kept = [p for p in files if p.stat().st_size <= MAX_FILE_BYTES]
    return Upload(root, excludes, len(kept), sum(p.stat().st_size for p in kept), too_big)
