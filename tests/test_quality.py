"""pipelines/quality.py: sampler specs, time-to-quality, and one tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from pipelines.quality import first_reaching, main, parse_sampler


def test_sampler_specs_parse_and_bad_ones_name_the_form():
    assert parse_sampler("ddim:20:1") == {"name": "ddim20-eta1", "sampler": "ddim", "steps": 20, "eta": 1.0}
    assert parse_sampler("ddpm:1000")["sampler"] == "ddpm"
    for bad in ("ddim:20", "dpm:10", "ddim:x:1"):
        with pytest.raises(ValueError, match="ddim:STEPS:ETA"):
            parse_sampler(bad)


def test_first_reaching_finds_the_first_row_meeting_each_target():
    rows = [{"step": 100, "train_seconds": 10.0, "consistency_head": 0.5, "fid": 90.0, "fid_floor": 10.0},
            {"step": 200, "train_seconds": 20.0, "consistency_head": 0.92, "fid": 40.0, "fid_floor": 10.0},
            {"step": 300, "train_seconds": 30.0, "consistency_head": 0.95, "fid": 29.0, "fid_floor": 10.0}]
    hit = first_reaching(rows, consistency=0.9, fid_factor=3.0)
    assert hit["head_consistency"] == {"step": 200, "train_seconds": 20.0, "train_cpu_seconds": None}
    assert hit["fid"] == {"step": 300, "train_seconds": 30.0, "train_cpu_seconds": None}
    assert hit["head_consistency_held"]["step"] == 200 and hit["fid_held"]["step"] == 300
    none = {"head_consistency": None, "fid": None, "head_consistency_held": None, "fid_held": None}
    assert first_reaching(rows[:1], consistency=0.9, fid_factor=3.0) == none
    # a noisy curve: FID meets 3x its floor at 200, misses it at 300, meets it again at 400
    swing = rows + [{"step": 400, "train_seconds": 40.0, "consistency_head": 0.97, "fid": 25.0, "fid_floor": 10.0}]
    swing[2] = {**swing[2], "fid": 31.0}
    swing[1] = {**swing[1], "fid": 29.0}
    hit = first_reaching(swing, consistency=0.9, fid_factor=3.0)
    assert hit["fid"]["step"] == 200 and hit["fid_held"]["step"] == 400
    assert first_reaching(swing[:3], consistency=0.9, fid_factor=3.0)["fid_held"] is None


def test_tiny_quality_run_writes_curves_tables_and_grids(tmp_path, capsys):
    code = main(["--preset", "smoke", "--variants", "ddpm", "--steps", "6", "--every", "3", "--samples", "20",
                 "--samplers", "ddim:3:1,ddim:3:0", "--also-guidance", "0", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "quality.json").read_text())
    assert [r["step"] for r in report["curves"]["ddpm"]] == [3, 6]
    curve = report["curves"]["ddpm"]
    assert 0 < curve[0]["train_cpu_seconds"] < curve[1]["train_cpu_seconds"]  # training CPU time, cumulative
    assert {(r["sampler"], r["guidance"]) for r in report["samplers"]} == {("ddim3-eta1", 1.0), ("ddim3-eta0", 1.0),
                                                                          ("ddim3-eta1", 0.0)}
    assert all(r["fid_floor"] and r["seconds_per_sample"] > 0 for r in report["samplers"])
    assert (tmp_path / "curves_ddpm.png").stat().st_size > 0
    assert (tmp_path / "samples_ddpm_ddim3-eta0_w1.png").is_file()
    assert "| ddpm | ddim3-eta1 | 0 |" in capsys.readouterr().out
    assert main(["--variants", "nope", "--out", str(tmp_path)]) == 2
