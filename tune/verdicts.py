"""Optuna's verdicts that a resumed Tune does not know: trials the study already holds as PRUNED (ASHA stopped
them and the searcher told Optuna) while Tune's saved state, written a few seconds later, still had them running
when the driver was killed. A resume would otherwise train such a trial to its end: Tune and MLflow would say
completed, Optuna pruned. The searcher records them when Tune restores it (``StepOptunaSearch.restore``), and the
search's stopper (``tune.trainable.BudgetStopper``, which reads this search folder on every result) stops each at
its first report after the resume, so that all three records say stopped early. No Ray here."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pdcbdm.io import write_json_atomic

PRUNED_FILE = "pruned_before_resume.json"
STOPPED_KEY = "pdcbdm_pruned_before_resume"  # set on the result at which such a trial was stopped


def record(search_dir: str | Path, trial_ids: Iterable[str]) -> None:
    """Write the Tune trial ids Optuna holds as PRUNED but Tune restored as unfinished (an empty list clears)."""
    write_json_atomic(Path(search_dir) / PRUNED_FILE, sorted(set(trial_ids)))


def pruned(search_dir: str | Path) -> set[str]:
    """The recorded ids (none when the file is missing or unreadable)."""
    try:
        data = json.loads((Path(search_dir) / PRUNED_FILE).read_text())
    except (OSError, ValueError):
        return set()
    return {str(t) for t in data} if isinstance(data, list) else set()
