"""Parameter importance of a search, with its uncertainty: Optuna's fANOVA over the completed trials, and a
bootstrap over those trials that shows how much the ranking would move with other trials of the same search.

fANOVA fits a random forest of the objective on the searched parameters; with a handful of trials the forest
splits on whichever parameter happens to separate them, so a ranking is only drawn from ``min_trials_to_rank``
completed trials on (two per searched parameter, at least four) and always with its bootstrap interval.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import optuna
import pandas as pd

BOOTSTRAP_RESAMPLES = 20
INTERVAL = (10.0, 90.0)  # percentiles of the bootstrap importances drawn as the interval


def min_trials_to_rank(n_params: int) -> int:
    """Completed trials needed before the importances of ``n_params`` searched parameters are ranked."""
    return max(4, 2 * n_params)


def searched_params(trials: Sequence[Any]) -> list[str]:
    """The parameters that vary among ``trials`` (FrozenTrials), in the order the first trial has them."""
    names = list(dict.fromkeys(p for t in trials for p in t.params))
    return [p for p in names if len({repr(t.params.get(p)) for t in trials}) > 1]


def _fanova(trials: Sequence[Any], directions: Sequence[Any]) -> dict[str, float]:
    study = optuna.create_study(directions=list(directions))
    study.add_trials(list(trials))
    target = (lambda t: t.values[0]) if len(directions) > 1 else None  # FID, the first objective
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return dict(optuna.importance.get_param_importances(study, target=target, evaluator=evaluator))


def importance_table(trials: Sequence[Any], directions: Sequence[Any], resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> pd.DataFrame:
    """One row per parameter, most important first: ``importance`` (fANOVA on all ``trials``, COMPLETE
    FrozenTrials; sums to 1), ``low`` and ``high`` (the INTERVAL percentiles over ``resamples`` fits on trials
    drawn with replacement) and ``resamples`` (the fits that succeeded; a resample whose trials share every
    value cannot be fitted); ``attrs["n_trials"]`` is the number of trials. Raises ValueError when there are too
    few trials to rank (``min_trials_to_rank``)."""
    varying = searched_params(trials)
    need = min_trials_to_rank(max(1, len(varying)))
    if len(trials) < need:
        raise ValueError(f"{len(trials)} completed trial(s): too few to rank {len(varying)} varying parameter(s) "
                         f"(needs >= {need} completed trials: two per parameter, at least 4)")
    if not varying:
        raise ValueError(f"the {len(trials)} completed trials share every parameter value")
    full = _fanova(trials, directions)
    rng = np.random.default_rng(seed)
    fits: list[dict[str, float]] = []
    for _ in range(resamples):
        draw = [trials[i] for i in rng.integers(0, len(trials), len(trials))]
        try:
            fits.append(_fanova(draw, directions))
        except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. every drawn trial with the same values
            continue
    rows = []
    for name, value in full.items():
        boot = [f.get(name, 0.0) for f in fits]
        low, high = np.percentile(boot, INTERVAL) if boot else (math.nan, math.nan)
        rows.append({"param": name, "importance": value, "low": float(low), "high": float(high),
                     "resamples": len(fits)})
    table = pd.DataFrame(rows).sort_values("importance", ascending=False, ignore_index=True)
    table.attrs["n_trials"] = len(trials)
    return table


def plot_importance_table(table: pd.DataFrame) -> Any:
    """Horizontal bars (most important on top) with the bootstrap interval as error bars; the title says over
    how many trials (``table.attrs["n_trials"]``) and resamples."""
    import matplotlib.pyplot as plt  # deferred: drawn at the search's end; --help and the checks skip it

    rows = table.iloc[::-1]
    err = np.vstack([(rows["importance"] - rows["low"]).clip(lower=0),
                     (rows["high"] - rows["importance"]).clip(lower=0)])
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.6))
    ax.barh(rows["param"], rows["importance"], xerr=np.nan_to_num(err), capsize=3)
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    resamples = int(table["resamples"].iloc[0]) if len(table) else 0
    ax.set_title(f"parameter importance over {table.attrs.get('n_trials', '?')} completed trials\nbars: "
                 f"{INTERVAL[0]:g}-{INTERVAL[1]:g}% interval over {resamples} bootstrap resamples of the trials",
                 fontsize=9)
    fig.tight_layout()
    return fig
