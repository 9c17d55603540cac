"""A search's folder (OUT/searches/NAME) as the commands that read an earlier search open it (``--resume``,
``--warm-start`` and ``pipelines.confirm --search``), and as the one driver that runs it holds it: ``driver_lock``
(one driver per folder for its whole life) and ``create_json`` (search.json created exclusively). No Ray, MLflow or
Optuna here."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Sequence

LOCK_FILE = ".driver.lock"


def read_search_json(folder: Path, flag: str, error: type[Exception], required: Sequence[str] = ()) -> dict[str, Any]:
    """``folder/search.json`` as a dict, or ``error`` naming ``flag`` and the folder: no search.json (not a search
    folder), or a file that is not a JSON object holding every ``required`` key."""
    meta = Path(folder) / "search.json"
    if not meta.is_file():
        raise error(f"{flag} {folder}: not a search folder (no search.json); a search folder is OUT/searches/NAME "
                    f"as tune/search.py prints it when it starts")
    try:
        saved = json.loads(meta.read_text())
        missing = [k for k in required if k not in saved]
    except (OSError, ValueError, TypeError) as exc:
        raise error(f"{flag} {folder}: search.json is unreadable ({exc})") from None
    if not isinstance(saved, dict) or missing:
        raise error(f"{flag} {folder}: search.json is unreadable (missing {', '.join(missing) or 'an object'})")
    return saved


def writable_by_others(folder: Path, limit: int = 10_000) -> list[Path]:
    """``folder`` and the files and folders under it that every user of the machine may write (at most
    ``limit`` entries looked at). A resume unpickles Ray Tune's state from such a folder: whoever can write it
    can make the resume run code."""
    found, seen = [], 0
    for path in [Path(folder), *Path(folder).rglob("*")]:
        seen += 1
        if seen > limit:
            break
        try:
            mode = path.lstat().st_mode
        except OSError:
            continue
        if mode & stat.S_IWOTH and not stat.S_ISLNK(mode):
            found.append(path)
    return found


def warn_if_writable_by_others(folder: Path, flag: str) -> None:
    """Print a warning naming ``folder`` (and up to three entries in it) when users other than its owner and
    group may write it."""
    found = writable_by_others(folder)
    if found:
        shown = ", ".join(str(p) for p in found[:3]) + (" ..." if len(found) > 3 else "")
        print(f"warning: {flag} {folder}: writable by every user of this machine ({shown}). Resuming unpickles "
              f"Ray Tune's saved state, so anyone who can write there can make this command run code: resume "
              f"only folders that only you and people you trust can write (chmod -R o-w {folder})",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def driver_lock(folder: Path, what: str, error: type[Exception]) -> Iterator[None]:
    """Hold ``folder/.driver.lock`` (an exclusive ``flock``) while the block runs: a second driver of the same
    folder (two ``--resume DIR`` at once, two searches of one name) gets ``error`` naming the pid and host of the
    one that holds it. The kernel releases the lock when the holder exits, however it exits (SIGKILL included),
    so a stale file never blocks a resume; the file stays, holding the last holder's line."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise error(f"{what} in {folder} is being run by {holder}; wait for it to end or stop it, then "
                        f"resume") from None
        line = f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, line.encode(), 0)
        yield
    finally:
        os.close(fd)


def create_json(path: Path, content: dict[str, Any], what: str, error: type[Exception]) -> None:
    """Write ``content`` to ``path`` only if it does not exist (``O_EXCL``), else ``error``: of two drivers that
    planned the same search, exactly one creates it. Written to a temporary file first, then linked, so that the
    file is never seen half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=2, default=str))
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise error(f"{what} already exists in {path.parent}; resume it with --resume {path.parent} or choose "
                    f"another --name") from None
    finally:
        tmp.unlink(missing_ok=True)
