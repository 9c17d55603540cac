"""The ablation's paired comparison against CBDM: differences per seed, the paired t-test, the floor's spread."""

import math

import numpy as np
import pandas as pd
import pytest

from pdcbdm.evaluation.paired import compare_to_baseline, format_comparison, paired_t, verdict


def _runs(base: list[float], shift: list[float], floor_std: float = 1.0) -> pd.DataFrame:
    rows = []
    for seed, (b, d) in enumerate(zip(base, shift)):
        for variant, value in (("cbdm", b), ("pd", b + d)):
            rows.append({"variant": variant, "seed": seed, "status": "finished", "fid_tail": value,
                         "fid_tail_floor_std": floor_std})
    return pd.DataFrame(rows)


def test_paired_t_matches_the_textbook_value():
    diffs = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    t, p = paired_t(diffs)
    assert t == pytest.approx(3.0 / (np.std(diffs, ddof=1) / math.sqrt(5)))
    assert 0.0 < p < 0.05
    assert all(math.isnan(v) for v in paired_t(np.array([1.0])))


def test_a_consistent_shift_is_found_even_when_seeds_vary_more_than_it():
    # the seeds spread by 40, the variant is 5 worse on every seed: unpaired spreads hide it, pairing does not
    table = compare_to_baseline(_runs([100, 140, 60, 120, 80], [5.0, 5.5, 4.5, 5.2, 4.8]))
    row = table[table["metric"] == "tail FID"].iloc[0]
    assert row["n"] == 5 and row["diff_mean"] == pytest.approx(5.0)
    assert row["p_value"] < 1e-4 and row["verdict"] == "worse"


def test_a_difference_inside_the_floor_spread_or_the_seed_noise_is_within_noise():
    small = compare_to_baseline(_runs([100, 140, 60, 120, 80], [0.5, 0.55, 0.45, 0.52, 0.48], floor_std=3.0))
    assert small.iloc[0]["verdict"] == "within noise"  # significant, but smaller than the real-vs-real spread
    noisy = compare_to_baseline(_runs([100, 140, 60, 120, 80], [10, -12, 8, -9, 4]))
    assert noisy.iloc[0]["p_value"] > 0.05 and noisy.iloc[0]["verdict"] == "within noise"
    assert verdict(-5.0, 0.001, 1.0, higher_is_better=True) == "worse"
    assert verdict(5.0, 0.001, 1.0, higher_is_better=True) == "better"


def test_only_seeds_both_variants_finished_are_paired():
    df = _runs([100, 140, 60], [5, 5, 5])
    df.loc[(df["variant"] == "pd") & (df["seed"] == 2), "status"] = "failed"
    row = compare_to_baseline(df).iloc[0]
    assert row["n"] == 2 and row["baseline_mean"] == pytest.approx(120.0)
    assert "pd" in format_comparison(compare_to_baseline(df))
    assert compare_to_baseline(df[df["variant"] != "cbdm"]).empty
