"""The command-line values of a search, a confirm and an ablation, checked before anything is written or started.

Each check raises ``ArgumentError`` naming the flag, the value and what is allowed; the callers turn it into their
exit status 2. The rules:

* ``--name`` names a folder under ``--out``, an MLflow run (found again through a tag filter) and an Optuna study:
  letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 100 characters, never ``..``
  (``../../x`` or ``/abs`` would write outside ``--out``; a quote breaks MLflow's filter syntax).
* Default names are unique beyond the second: ``PREFIX-YYYYmmdd-HHMMSS-xxxx`` with 4 random hex digits (two
  searches started in the same second must not share a folder and a parent run).
* ``--seed`` lies in 0..2**32-1 (what Optuna's and NumPy's generators take); ``--max-trial-failures`` and
  ``--max-worker-failures`` are >= 0 (Ray reads -1 as "retry forever"); ``--concurrency`` >= 1; ``--asha-grace``
  >= 1; ``--trials`` at most ``MAX_TRIALS`` unless ``--allow-large``.
* ``--out`` is a folder this user can create or write (checked by creating the missing folders and a file and
  removing them again: nothing is left behind).
* ``--optuna-storage`` can be opened: a sqlite file's folder exists and is writable, a server URL answers, a
  journal file's folder can be created.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from pdcbdm.config import ALLOW_LARGE_FLAG, shown
from tune.redact import OPTUNA_STORAGE_ENV, redact_url

__all__ = ["ArgumentError", "MAX_TRIALS", "check_name", "default_name", "check_out", "folder_problem",
           "check_runner_args", "check_search_args", "check_optuna_storage"]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SEED_MAX = 2**32 - 1
MAX_TRIALS = 10_000


class ArgumentError(ValueError):
    """A command-line value that cannot be used; the message names the flag."""


def check_name(name: str | None, flag: str = "--name") -> None:
    """Refuse a name that could not be a folder, an MLflow filter value and an Optuna study name (module doc)."""
    if name is None:
        return
    if not NAME.fullmatch(name) or ".." in name:
        raise ArgumentError(f"{flag} {shown(name)}: use 1 to 100 letters, digits, '.', '_' and '-', starting with a "
                            f"letter or digit and without '..' (it names a folder under --out, an MLflow run and an "
                            f"Optuna study)")


def default_name(prefix: str) -> str:
    """``PREFIX-YYYYmmdd-HHMMSS-xxxx``: readable, sortable, and unique for searches started in the same second."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_out(out: str | os.PathLike | None, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be created or written (``folder_problem``)."""
    if out is None:
        return
    path = Path(out).expanduser().resolve()
    problem = folder_problem(path)
    if problem:
        raise ArgumentError(f"{flag} {path}: {problem}")


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be created or written, or None. The missing folders are made and a file written, then
    all removed again, so that the check leaves nothing behind: permission bits alone do not tell (root passes
    them, and /proc refuses any new folder)."""
    if path.exists() and not path.is_dir():
        return "exists and is not a folder"
    created: list[Path] = []
    try:
        for folder in [*reversed(path.parents), path]:
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"cannot be created or written ({exc.strerror or exc})"
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return None


def _at_least(args: argparse.Namespace, flag: str, low: int) -> None:
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    if value is not None and value < low:
        raise ArgumentError(f"{flag} must be >= {low}, got {value}")


def check_runner_args(args: argparse.Namespace) -> None:
    """The flags every runner (search, confirm, ablation) shares."""
    check_name(getattr(args, "name", None))
    check_out(getattr(args, "out", None))
    _at_least(args, "--concurrency", 1)
    _at_least(args, "--max-trial-failures", 0)
    _at_least(args, "--max-worker-failures", 0)


def check_search_args(args: argparse.Namespace) -> None:
    """The search's own flags, beside ``check_runner_args``."""
    check_runner_args(args)
    seed = getattr(args, "seed", 0)
    if not 0 <= seed <= SEED_MAX:
        raise ArgumentError(f"--seed must lie in 0..{SEED_MAX} (the sampler's seed), got {seed}")
    _at_least(args, "--asha-grace", 1)
    trials = getattr(args, "trials", None)
    if trials is not None and trials > MAX_TRIALS and not getattr(args, "allow_large", False):
        raise ArgumentError(f"--trials {trials} is above the ceiling {MAX_TRIALS:,} (a search that would not end); "
                            f"pass {ALLOW_LARGE_FLAG} if you mean it")
    check_optuna_storage(getattr(args, "optuna_storage", None) or os.environ.get(OPTUNA_STORAGE_ENV))


def check_optuna_storage(spec: str | None) -> None:
    """Refuse an Optuna storage that cannot be opened (module docstring); masked URLs and the default pass."""
    if not spec or "***" in spec:
        return
    if spec.startswith("sqlite:///"):
        _writable_folder(Path(spec[len("sqlite:///"):]).expanduser().parent, spec, must_exist=True)
    elif "://" in spec:
        _connects(spec)
    else:
        _writable_folder(Path(spec).expanduser().parent, spec, must_exist=False)


def _writable_folder(folder: Path, spec: str, must_exist: bool) -> None:
    folder = folder.resolve()
    problem = "does not exist" if must_exist and not folder.is_dir() else folder_problem(folder)
    if problem:
        raise ArgumentError(f"--optuna-storage {shown(spec)}: cannot be opened ({folder} {problem})")


def _connects(url: str) -> None:
    """Open and close one connection to a database server (no table is created)."""
    import sqlalchemy  # deferred: only a database --optuna-storage needs it; --help and the other checks do not

    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - a driver's, a DNS or an auth error: all mean the storage is unusable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        password = urlsplit(url).password
        if password:  # a driver may echo the URL it was given
            first = first.replace(password, "***")
        raise ArgumentError(f"--optuna-storage {redact_url(url)}: cannot be opened ({shown(first)})") from None
