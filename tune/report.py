"""The search's parent run as its summary in MLflow: the ranked trials as an MLflow table, Optuna's
parameter-importance and parallel-coordinate plots, the best trial's sample grid, and the command that trains the
best trial's configuration again."""

from __future__ import annotations

import math
import os
import shlex
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient

from tune import importance, registry, tracking
from tune.tags import BEST_COMMAND_TAG, BEST_MODEL_TAG, BEST_TRIAL_TAG, SEARCH_ID_TAG, SEARCH_TAG
from tune.warm_start import own_trials

MIN_TRIALS_TO_RANK = 2  # parallel coordinates need two finished trials (importance: tune.importance's rule)


def best_command(preset: str, overrides: Sequence[str], row: pd.Series) -> str:
    """``python -m pdcbdm.train`` with the search's own overrides and the best trial's searched values: the same
    resolved config as that trial (one training run, no Ray)."""
    parts = ["python", "-m", "pdcbdm.train", "--preset", preset]
    for item in overrides:
        parts += ["--set", item]
    for key in [k for k in row.index if "." in k]:  # the searched knobs (config fields)
        value = row.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts += ["--set", f"{key}={value}"]
    parts += ["--out", f"runs/best-{row['trial_id']}"]
    return shlex.join(parts)


def _message_figure(title: str, text: str) -> Any:
    """A figure that says why a plot is missing (too few trials), so the parent run always shows something."""
    import matplotlib.pyplot as plt  # deferred: drawn at the search's end; --help and the checks skip it

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11)
    return fig


def optuna_figures(study: Any) -> dict[str, Any]:
    """Artifact name -> matplotlib figure: Optuna's parameter importances and parallel coordinates of this
    search's own trials (warm-start trials copied from earlier searches left out), or a figure that says the
    study has too few finished trials to draw them."""
    import matplotlib  # deferred: drawn at the search's end; --help and the checks skip it

    matplotlib.use("Agg")
    # deferred: imports pyplot, after the headless backend is chosen; --help and the checks skip it
    from optuna.visualization import matplotlib as ovm

    if len(own_trials(study)) < len(study.trials):  # the plots take a study: an in-memory one of our trials
        ours = optuna.create_study(directions=study.directions)
        ours.add_trials(own_trials(study))
        study = ours
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    figures: dict[str, Any] = {"optuna/param_importances.png": _importance_figure(done, study.directions)}
    plots = {"optuna/parallel_coordinate.png": ("parallel coordinates", ovm.plot_parallel_coordinate)}
    multi = len(study.directions) > 1
    for name, (title, plot) in plots.items():
        if len(done) < MIN_TRIALS_TO_RANK:
            figures[name] = _message_figure(title, f"{len(done)} completed trial(s): too few to rank the "
                                                   f"parameters (at least {MIN_TRIALS_TO_RANK} are needed)")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                kwargs = {"target": lambda t: t.values[0], "target_name": "FID"} if multi else {}
                figures[name] = plot(study, **kwargs).figure
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. every trial with the same value
            figures[name] = _message_figure(title, f"Optuna could not draw this from {len(done)} trials: {exc}")
    return figures


def _importance_figure(done: list[Any], directions: Sequence[Any]) -> Any:
    """The importances with their bootstrap intervals, or a figure that says why there are none (too few
    completed trials to rank, or trials that share every value)."""
    try:
        return importance.plot_importance_table(importance.importance_table(done, directions))
    except ValueError as exc:  # too few to rank, or every trial with the same values
        return _message_figure("parameter importance", str(exc))


def _best_grid(uri: str, row: pd.Series, folder: Path) -> Path | None:
    """The best trial's final grid at its best w, downloaded into ``folder`` (None when it has none)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar in the search's output
    w = row.get("best_guidance")
    run_id = row.get("mlflow_run_id")
    if not isinstance(run_id, str) or w is None or (isinstance(w, float) and math.isnan(w)):
        return None
    try:
        return Path(MlflowClient(uri).download_artifacts(run_id, f"samples/final/samples_w{float(w):g}.png",
                                                         str(folder)))
    except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
        return None


def record_search(uri: str, parent: str, table: pd.DataFrame, study: Any, preset: str,
                  overrides: Sequence[str]) -> str | None:
    """Log the search's summary on its parent run and register the best trial's network
    (``tune.registry.register_best``: ``models:/pdcbdm-<search>@best``, tagged ``tune.tags.BEST_MODEL_TAG`` on the
    parent); returns the best trial's command (None without a completed trial)."""
    import matplotlib.pyplot as plt  # deferred: drawn at the search's end; --help and the checks skip it

    tracking.log_table(uri, parent, table, "trials.json")
    for name, fig in optuna_figures(study).items():
        tracking.log_figure(uri, parent, fig, name)
        plt.close(fig)
    done = table[table["status"] == "completed"] if not table.empty else table
    if done.empty:
        return None
    best = done.iloc[0]
    command = best_command(preset, overrides, best)
    tracking.set_tags(uri, parent, {BEST_COMMAND_TAG: command, BEST_TRIAL_TAG: best["trial_id"]})
    tracking.log_text(uri, parent, command + "\n", "best_trial/command.txt")
    register(uri, parent, table)
    with tempfile.TemporaryDirectory(prefix="pdcbdm-best-") as tmp:
        grid = _best_grid(uri, best, Path(tmp))
        if grid is not None:
            tracking.log_image_file(uri, parent, grid, f"best_trial/{grid.name}")
    return command


def register(uri: str, parent: str, table: pd.DataFrame) -> None:
    """Register the best trial's network under the search named by the parent run's tags, print where it is (or
    why it is not), and tag the parent run with its URI."""
    tags = tracking.run_tags(uri, parent)
    search = tags.get(SEARCH_TAG, "")
    version, line = registry.register_best(uri, table, search, tags.get(SEARCH_ID_TAG, search))
    print(line, flush=True)
    if version is not None:
        tracking.set_tags(uri, parent, {BEST_MODEL_TAG: registry.best_uri(search)})
