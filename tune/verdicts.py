"""Optuna's verdicts that a resumed Tune does not know.

The searcher tells Optuna a trial's end (COMPLETE, PRUNED, FAIL) a few seconds before Tune saves its experiment
state. A driver killed in between leaves Tune's saved state with the trial still running, and a ``--resume`` would
train it again: Tune and MLflow would then say completed while Optuna says pruned or failed. So a resume reads the
study's verdicts (``from_study``) into the trial settings, and the trial function honours them before it trains
(``tune.trainable.honour``): a failed trial fails again at once (with the error its MLflow run recorded), a stopped
or completed one reports once, the values its MLflow run and Optuna hold, and ends. A trial whose end Tune saved is
never run again anyway. No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TUNE_TRIAL_ATTR = "tune_trial_id"  # the Optuna trial's Tune trial id (set by the searcher's suggest)
STOPPED_BY_ATTR = "pdcbdm.stopped_by"  # a PRUNED trial's stopper: "ASHA" or "time budget"
RESULT_KEY = "pdcbdm_verdict_before_resume"  # set on the one result an honoured trial reports


@dataclass(frozen=True)
class Verdict:
    """One Optuna trial's end: ``state`` COMPLETE, PRUNED or FAIL; ``step`` and ``value`` the last intermediate
    value's (PRUNED) or None; ``values`` the objective values (COMPLETE); ``stopped_by`` who stopped a PRUNED
    trial (``STOPPED_BY_ATTR``)."""

    state: str
    step: int | None = None
    value: float | None = None
    values: tuple[float, ...] = ()
    stopped_by: str | None = None


def from_study(study: Any) -> dict[str, Verdict]:
    """The verdict of every finished Optuna trial that carries a Tune trial id, by that id."""
    out = {}
    for t in study.get_trials(deepcopy=False):
        tune_id = t.user_attrs.get(TUNE_TRIAL_ATTR)
        if not tune_id or not t.state.is_finished() or t.state.name not in ("COMPLETE", "PRUNED", "FAIL"):
            continue
        step = max(t.intermediate_values) if t.intermediate_values else None
        out[str(tune_id)] = Verdict(
            state=t.state.name, step=step, value=None if step is None else float(t.intermediate_values[step]),
            values=tuple(float(v) for v in (t.values or ())) if t.state.name == "COMPLETE" else (),
            stopped_by=t.user_attrs.get(STOPPED_BY_ATTR))
    return out


def failure_message(trial_id: str, earlier_error: str | None) -> str:
    """What a failed trial honoured by a resume says: its verdict and the error its run recorded before."""
    lines = (earlier_error or "").strip().splitlines()
    earlier = f"; its error: {lines[-1].strip()[:300]}" if lines else ""
    return (f"trial {trial_id} failed before the search was killed (Optuna recorded FAIL){earlier}; --resume does "
            f"not train a failed trial again")
