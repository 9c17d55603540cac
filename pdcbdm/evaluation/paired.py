"""Paired comparison of ablation variants against a baseline over seeds, beside each metric's noise floor.

Runs of one ablation share their seed across variants (the same initialisation, batches and sampling noise where
the variants draw alike), so the differences variant - baseline per seed remove the seed's common part; a paired
t-test asks whether their mean differs from zero. Beside it stands the noise floor's spread (``<metric>_floor_std``,
real-vs-real at the same sample count): a mean difference smaller than that spread is no difference even with a
small p-value, and a large p-value with few seeds says "not shown", not "equal".
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

# (metric key, caption, True when higher is better): the tail metrics the paper's claim is about
TAIL_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("fid_tail", "tail FID", False), ("kid_tail", "tail KID", False),
    ("consistency_tail", "tail consistency", True), ("tail_to_head_confusion", "tail->head confusion", False),
)
COLUMNS = ("variant", "metric", "n", "baseline_mean", "variant_mean", "diff_mean", "diff_std", "t", "p_value",
           "floor_std", "verdict")


def paired_t(diffs: np.ndarray) -> tuple[float, float]:
    """Two-sided paired t-test of mean(diffs) = 0: (t, p); NaN for fewer than 2 pairs or no spread."""
    if len(diffs) < 2 or float(np.std(diffs, ddof=1)) == 0.0:
        return math.nan, math.nan
    res = stats.ttest_1samp(diffs, 0.0)
    return float(res.statistic), float(res.pvalue)


def verdict(diff: float, p: float, floor_std: float, higher_is_better: bool, alpha: float = 0.05) -> str:
    """"better" / "worse" when the paired test rejects at ``alpha`` and the mean difference exceeds the floor's
    spread; otherwise "within noise" (p >= alpha, or the difference is smaller than the floor's spread)."""
    if math.isnan(diff) or math.isnan(p) or p >= alpha:
        return "within noise"
    if not math.isnan(floor_std) and abs(diff) <= floor_std:
        return "within noise"
    return "better" if (diff > 0) == higher_is_better else "worse"


def _by_seed(df: pd.DataFrame, variant: str, key: str) -> pd.Series:
    done = df[(df["variant"] == variant) & (df["status"] == "finished")]
    if key not in done:
        return pd.Series(dtype=float)
    return pd.to_numeric(done.set_index("seed")[key], errors="coerce").dropna()


def _floor_std(df: pd.DataFrame, key: str) -> float:
    col = f"{key}_floor_std"
    if col not in df:
        return math.nan
    values = pd.to_numeric(df[col], errors="coerce").dropna()
    return float(values.mean()) if len(values) else math.nan


def compare_to_baseline(df: pd.DataFrame, baseline: str = "cbdm",
                        metrics: Sequence[tuple[str, str, bool]] = TAIL_METRICS) -> pd.DataFrame:
    """One row per (variant other than ``baseline``, metric): the seeds both finished (n), their means, the mean
    and standard deviation of the per-seed differences (variant - baseline), the paired t-test, the metric's
    floor spread and the verdict. Empty when the baseline is missing."""
    rows: list[dict[str, Any]] = []
    variants = [v for v in dict.fromkeys(df["variant"]) if v != baseline]
    for key, caption, higher in metrics:
        base = _by_seed(df, baseline, key)
        if base.empty:
            continue
        floor = _floor_std(df, key)
        for name in variants:
            other = _by_seed(df, name, key)
            seeds = sorted(set(base.index) & set(other.index))
            diffs = np.array([other[s] - base[s] for s in seeds], dtype=float)
            t, p = paired_t(diffs)
            mean = float(diffs.mean()) if len(diffs) else math.nan
            sd = float(diffs.std(ddof=1)) if len(diffs) > 1 else math.nan
            rows.append({"variant": name, "metric": caption, "n": len(seeds),
                         "baseline_mean": float(base[seeds].mean()) if seeds else math.nan,
                         "variant_mean": float(other[seeds].mean()) if seeds else math.nan,
                         "diff_mean": mean, "diff_std": sd, "t": t, "p_value": p, "floor_std": floor,
                         "verdict": verdict(mean, p, floor, higher)})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def format_comparison(table: pd.DataFrame, baseline: str = "cbdm") -> str:
    """The printed table: per variant and metric, "diff ± sd (p, n)" beside the floor's spread and the verdict."""
    if table.empty:
        return f"(no paired comparison: baseline {baseline!r} has no finished runs)"

    def num(x: float, fmt: str = ".3g") -> str:
        return "n/a" if math.isnan(x) else format(x, fmt)

    view = pd.DataFrame({
        "variant": table["variant"], "metric": table["metric"], "seeds": table["n"],
        f"{baseline}": [num(x) for x in table["baseline_mean"]], "variant mean": [num(x) for x in table["variant_mean"]],
        "diff ± sd": [f"{num(m)} ± {num(s, '.2g')}" for m, s in zip(table["diff_mean"], table["diff_std"])],
        "paired t p": [num(p, ".2g") for p in table["p_value"]], "floor sd": [num(f, ".2g") for f in table["floor_std"]],
        "verdict": table["verdict"],
    })
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        return view.to_string(index=False)
