"""Ray's OptunaSearch, told what the search means by a trial's outcome.

Ray's ``OptunaSearch`` keys intermediate values by Tune's ``training_iteration`` (which restarts at 1 when a trial
is restored) and tells Optuna COMPLETE for a trial that ASHA stopped early. ``StepOptunaSearch`` keys them by the
training step the worker reports, tells Optuna PRUNED for a trial that ended before ``train.steps`` and COMPLETE
(with its final objective) for one that ran to the end, FAIL for an errored one, and records the Tune trial id on
each Optuna trial (user attribute ``tune_trial_id``) so that the study and the trials table can be matched. With a
time budget (tune/budget.py) it proposes no trial after the deadline; ``add_trials`` puts warm-start trials
(tune/warm_start.py) into the study before the first proposal.
"""

from __future__ import annotations

import logging
from typing import Any

from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from tune import budget, faults, verdicts
from tune.results import finite

logger = logging.getLogger(__name__)


# TPE's random start-up never exceeds this many trials: a quarter of a huge budget would stay random for days
MAX_STARTUP_TRIALS = 25


def startup_trials(trials: int) -> int:
    """TPE's random start-up trials for a budget of ``trials``: a quarter of it, at least 2 (Optuna's default of
    10 would leave a search of 8 trials random throughout), at most ``MAX_STARTUP_TRIALS``."""
    return min(MAX_STARTUP_TRIALS, max(2, round(trials / 4)))


class StepOptunaSearch(OptunaSearch):
    """OptunaSearch with intermediate values keyed by the reported ``step`` and early-stopped trials PRUNED.

    Args:
        *args, **kwargs: as ``OptunaSearch`` (``metric`` is the objective the worker reports: the proxy FID at
            intermediate evaluations, the final FID at the end).
        max_steps: the training budget (``train.steps``); a trial whose last reported step is below it was stopped
            early.
        budget_file: the search's budget.json (``tune.budget``): once its deadline has passed, ``suggest`` says
            the search is finished (no new trial starts); None: no time budget.

    Intermediate values are reported (single objective only: Optuna has none for several objectives) at every
    evaluation before the last step; the last step's value is the trial's value, not an intermediate one. Stays
    picklable: Tune saves the searcher with the experiment state for ``--resume``.
    """

    def __init__(self, *args: Any, max_steps: int, budget_file: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_steps = int(max_steps)
        self._last_step: dict[str, int] = {}
        self._budget_file = budget_file

    def add_trials(self, trials: list[Any]) -> None:
        """Finished trials of earlier searches (warm start), added to the study before the first ``suggest``.
        The preset's point, enqueued when the study was set up, is still the first trial proposed (Optuna asks
        WAITING trials first)."""
        self._ot_study.add_trials(trials)

    def suggest(self, trial_id: str) -> dict | str | None:
        path = self._budget_file
        if trial_id not in self._ot_trials and budget.passed(path):
            budget.mark_reached(path)
            return Searcher.FINISHED
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            ot_trial.set_user_attr(verdicts.TUNE_TRIAL_ATTR, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._report(trial_id, result)

    def _report(self, trial_id: str, result: dict) -> None:
        """The result's objective as the intermediate value at its training step (once per step)."""
        if result.get("step") is None:
            return
        step, previous = int(result["step"]), self._last_step.get(trial_id, -1)
        self._last_step[trial_id] = max(step, previous)
        # a step seen before (a trial resumed from a checkpoint) keeps its first value, as Optuna would
        if isinstance(self.metric, list) or step >= self._max_steps or step <= previous:
            return
        value = finite(result.get(self.metric))
        if value is None:
            return
        try:
            self._ot_trials[trial_id].report(value, step)
        except UpdateFinishedTrialError:  # told its end before a kill (tune.verdicts): the study keeps that end
            pass

    def restore(self, checkpoint_path: str) -> None:
        """Tune's restore of the searcher (--resume), then ``fail_orphans``."""
        super().restore(checkpoint_path)
        self.fail_orphans()

    def fail_orphans(self) -> list[int]:
        """Mark FAIL the study's RUNNING trials that no Tune trial owns: asked (``study.ask``) after Tune's last
        save of this searcher, then lost with the driver. TPE's constant liar would otherwise count them as
        permanent pessimistic results. Returns their numbers."""
        owned = {t._trial_id for t in self._ot_trials.values()}
        orphans = [t for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t._trial_id not in owned]
        for t in orphans:
            self._ot_study.tell(t.number, state=TrialState.FAIL)
        if orphans:
            logger.warning("Optuna trials %s were started but never run (driver killed): marked FAIL",
                           [t.number for t in orphans])
        return [t.number for t in orphans]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        result = result or {}
        # when a scheduler stops a trial, Tune passes its last result here only, not to on_trial_result
        self._report(trial_id, result)
        step = self._last_step.get(trial_id)
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [finite(result.get(m)) for m in metrics]
        if error or result.get("diverged"):
            state, told = "FAIL", None
        elif step is None or int(step) < self._max_steps:
            state, told = "PRUNED", None
        elif None in values:
            state, told = "FAIL", None  # ran to the end without a usable objective
        else:
            state, told = "COMPLETE", values if len(values) > 1 else values[0]
        try:
            if state == "PRUNED":  # a resume honours the verdict with its stopper (tune.verdicts)
                self._ot_trials[trial_id].set_user_attr(verdicts.STOPPED_BY_ATTR, "time budget" if
                                                        result.get(budget.STOPPED_KEY) else "ASHA")
            self._ot_study.tell(self._ot_trials[trial_id], told, state=TrialState[state])
        except UpdateFinishedTrialError:  # a resumed trial honouring its verdict (tune.verdicts): Optuna keeps it
            pass
        except Exception as exc:  # noqa: BLE001 - e.g. a trial already finished in the storage
            logger.warning("could not tell Optuna the end of trial %s: %s", trial_id, exc)
        else:
            faults.driver_dies_after(state)
        self._completed_trials.add(trial_id)
