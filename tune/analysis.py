"""Helpers the analysis notebooks share: load a search's or an ablation's results, and draw their figures.

``notebooks/analyse_best_trials.ipynb`` reads a search folder (OUT/searches/NAME, as tune/search.py writes it):
the trials table (trials.parquet, or the MLflow runs when the Parquet export is missing), each trial's MLflow
metrics (guidance grid ``fid_w{w}``, head/tail scores), the Optuna study (optuna.db) for parameter importance, and
the best trial's artifacts (final sample grid, ``evaluation/per_class.parquet``).
``notebooks/ablation.ipynb`` reads an ablation folder as pipelines/ablation.py writes it.

Every loader tolerates what tiny or interrupted searches produce: stopped and failed trials, NaN or missing
metrics, an unreachable MLflow store (the Parquet table is then used alone). Plots return matplotlib figures.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
from mlflow.tracking import MlflowClient

from pdcbdm.config import Config
from pdcbdm.evaluation import evaluation_split
from pdcbdm.train import load_data
from tune.importance import importance_table, plot_importance_table
from tune.redact import TRACKING_ENV, reveal
from tune.results import METRIC_COLUMNS, format_table, rank
from tune.space_file import default_knobs
from tune.tags import ERROR_TAG, KIND_TAG, OUTCOME_TAG, SCORING_TAGS, SEARCH_ID_TAG, TRIAL_TAG

REPO = Path(__file__).resolve().parents[1]
GUIDANCE_METRIC = re.compile(r"^fid_w(?P<w>[0-9.]+)$")
CATEGORICAL = ("loss.label_dist", "model.tsa_resolutions")  # searched as choices: kept as text
STATUS_COLORS = {"completed": "C0", "stopped": "C1", "failed": "C3"}
# how a run was scored: the table's columns are named after the evaluator's scoring facts, so tune.tags.SCORING_TAGS
# maps each column to its tag

__all__ = ["SearchResults", "AblationResults", "find_folder", "load_search", "load_ablation", "format_table",
           "searched_columns", "scoring_note", "plot_metric_vs_params", "guidance_curves", "plot_guidance",
           "param_importance", "plot_importance", "plot_head_tail", "best_trial", "best_samples", "per_class_table",
           "plot_per_class", "show_image", "ablation_head_tail", "plot_ablation_head_tail", "ablation_per_class",
           "plot_ablation_per_class"]


def find_folder(path: str | Path, marker: str) -> Path:
    """``path`` as given, or relative to the repository root (notebooks run from notebooks/ or the root); it must
    hold the file ``marker``. FileNotFoundError names the path and the missing file."""
    given = Path(path).expanduser()
    for candidate in ([given] if given.is_absolute() else [Path.cwd() / given, REPO / given]):
        if (candidate / marker).is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"{path}: no {marker} there (looked in {Path.cwd() / given} and {REPO / given}); "
                            f"set the folder in the notebook's first cell")


# -- a search -------------------------------------------------------------------------------------------------------
@dataclass
class SearchResults:
    """One search: its folder, name, search.json, MLflow store and the trials table (one row per trial).

    Args:
        folder: OUT/searches/NAME.
        name: the search name (Optuna study name, MLflow parent run name).
        meta: search.json (args, resolved base config, tracking_uri).
        tracking_uri: the MLflow store of the trials' runs.
        trials: ranked trials: rank, trial_id, status, the searched params, metrics, mlflow_run_id. Rebuilt from
            MLflow, a run still RUNNING (a search in progress, or killed) counts as "stopped".
        source: "parquet" or "mlflow", where the table came from.
        notes: what could not be loaded, and why.
    """

    folder: Path
    name: str
    meta: dict[str, Any]
    tracking_uri: str | None
    trials: pd.DataFrame
    source: str
    notes: list[str] = field(default_factory=list)


def _tracking_uri(meta: dict[str, Any]) -> str | None:
    """The MLflow store a search.json names; a URI it holds masked (it carried a password) is taken again from
    MLFLOW_TRACKING_URI, as a resume takes it."""
    uri = meta.get("tracking_uri")
    return reveal(uri, (TRACKING_ENV,)) if uri else None


def load_search(search_dir: str | Path, source: str = "auto") -> SearchResults:
    """Load a search folder. ``source``: "parquet" (trials.parquet only), "mlflow" (the MLflow runs only) or
    "auto" (trials.parquet when present, else MLflow; either way enriched with every MLflow metric per run)."""
    if source not in ("auto", "parquet", "mlflow"):
        raise ValueError(f"source must be 'auto', 'parquet' or 'mlflow', got {source!r}")
    folder = find_folder(search_dir, "search.json")
    meta = json.loads((folder / "search.json").read_text())
    name, uri = meta.get("name") or folder.name, _tracking_uri(meta)
    notes: list[str] = []
    parquet = folder / "trials.parquet"
    if source != "mlflow" and parquet.is_file():
        trials, used = pd.read_parquet(parquet), "parquet"
    elif source == "parquet":
        raise FileNotFoundError(f"{parquet} is missing (the search did not finish); use source='mlflow'")
    else:
        trials, used = _trials_from_mlflow(uri, name, meta), "mlflow"
    if source != "parquet" and uri and not trials.empty:
        try:
            trials = _with_run_metrics(trials, uri)
        except Exception as exc:  # noqa: BLE001 - an unreachable store leaves the Parquet table usable
            notes.append(f"MLflow metrics not loaded from {uri}: {exc}")
    note = scoring_note(trials)
    return SearchResults(folder, name, meta, uri, _numeric(trials), used, notes + ([note] if note else []))


def _numeric(df: pd.DataFrame) -> pd.DataFrame:
    """Metric columns as floats (None becomes NaN); searched params numeric where every value is a number."""
    df = df.copy()
    for col in df.columns:
        if col in METRIC_COLUMNS or GUIDANCE_METRIC.match(col) or col.startswith(("consistency", "fid", "is_")):
            df[col] = pd.to_numeric(df[col], errors="coerce")
        elif col in default_knobs() and col not in CATEGORICAL:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def _client(uri: str) -> Any:
    return MlflowClient(uri)


def _trials_from_mlflow(uri: str | None, name: str, meta: dict[str, Any]) -> pd.DataFrame:
    """The trials table rebuilt from the search's child runs (when trials.parquet was never written)."""
    if not uri:
        raise FileNotFoundError(f"search {name!r}: neither trials.parquet nor a tracking_uri in search.json")
    client = _client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    sid = meta.get("search_id") or name
    runs = client.search_runs(experiments, filter_string=f"tags.`{SEARCH_ID_TAG}` = '{sid}' and "
                              f"tags.`{KIND_TAG}` = 'trial'", max_results=10_000)
    rows = []
    for run in runs:
        m = run.data.metrics
        row = {"trial_id": run.data.tags.get(TRIAL_TAG, ""), "status": _run_status(run),
               **{k: run.data.params.get(k) for k in default_knobs() if k in run.data.params},
               **{k: m.get(k) for k in METRIC_COLUMNS}, "error": run.data.tags.get(ERROR_TAG),
               "mlflow_run_id": run.info.run_id}
        rows.append(row)
    return rank(_numeric(pd.DataFrame(rows)))


