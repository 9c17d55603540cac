"""The search's results: one row per trial (params, metrics, status), ranked, printed and saved as Parquet."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from pdcbdm.io import atomic_write

from tune.budget import STOPPED_KEY

METRIC_COLUMNS = ("fid", "is_mean", "precision", "recall", "f8", "f1_8", "fid_head", "fid_tail",
                  "consistency_mean", "consistency_tail", "tail_to_head_confusion", "noise_error", "best_guidance",
                  "proxy_fid", "proxy_fid_tail", "step", "fid_floor", "fid_floor_std", "fid_tail_floor",
                  "fid_tail_floor_std", "reject_rate")
# a completed trial's final scores (the columns its run logs at the last step)
SCORE_COLUMNS = ("fid", "is_mean", "precision", "recall", "f8", "f1_8", "fid_head", "fid_tail", "noise_error")
# the metrics printed with their real-vs-real noise floor (``<key>_floor``, ``<key>_floor_std``) under the table
FLOOR_METRICS = (("fid", "FID"), ("fid_tail", "tail FID"))
# Two independent draws of one FID differ with a standard deviation of sqrt(2) times the FID's own: a lead under
# twice that (about 95% of such differences) is within the noise.
LEAD_BAND = 2.0 * math.sqrt(2.0)
CONFIRM = "python -m pipelines.confirm"
NOTE_WIDTH = 120  # the lines under the table, wrapped for a terminal


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
    key = df.apply(lambda r: (order[r["status"]],
                              _num(r["fid"]) if r["status"] == "completed" else _num(r["proxy_fid"])), axis=1)
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


def format_table(df: pd.DataFrame, seed_sd: float | None = None) -> str:
    """The ranked table printed at the end of a search (short column names), then the noise floor of FID and tail
    FID (``floor_line``) and whether rank 1's lead is beyond it (``lead_note``; ``seed_sd``: FID's standard
    deviation over training seeds, where known). Completed trials scored at different sample counts have
    different floors: then each one's FID floor is a column beside FID."""
    if df.empty:
        return "(no trials)"
    knobs = knob_columns(df)
    short = {k: k.split(".")[-1] for k in knobs}
    beside = [] if _uniform_floor(df, "fid") else ["fid_floor"]
    cols = ["rank", "trial_id", "status", "stopped_by", *knobs, "fid", *beside, "is_mean", "recall",
            "fid_head", "fid_tail", "tail_to_head_confusion", "best_guidance", "proxy_fid"]
    shown = [c for c in cols if c in df and not (c == "stopped_by" and df[c].isna().all())]
    view = df[shown].rename(columns={**short, "tail_to_head_confusion": "t2h_conf", "best_guidance": "best_w",
                                     "is_mean": "IS"})
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3g}".format):
        table = view.to_string(index=False)
    notes = [textwrap.fill(n, NOTE_WIDTH) for n in (floor_line(df), lead_note(df, seed_sd)) if n]
    return "\n".join([table, *notes])


def completed(df: pd.DataFrame) -> pd.DataFrame:
    """The completed trials with a final FID, in rank order."""
    if df.empty or "status" not in df or "fid" not in df:
        return df.iloc[0:0]
    return df[(df["status"] == "completed") & df["fid"].map(lambda v: math.isfinite(_num(v)))]


def _floors(df: pd.DataFrame, key: str) -> list[tuple[float, float | None]]:
    """(floor, its standard deviation) of ``key`` for each completed trial that recorded a floor."""
    out = []
    for _, row in completed(df).iterrows():
        floor, sd = _num(row.get(f"{key}_floor")), _num(row.get(f"{key}_floor_std"))
        if math.isfinite(floor):
            out.append((floor, sd if math.isfinite(sd) else None))
    return out


def _uniform_floor(df: pd.DataFrame, key: str) -> bool:
    """Whether every completed trial has the same ``key`` floor (or none has one): one line under the table says
    it. The floor is cached per sample counts, so trials scored alike share it exactly."""
    return len({round(f, 9) for f, _ in _floors(df, key)}) <= 1


