"""The end of a search (tune/search.py): the ranked trials table (printed, and trials.parquet), Tune, Optuna and
MLflow brought in line with it (also after a resume whose driver died between a trial's end and its bookkeeping),
the parent run closed with the best trial's metrics, what the time budget cut, and the commands that come next.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from tune import budget as budget_mod
from tune import results as results_mod
from tune import tracking
from tune.redact import redact_text
from tune.report import record_search
from tune.results import failure_outcome, finite
from tune.runner import SearchPlan
from tune.study import load_study, reconcile
from tune.tags import TIME_BUDGET_TAG, TRIAL_TAG



def summarise(grid: Any, p: SearchPlan, experiment_id: str, parent: str) -> Any:
    """Ranked table (printed and saved as trials.parquet), Optuna and MLflow brought in line with it, parent run
    closed with the best trial's metrics."""
    cfg, uri = p.cfg, p.uri
    found = tracking.runs_of_search(uri, experiment_id, p.search_id)
    runs = {r.data.tags.get(TRIAL_TAG): r.info.run_id for r in found}
    table = results_mod.trial_rows(grid, cfg.train.steps, runs)
    reconcile_records(p, table, {r.info.run_id: r.info.status for r in found})
    close_lost_runs(uri, found, set(table["trial_id"]) if not table.empty else set())
    path = results_mod.write_parquet(table, p.search_dir / "trials.parquet")
    tracking.log_artifacts(uri, parent, [path])
    command = record_search(uri, parent, table, load_study(p), p.args.preset, p.args.overrides)
    done = table[table["status"] == "completed"] if not table.empty else table
    if not done.empty:
        best = done.iloc[0]
        tracking.log_metrics(uri, parent, {f"best_{k}": best[k] for k in ("fid", "fid_tail", "recall", "proxy_fid")
                                           if best[k] is not None}, 0)
    tracking.finish_run(uri, parent, "FINISHED")
    print("\n" + results_mod.format_table(table))
    print(f"\ntrials table: {path}")
    if command:
        print(f"train the best trial's configuration again: {command}")
    print(f"open the MLflow UI: {tracking.ui_command(uri, experiment_id)}")
    print(confirm_hint(p.search_dir, len(done)))
    return table


def report_budget(p: SearchPlan, parent: str, table: Any) -> None:
    """Print and tag (``pdcbdm.time_budget``) what the time budget cut, when it cut anything."""
    line = budget_mod.summary(p.search_dir, table, p.trials)
    if line:
        print(line, flush=True)
        tracking.set_tags(p.uri, parent, {TIME_BUDGET_TAG: line})


def confirm_hint(search_dir: Path, completed: int) -> str:
    """The closing line: the command that re-trains the top trials over new seeds (``pipelines.confirm``), or,
    with fewer than two completed trials, why there is none (confirm compares rank 1 with rank 2)."""
    if completed < 2:
        return (f"no confirm command: {completed} completed trial(s), and confirming a winner needs 2 (ASHA stopped "
                f"the others; run more --trials, or --no-asha)")
    return (f"confirm the winner over new seeds: python -m pipelines.confirm --search {shlex.quote(str(search_dir))} "
            f"--top {min(3, completed)} --seeds 3")


def reconcile_records(p: SearchPlan, table: Any, run_status: dict[str, str]) -> None:
    """Every trial ends in the same state in Tune (the table), Optuna and MLflow, also after a resume whose
    driver died between a trial's end and the bookkeeping of it: an Optuna trial still RUNNING is told its end,
    an MLflow run not yet ended is set FINISHED (completed or stopped) or FAILED."""
    study = load_study(p)
    multi = len(study.directions) > 1
    outcomes = {}
    for row in table.itertuples():
        fid, tail = finite(getattr(row, "fid", None)), finite(getattr(row, "fid_tail", None))
        values = None if fid is None else ([fid, fid if tail is None else tail] if multi else [fid])
        outcomes[row.trial_id] = (row.status, values)
        run_id = row.mlflow_run_id
        fill_lost_metrics(p.uri, row)
        if run_id and run_status.get(run_id) in ("RUNNING", "SCHEDULED", "KILLED"):
            error = row.error if row.status == "failed" and isinstance(row.error, str) else None
            tracking.finish_run(p.uri, run_id, "FAILED" if row.status == "failed" else "FINISHED", error,
                                row_outcome(row))
    reconcile(study, outcomes)


def fill_lost_metrics(uri: str, row: Any) -> None:
    """The metrics Tune holds for the trial's last step (its proxy FID when stopped, its scores when completed),
    logged to its run where the run has none at that step: a trial stopped by ASHA or the budget while its
    records waited out a tracking outage, or killed with them, never sent them."""
    step = finite(getattr(row, "step", None))
    if not row.mlflow_run_id or step is None or row.status == "failed":
        return
    keys = ("proxy_fid", "proxy_fid_tail") if row.status == "stopped" else results_mod.SCORE_COLUMNS
    values = {k: finite(getattr(row, k, None)) for k in keys}
    try:
        tracking.log_missing(uri, row.mlflow_run_id, {k: v for k, v in values.items() if v is not None}, int(step))
    except Exception as err:  # noqa: BLE001 - a repair: the table and Optuna hold the values regardless
        print(f"could not add trial {row.trial_id}'s last metrics to its MLflow run "
              f"({type(err).__name__}: {redact_text(str(err))[:200]})", file=sys.stderr)


def close_lost_runs(uri: str, runs: Sequence[Any], trial_ids: set[str]) -> list[str]:
    """Mark KILLED the search's runs still RUNNING whose trial Tune does not hold: a trial started in the last
    seconds before the driver was killed has its MLflow run, but Tune's saved state never had it and a resume
    never runs it. Returns their run ids."""
    lost = [r.info.run_id for r in runs if r.info.status in ("RUNNING", "SCHEDULED")
            and r.data.tags.get(TRIAL_TAG) not in trial_ids]
    for run_id in lost:
        tracking.finish_run(uri, run_id, "KILLED", None, "lost: started just before the driver was killed, never "
                                                         "run by Tune")
    return lost


def row_outcome(row: Any) -> str:
    """The run's outcome tag (``tune.tags.OUTCOME_TAG``) from its trials-table row."""
    if row.status == "failed":
        return failure_outcome(row.error if isinstance(row.error, str) else None)
    if row.status == "stopped":
        step = finite(getattr(row, "step", None))
        what = ("stopped by the time budget" if getattr(row, "stopped_by", None) == "time budget"
                else "early-stopped by ASHA")
        return f"{what} at step {int(step)}" if step is not None else what
    return "completed"