def _run_status(run: Any) -> str:
    """completed, stopped or failed, from the run's outcome tag (``tune.tags.OUTCOME_TAG``); runs without
    it: completed when the final FID was logged (only a trial that ran its budget has one)."""
    outcome = run.data.tags.get(OUTCOME_TAG, "")
    if run.info.status == "FAILED" or outcome.startswith("failed"):
        return "failed"
    if outcome:
        return "completed" if outcome == "completed" else "stopped"
    return "completed" if "fid" in run.data.metrics else "stopped"


def _with_run_metrics(trials: pd.DataFrame, uri: str) -> pd.DataFrame:
    """Add each run's latest MLflow metrics the table lacks (fid_w{w}, consistency_head, losses, ...)."""
    if "mlflow_run_id" not in trials:
        return trials
    client = _client(uri)
    extra = []
    for run_id in trials["mlflow_run_id"]:
        data = client.get_run(run_id).data if isinstance(run_id, str) and run_id else None
        metrics = data.metrics if data else {}
        scoring = {column: data.tags.get(tag) for column, tag in SCORING_TAGS.items()} if data else {}
        extra.append({k: v for k, v in {**metrics, **scoring}.items() if k not in trials.columns})
    return pd.concat([trials.reset_index(drop=True), pd.DataFrame(extra)], axis=1)


def scoring_note(trials: pd.DataFrame) -> str | None:
    """Why the trials' scores do not compare, or None: they were scored against more than one reference or by more
    than one kind of judge (the runs' ``REFERENCE_KIND_TAG`` / ``JUDGE_TAG`` tags; a search refuses to mix
    them, a table assembled by hand may not)."""
    mixed = []
    for column in SCORING_TAGS:
        if column in trials:
            kinds = sorted({_judge_network(v) if column == "judge" else v for v in trials[column].dropna()})
            if len(kinds) > 1:
                mixed.append(f"{column}: {', '.join(map(str, kinds))}")
    return None if not mixed else f"trials scored differently, do not rank them together ({'; '.join(mixed)})"