def floor_line(df: pd.DataFrame) -> str | None:
    """The real-vs-real noise floor of FID and tail FID (real images outside the reference scored against it at
    the completed trials' sample counts: mean ± standard deviation over the draws), or None when no completed
    trial recorded one. A range where the trials' floors differ (then each is a column beside FID)."""
    parts = []
    for key, caption in FLOOR_METRICS:
        floors = _floors(df, key)
        if not floors:
            continue
        if _uniform_floor(df, key):
            floor, sd = floors[0]
            parts.append(f"{caption} {floor:.3g}" + (f" ± {sd:.2g}" if sd is not None else ""))
        else:
            low, high = min(f for f, _ in floors), max(f for f, _ in floors)
            parts.append(f"{caption} {low:.3g} to {high:.3g} (by trial)")
    if not parts:
        return None
    return (f"noise floor (real images against the reference at the same sample count, mean ± sd over its draws): "
            f"{', '.join(parts)}: a model at its floor is as close to the reference as real images are")


def lead_note(df: pd.DataFrame, seed_sd: float | None = None) -> str | None:
    """Whether rank 1's FID lead over rank 2 (completed trials) is beyond the noise, or None with fewer than two.

    The rule: a lead under ``LEAD_BAND`` times a standard deviation is within that noise: the FID floor's (the
    spread of FID between draws of real images at the same sample count; the larger of the two trials') or
    ``seed_sd`` (FID's spread over training seeds) when known. Unknown seed spread: each trial is one training
    run, and one seed per configuration cannot separate them. Either way the sentence points to pipelines.confirm,
    which re-trains the top configurations over new seeds and tests the lead."""
    done = completed(df)
    if len(done) < 2:
        return None
    first, second = _num(done.iloc[0]["fid"]), _num(done.iloc[1]["fid"])
    lead = second - first
    floor_sds = [sd for sd in (_num(done.iloc[i].get("fid_floor_std")) for i in (0, 1)) if math.isfinite(sd)]
    floor_sd = max(floor_sds) if floor_sds else None
    head = f"rank 1's FID {first:.3g} against rank 2's {second:.3g} (a lead of {lead:.2g})"
    confirm = f"Re-train them over new seeds and test the lead with {CONFIRM}"
    if floor_sd is not None and lead < LEAD_BAND * floor_sd:
        return (f"{head} is within FID's own noise: two draws of real images at this sample count differ by less "
                f"than {LEAD_BAND * floor_sd:.2g} 19 times in 20 (floor ± {floor_sd:.2g}); this table cannot tell "
                f"the two apart. {confirm}")
    if seed_sd is not None and math.isfinite(seed_sd) and lead < LEAD_BAND * seed_sd:
        return (f"{head} is within the seeds' spread: two training seeds differ by less than "
                f"{LEAD_BAND * seed_sd:.2g} 19 times in 20 (± {seed_sd:.2g}); this table cannot tell the two apart. "
                f"{confirm}")
    floor = (f"beyond the floor's spread (± {floor_sd:.2g})" if floor_sd is not None
             else "not compared with a noise floor (none recorded)")
    if seed_sd is None or not math.isfinite(seed_sd):
        return (f"{head} is {floor}, but each trial is one training run with one seed, and one seed per trial "
                f"cannot separate them from seed noise. {confirm}")
    return f"{head} is {floor} and beyond the seeds' spread (± {seed_sd:.2g}); {CONFIRM} tests it over new seeds"


def knob_columns(df: pd.DataFrame) -> list[str]:
    """The table's searched knobs: its config-field columns (SECTION.FIELD)."""
    return [c for c in df.columns if "." in c]


# -- a trial's end in words (the outcome tag of its MLflow run) ----------------------------------------------------
def completion_outcome(step: int, max_steps: int | None, by_budget: bool = False) -> str:
    """The outcome tag of a trial Tune ended without error: it ran its budget, or the scheduler (or the search's
    time budget) stopped it."""
    if max_steps is None or step >= max_steps:
        return "completed"
    return f"stopped by the time budget at step {step}" if by_budget else f"early-stopped by ASHA at step {step}"


def failure_outcome(error: str | None) -> str:
    """The outcome tag of a failed trial: "failed: " and the error's last line (its type and message)."""
    lines = (error or "").strip().splitlines()
    return f"failed: {lines[-1].strip() if lines else 'unknown error'}"[:500]


def finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, NaN or infinite."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
