"""A search's folder (OUT/searches/NAME) as the commands that read an earlier search open it: ``--resume``,
``--warm-start`` and ``pipelines.confirm --search``. No Ray, MLflow or Optuna here."""

from __future__ import annotations

import json
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
