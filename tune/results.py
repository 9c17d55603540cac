"""The search's results: one row per trial (params, metrics, status), ranked, printed and saved as Parquet."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from pdcbdm.io import atomic_write

from tune.budget import STOPPED_KEY

METRIC_COLUMNS = ("fid", "is_mean", "precision", "recall", "f8", "f1_8", "fid_head", "fid_tail",
                  "consistency_mean", "consistency_tail", "tail_to_head_confusion", "noise_error", "best_guidance", "proxy_fid",
                  "proxy_fid_tail", "step", "fid_floor", "fid_tail_floor", "reject_rate")
# a completed trial's final scores (the columns its run logs at the last step)
SCORE_COLUMNS = ("fid", "is_mean", "precision", "recall", "f8", "f1_8", "fid_head", "fid_tail", "noise_error")


def trial_rows(results: Iterable[Any], max_steps: int, run_ids: dict[str, str] | None = None) -> pd.DataFrame:
    """A DataFrame of trials from a Tune ResultGrid: status is completed, stopped (early: ``stopped_by`` says by
    ASHA or by the time budget) or failed; one column per searched knob (the config fields a trial's config
    holds)."""
    rows = []
    for res in results:
        metrics = dict(res.metrics or {})
        trial_id = str(metrics.get("trial_id", ""))
        status = "failed" if res.error else ("completed" if metrics.get("step", 0) >= max_steps else "stopped")
        row: dict[str, Any] = {"trial_id": trial_id, "status": status}
        row.update({k: v for k, v in (res.config or {}).items() if "." in k})
        row.update({k: metrics.get(k) for k in METRIC_COLUMNS})
        row["stopped_by"] = None if status != "stopped" else "time budget" if metrics.get(STOPPED_KEY) else "ASHA"
        row["error"] = str(res.error).strip().splitlines()[-1][:300] if res.error else None
        row["mlflow_run_id"] = (run_ids or {}).get(trial_id)
        rows.append(row)
    return rank(pd.DataFrame(rows))


def rank(df: pd.DataFrame) -> pd.DataFrame:
    """Completed trials by final FID, then stopped ones by proxy FID, then failed ones."""
    if df.empty:
        return df
    order = {"completed": 0, "stopped": 1, "failed": 2}
    key = df.apply(lambda r: (order[r["status"]], _num(r["fid"]) if r["status"] == "completed" else _num(r["proxy_fid"])), axis=1)
    df = df.assign(_k=key).sort_values("_k").drop(columns="_k").reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.inf
    return math.inf if math.isnan(f) else f


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    """Atomic Parquet write (a reader never sees half a table)."""
    return atomic_write(path, lambda f: df.to_parquet(f, index=False))


def format_table(df: pd.DataFrame) -> str:
    """The ranked table printed at the end of a search (short column names)."""
    if df.empty:
        return "(no trials)"
    knobs = knob_columns(df)
    short = {k: k.split(".")[-1] for k in knobs}
    cols = ["rank", "trial_id", "status", "stopped_by", *knobs, "fid", "is_mean", "recall",
            "fid_head", "fid_tail", "tail_to_head_confusion", "best_guidance", "proxy_fid"]
    shown = [c for c in cols if c in df and not (c == "stopped_by" and df[c].isna().all())]
    view = df[shown].rename(columns={**short, "tail_to_head_confusion": "t2h_conf", "best_guidance": "best_w",
                                     "is_mean": "IS"})
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3g}".format):
        return view.to_string(index=False)


def knob_columns(df: pd.DataFrame) -> list[str]:
    """The table's searched knobs: its config-field columns (SECTION.FIELD)."""
    return [c for c in df.columns if "." in c]
