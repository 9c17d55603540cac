"""The search's time budget (``--time-budget MINUTES``): after the deadline no new trial starts, and each running
trial stops at its next report, recorded as stopped early (table status ``stopped``, Optuna PRUNED, MLflow
FINISHED with the outcome ``stopped by the time budget at step N``).

Why not Tune's own ``TuneConfig(time_budget_s=...)``: in Ray 2.60 it stops every running trial at the deadline
itself, mid-way between reports, and ends them without calling the searcher's or the callbacks'
``on_trial_complete`` (measured here: a 5 s budget over trials reporting every 2 s ended them at their first
result, with neither hook called), which would leave their Optuna trials and MLflow runs RUNNING. Instead the
searcher (``StepOptunaSearch``) stops proposing trials after the deadline and ``BudgetStopper``
(tune/trainable.py, a ``ray.tune.Stopper`` run on each result) stops a trial at its first report after it, marking
that result with ``STOPPED_KEY`` so that the trials table, the MLflow callback and the progress lines can tell a
budget stop from an ASHA one.

Both read the deadline from the search folder's ``budget.json`` rather than holding it: Tune pickles them with
the experiment, and a ``--resume`` must not inherit a deadline that passed while the driver was down. A resumed
search gets the ``--time-budget`` given on its own command line, counted from the resume, or none: the budget
left at the kill is not restored. A search whose searcher already stopped proposing on its budget
(``reached_at``) stays ended: a resume continues only the trials that were running; more trials take a new
search (``--warm-start`` from this one). No Ray here: the driver's planning and the trials table import it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pdcbdm.io import write_json_atomic

BUDGET_FILE = "budget.json"
STOPPED_KEY = "pdcbdm_budget_stop"  # set on the result at which the budget stopped a trial


def start(search_dir: Path, minutes: float | None, now: float | None = None) -> dict[str, Any]:
    """Write the budget of this run of the search (fresh on a resume; an earlier ``reached_at`` is kept)."""
    now = time.time() if now is None else now
    earlier = read(search_dir / BUDGET_FILE)
    history = earlier.pop("earlier", [])
    if earlier:  # the budget of the run before this resume, kept for the record
        history.append(earlier)
    state = {"minutes": minutes, "started": now, "deadline": None if minutes is None else now + 60.0 * minutes,
             "reached_at": earlier.get("reached_at"), "earlier": history}
    write_json_atomic(search_dir / BUDGET_FILE, state)
    return state


def read(path: str | Path) -> dict[str, Any]:
    """The budget state in ``path`` ({} when there is none or it is unreadable: no budget)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def passed(path: str | Path | None, now: float | None = None) -> bool:
    """Whether the budget in ``path`` has a deadline and it has passed."""
    if not path:
        return False
    deadline = read(path).get("deadline")
    return deadline is not None and (time.time() if now is None else now) >= float(deadline)


def mark_reached(path: str | Path) -> None:
    """Record (once) that the budget ended the search's proposals or stopped a trial."""
    state = read(path)
    if state and not state.get("reached_at"):
        write_json_atomic(path, {**state, "reached_at": time.time()})


def reached(search_dir: Path) -> bool:
    """Whether this search's time budget has ever cut it (then fewer trials than --trials is no interruption)."""
    return bool(read(search_dir / BUDGET_FILE).get("reached_at"))


def summary(search_dir: Path, table: Any, trials: int) -> str | None:
    """``time budget of 10 min reached: 2 trials stopped early, 1 not started`` (None when it was not reached)."""
    state = read(search_dir / BUDGET_FILE)
    if not state.get("reached_at"):
        return None
    stopped = 0 if table.empty or "stopped_by" not in table else int((table["stopped_by"] == "time budget").sum())
    minutes = state.get("minutes") or next((e.get("minutes") for e in reversed(state.get("earlier", []))
                                             if e.get("minutes")), None)
    size = f"of {minutes:g} min " if minutes else ""
    return (f"time budget {size}reached: {stopped} trial(s) stopped early, {max(0, trials - len(table))} not "
            f"started")
