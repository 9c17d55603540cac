"""A search's folder (OUT/searches/NAME) as the commands that read an earlier search open it: ``--resume``,
``--warm-start`` and ``pipelines.confirm --search``. No Ray, MLflow or Optuna here."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any, Sequence


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
