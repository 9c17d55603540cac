"""The ranked table printed at a search's end (tune/results.py): the noise floor under it (or beside FID when the
trials' floors differ) and the sentence on rank 1's lead: within the floor's spread, within the seeds' spread,
or beyond the floor with one seed per trial, each pointing to pipelines.confirm."""

from __future__ import annotations

import pandas as pd

from tune.results import format_table, rank


def _notes(text: str, trials: int) -> str:
    """The lines under a table of ``trials`` rows as one text (they are wrapped for a terminal)."""
    return " ".join(" ".join(text.splitlines()[1 + trials:]).split())


def _table(fids: list[float | None], floor: float | list[float] = 11.9, floor_std: float | None = 1.6,
           status: list[str] | None = None) -> pd.DataFrame:
    """A ranked trials table as trials.parquet holds it: one row per trial, its FID and the FID's floor."""
    floors = floor if isinstance(floor, list) else [floor] * len(fids)
    rows = [{"trial_id": f"t{i}", "status": (status or ["completed"] * len(fids))[i], "loss.pd_weight": 0.1 * i,
             "fid": fid, "proxy_fid": 40.0 + i, "fid_floor": floors[i], "fid_floor_std": floor_std,
             "fid_tail": None if fid is None else 2 * fid, "fid_tail_floor": 30.2, "fid_tail_floor_std": 4.1}
            for i, fid in enumerate(fids)]
    return rank(pd.DataFrame(rows))


def test_the_issues_case_is_within_the_floor_and_points_to_confirm():
    text = format_table(_table([25.3, 22.7, 31.0]))
    lines, notes = text.splitlines(), _notes(text, 3)
    assert lines[1].split()[:2] == ["1", "t1"]  # rank 1 is the lowest FID
    assert "fid_floor" not in lines[0]  # one floor for all: the line under the table says it
    assert all(len(line) <= 120 for line in lines[4:])
    assert notes.startswith("noise floor (real images against the reference at the same sample count, mean ± sd "
                            "over its draws): FID 11.9 ± 1.6, tail FID 30.2 ± 4.1")
    assert ("rank 1's FID 22.7 against rank 2's 25.3 (a lead of 2.6) is within FID's own noise: two draws of real "
            "images at this sample count differ by less than 4.5 19 times in 20 (floor ± 1.6); this table cannot "
            "tell the two apart.") in notes
    assert notes.endswith("Re-train them over new seeds and test the lead with python -m pipelines.confirm")


def test_a_lead_beyond_the_floor_with_one_seed_per_trial_says_so():
    notes = _notes(format_table(_table([22.7, 35.0], floor_std=1.6)), 2)
    assert "(a lead of 12) is beyond the floor's spread (± 1.6), but each trial is one training run with one " \
           "seed, and one seed per trial cannot separate them from seed noise." in notes
    assert notes.endswith("python -m pipelines.confirm")


def test_a_known_seed_spread_is_used():
    within = _notes(format_table(_table([22.7, 30.0]), seed_sd=5.0), 2)
    assert "is within the seeds' spread: two training seeds differ by less than 14 19 times in 20 (± 5)" in within
    beyond = _notes(format_table(_table([22.7, 45.0]), seed_sd=5.0), 2)
    assert "beyond the floor's spread (± 1.6) and beyond the seeds' spread (± 5)" in beyond


def test_floors_that_differ_are_a_column_beside_fid():
    text = format_table(_table([22.7, 25.3], floor=[11.9, 9.4]))
    header = text.splitlines()[0].split()
    assert header[header.index("fid") + 1] == "fid_floor"
    assert "FID 9.4 to 11.9 (by trial)" in _notes(text, 2)


def test_no_floor_and_fewer_than_two_completed_trials():
    text = _notes(format_table(_table([22.7, None, None], floor_std=None, status=["completed", "stopped",
                                                                                  "failed"])), 3)
    assert "rank 1's FID" not in text  # nothing to compare rank 1 with
    assert "FID 11.9," in text and "FID 11.9 ±" not in text  # a floor without its spread
    bare = _table([22.7, 25.3]).drop(columns=["fid_floor", "fid_floor_std", "fid_tail_floor", "fid_tail_floor_std"])
    notes = _notes(format_table(bare), 2)
    assert notes.startswith("rank 1's FID") and "not compared with a noise floor (none recorded)" in notes
    assert format_table(pd.DataFrame()) == "(no trials)"