def _judge_network(tag: str) -> str:
    """The judging network of a ``JUDGE_TAG`` tag, without its coverage and accuracy (which vary by run)."""
    return str(tag).split(" (")[0]


def searched_columns(trials: pd.DataFrame) -> list[str]:
    """The searched hyperparameters present in the table (the default space file's knobs, in its order)."""
    return [k for k in default_knobs() if k in trials.columns]


def _score_column(trials: pd.DataFrame, metric: str) -> str:
    """``metric`` when at least two trials have it (ASHA stops most trials before their final FID), else the
    proxy FID every evaluated trial reports when more trials have that."""
    have = int(trials[metric].notna().sum()) if metric in trials else 0
    proxy = int(trials["proxy_fid"].notna().sum()) if "proxy_fid" in trials else 0
    return metric if have >= 2 or have >= proxy else "proxy_fid"


def plot_metric_vs_params(trials: pd.DataFrame, metric: str = "fid") -> Any:
    """A panel per searched hyperparameter: ``metric`` (the proxy FID where no trial has it) against its value,
    coloured by status; numeric values spanning over a decade get a log axis, categorical ones a position each."""
    params, col = searched_columns(trials), _score_column(trials, metric)
    cols = min(4, max(1, len(params)))
    rows = -(-max(1, len(params)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(params):]:
        ax.set_axis_off()
    for ax, param in zip(axes.flat, params):
        values = trials[param]
        numeric = pd.api.types.is_numeric_dtype(values)
        cats = sorted({str(v) for v in values}) if not numeric else []
        xs = values if numeric else values.map(lambda v: cats.index(str(v)))
        for status, color in STATUS_COLORS.items():
            sel = trials["status"] == status
            ax.scatter(xs[sel], trials.loc[sel, col], c=color, label=status, s=30)
        if numeric and (values > 0).all() and values.max() > 10 * values.min():
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(cats)), [c or "(none)" for c in cats], rotation=30, ha="right")
        ax.set_xlabel(param)
        ax.set_ylabel(col)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{col} of each trial" + ("" if col == metric else f" (too few trials have {metric})"), fontsize=10)
    fig.tight_layout()
    return fig


def guidance_curves(trials: pd.DataFrame) -> pd.DataFrame:
    """Long table (trial_id, status, guidance, fid) from the per-trial ``fid_w{w}`` metrics."""
    cols = {c: float(GUIDANCE_METRIC.match(c)["w"]) for c in trials.columns if GUIDANCE_METRIC.match(c)}
    rows = [{"trial_id": r["trial_id"], "status": r["status"], "guidance": w, "fid": r[c]}
            for _, r in trials.iterrows() for c, w in cols.items() if pd.notna(r[c])]
    return pd.DataFrame(rows, columns=["trial_id", "status", "guidance", "fid"]).sort_values(["trial_id", "guidance"])


def plot_guidance(curves: pd.DataFrame) -> Any:
    """FID against the classifier-free guidance scale w, a line per trial (only trials evaluated at the end)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for trial_id, part in curves.groupby("trial_id"):
        ax.plot(part["guidance"], part["fid"], marker="o", label=str(trial_id))
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    if not curves.empty:
        ax.legend(fontsize=8, title="trial")
    fig.tight_layout()
    return fig


def param_importance(results: SearchResults) -> pd.DataFrame:
    """Optuna's parameter importances (fANOVA) over the study's completed trials, with bootstrap intervals
    (``tune.importance.importance_table``: columns param, importance, low, high, resamples; most important
    first); the first objective when the search was multi-objective. ValueError says why they cannot be computed
    (fewer completed trials than two per varying parameter, or no varying parameter)."""
    db = results.folder / "optuna.db"
    if not db.is_file():
        raise FileNotFoundError(f"{db} is missing: the search has no Optuna study")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=results.name, storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return importance_table(done, study.directions)  # ValueError: too few trials, or no varying parameter


plot_importance = plot_importance_table  # the notebook's name: bars with their bootstrap intervals


def _paired_bars(ax: Any, names: Sequence[str], left: Sequence[float], right: Sequence[float],
                 labels: tuple[str, str], title: str, left_err: Any = None, right_err: Any = None) -> None:
    x = np.arange(len(names))
    ax.bar(x - 0.2, left, 0.4, yerr=left_err, capsize=3, label=labels[0])
    ax.bar(x + 0.2, right, 0.4, yerr=right_err, capsize=3, label=labels[1])
    ax.set_xticks(x, list(names), rotation=30, ha="right")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def plot_head_tail(trials: pd.DataFrame) -> Any:
    """Per trial with final scores: head versus tail FID, and head versus tail class consistency (NaN bars are
    left empty). ValueError when no trial has them."""
    keys = [k for k in ("fid_head", "fid_tail", "consistency_head", "consistency_tail") if k in trials]
    trials = trials[trials[keys].notna().any(axis=1)] if keys else trials.iloc[:0]
    if trials.empty:
        raise ValueError("no trial has head/tail metrics (none reached its final evaluation)")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [str(t) for t in trials["trial_id"]]
    get = lambda c: trials[c] if c in trials else pd.Series(np.nan, index=trials.index)  # noqa: E731
    _paired_bars(axes[0], names, get("fid_head"), get("fid_tail"), ("head", "tail"), "FID by group (lower is better)")
    _paired_bars(axes[1], names, get("consistency_head"), get("consistency_tail"), ("head", "tail"),
                 "class consistency by group (higher is better)")
    fig.tight_layout()
    return fig


# -- the best trial's artifacts -------------------------------------------------------------------------------------
def best_trial(trials: pd.DataFrame) -> pd.Series | None:
    """The top-ranked trial that has an MLflow run (the table is ranked: completed by FID first), or None."""
    if trials.empty or "mlflow_run_id" not in trials:
        return None
    have = trials[trials["mlflow_run_id"].map(lambda v: isinstance(v, str) and bool(v))]
    return have.iloc[0] if not have.empty else None


def _download(uri: str, run_id: str, path: str) -> Path | None:
    """A run's artifact copied to a temporary folder, or None when it does not exist."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in the notebook's output
    try:
        return Path(_client(uri).download_artifacts(run_id, path, tempfile.mkdtemp(prefix="pdcbdm-nb-")))
    except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
        return None


def _artifact_names(uri: str, run_id: str, folder: str) -> list[str]:
    try:
        return [a.path for a in _client(uri).list_artifacts(run_id, folder) if not a.is_dir]
    except Exception:  # noqa: BLE001
        return []


def best_samples(results: SearchResults, trial: pd.Series) -> Path | None:
    """The trial's final sample grid at its best guidance scale, else its latest grid during training."""
    run_id, uri = trial["mlflow_run_id"], results.tracking_uri
    if not uri:
        return None
    w = trial.get("best_guidance")
    if w is not None and not pd.isna(w):
        path = _download(uri, run_id, f"samples/final/samples_w{float(w):g}.png")
        if path is not None:
            return path
    steps = sorted(_grid_steps(_artifact_names(uri, run_id, "images")).items())
    return _download(uri, run_id, steps[-1][1]) if steps else None


def _grid_steps(names: list[str]) -> dict[int, str]:
    """Step -> artifact path of the proxy grids logged with ``log_image(key="samples", step=...)``: MLflow names
    them images/samples+step+STEP+timestamp+...png (a compressed .webp copy beside each)."""
    found = {}
    for name in names:
        parts = Path(name).name.split("+")
        if parts[0] == "samples" and len(parts) > 2 and parts[1] == "step" and name.endswith(".png"):
            found[int(parts[2])] = name
    return found


def per_class_table(results: SearchResults, trial: pd.Series) -> pd.DataFrame | None:
    """The trial's per-class scores (label, fid, consistency, n, group) at its best guidance scale, or None.
    The group (head/tail) comes from the trial's config and its data set's class counts when they can be loaded."""
    if not results.tracking_uri:
        return None
    path = _download(results.tracking_uri, trial["mlflow_run_id"], "evaluation/per_class.parquet")
    if path is None:
        return None
    table = pd.read_parquet(path)
    w = trial.get("best_guidance")
    if w is not None and not pd.isna(w) and not table.empty:
        nearest = table["guidance"].iloc[(table["guidance"] - float(w)).abs().argmin()]
        table = table[table["guidance"] == nearest]
    table = table.copy()
    table["group"] = _groups(results, trial, table["label"])
    return table.reset_index(drop=True)


def _groups(results: SearchResults, trial: pd.Series, labels: pd.Series) -> list[str]:
    """"head"/"tail" per label from the evaluation's split (``eval.split_ratio``, the classes the trial's head and
    tail metrics were computed on), "" when unavailable."""
    try:
        path = _download(results.tracking_uri, trial["mlflow_run_id"], "config.json")
        cfg = Config.load_json(path) if path else Config.from_dict(results.meta["config"])
        counts = load_data(cfg).counts()
        split = evaluation_split(cfg, counts)
        return [split.group_of(int(k)) for k in labels]
    except Exception:  # noqa: BLE001 - the data set may be absent here (e.g. CIFAR on another machine)
        return [""] * len(labels)


def plot_per_class(table: pd.DataFrame, title: str = "per-class FID") -> Any:
    """FID bar per class, head classes in one colour and tail classes in another."""
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(table)), 3.5))
    colors = [{"head": "C0", "tail": "C3"}.get(g, "C7") for g in table.get("group", [""] * len(table))]
    ax.bar(table["label"].astype(str), table["fid"], color=colors)
    ax.set_xlabel("class (C0 head, C3 tail)")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def show_image(path: Path, title: str = "") -> Any:
    """A PNG (a sample grid) as a matplotlib figure."""
    img = mpimg.imread(str(path))
    fig, ax = plt.subplots(figsize=(min(12, img.shape[1] / 60 + 1), min(12, img.shape[0] / 60 + 1)))
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# -- an ablation ------------------------------------------------------------------------------------------------------
@dataclass
class AblationResults:
    """One ablation folder (pipelines/ablation.py's --out).

    Args:
        folder: the folder.
        runs: ablation.parquet (one row per variant x seed).
        summary: summary.csv (mean and std per metric per variant).
        meta: ablation.json (command line, base config, cells, MLflow store and parent run).
    """

    folder: Path
    runs: pd.DataFrame
    summary: pd.DataFrame
    meta: dict[str, Any]


def load_ablation(ablation_dir: str | Path) -> AblationResults:
    """Load an ablation folder; FileNotFoundError names a missing file."""
    folder = find_folder(ablation_dir, "ablation.parquet")
    for name in ("summary.csv", "ablation.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: the ablation did not finish")
    return AblationResults(folder, pd.read_parquet(folder / "ablation.parquet"), pd.read_csv(folder / "summary.csv"),
                           json.loads((folder / "ablation.json").read_text()))


def ablation_head_tail(runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant, in the table's order (pipelines/ablation.py writes Table 1's): mean and std over finished seeds
    of head/tail FID and consistency."""
    keys = ["fid_head", "fid_tail", "consistency_head", "consistency_tail", "tail_to_head_confusion"]
    done = runs[runs["status"] == "finished"]
    rows = []
    for name in dict.fromkeys(done["variant"]):
        part = done[done["variant"] == name]
        row: dict[str, Any] = {"variant": name, "n": len(part)}
        for k in keys:
            values = pd.to_numeric(part[k], errors="coerce") if k in part else pd.Series(dtype=float)
            row[f"{k}_mean"], row[f"{k}_std"] = values.mean(), values.std(ddof=1) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def plot_ablation_head_tail(table: pd.DataFrame) -> Any:
    """Per variant: head versus tail FID, and head versus tail consistency, with one-std error bars."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(table["variant"])
    std = lambda c: table[c].fillna(0.0)  # noqa: E731
    _paired_bars(axes[0], names, table["fid_head_mean"], table["fid_tail_mean"], ("head", "tail"),
                 "FID by group (lower is better)", std("fid_head_std"), std("fid_tail_std"))
    _paired_bars(axes[1], names, table["consistency_head_mean"], table["consistency_tail_mean"], ("head", "tail"),
                 "class consistency by group (higher is better)", std("consistency_head_std"),
                 std("consistency_tail_std"))
    fig.tight_layout()
    return fig


def ablation_per_class(results: AblationResults) -> pd.DataFrame:
    """Per-class FID averaged over seeds: rows = class labels, columns = variants (from each run's MLflow artifact
    evaluation/per_class.parquet, at the table's fixed guidance scale)."""
    uri = _tracking_uri(results.meta)
    parts = []
    for _, row in results.runs[results.runs["status"] == "finished"].iterrows():
        run_id = row.get("mlflow_run_id")
        path = _download(uri, run_id, "evaluation/per_class.parquet") if uri and isinstance(run_id, str) else None
        if path is not None:
            table = pd.read_parquet(path)
            table = table[np.isclose(table["guidance"], row.get("guidance", table["guidance"].iloc[0]))]
            parts.append(table.assign(variant=row["variant"]))
    if not parts:
        return pd.DataFrame()
    both = pd.concat(parts)
    wide = both.groupby(["label", "variant"])["fid"].mean().unstack("variant")
    return wide[[v for v in dict.fromkeys(results.runs["variant"]) if v in wide.columns]]


def plot_ablation_per_class(wide: pd.DataFrame) -> Any:
    """Per-class FID, a line per variant (classes ordered head first as in the data set)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for variant in wide.columns:
        ax.plot(wide.index, wide[variant], marker="o", label=variant)
    ax.set_xlabel("class")
    ax.set_ylabel("FID (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
