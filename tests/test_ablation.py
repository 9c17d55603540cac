"""pipelines/ablation.py: variant configs, the summary table and chart, option errors, and one tiny end-to-end run
on the search's runner (smoke preset, CBDM and PD-CBDM, 1 seed, 20 steps: the session's ``tiny_ablation``) checked
through its files and its MLflow runs, then run again (every run reused, no Ray) and resumed (Tune's state restored,
no run added)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pdcbdm.config import apply_overrides
from pdcbdm.presets import preset
from pipelines import ablation as ab
from tests.searchutil import artifact_paths

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- variants ---------------------------------------------------------------------------------------------------------
def test_parse_variants_orders_as_table_1_and_accepts_plus_names():
    assert ab.parse_variants("pd-cbdm,+pd,cbdm,+pd") == ["cbdm", "pd", "pd-cbdm"]
    assert ab.parse_variants(",".join(ab.VARIANTS)) == list(ab.VARIANTS)


@pytest.mark.parametrize("spec", ["cbdm,bogus", "", " , "])
def test_parse_variants_rejects_unknown_names(spec):
    with pytest.raises(ab.AblationError, match="--variants"):
        ab.parse_variants(spec)


@pytest.mark.parametrize("name, tau, pd, dist, tsa", [
    ("ddpm", 0.0, 0.0, "cbdm", ""),
    ("cbdm", 1.0, 0.0, "cbdm", ""),
    ("pd", 1.0, 0.05, "cbdm", ""),
    ("reweight", 1.0, 0.0, "inverted", ""),
    ("tsa", 1.0, 0.0, "cbdm", "8"),
    ("pd-cbdm", 1.0, 0.05, "inverted", "8"),
])
def test_variant_config_switches_exactly_its_components(name, tau, pd, dist, tsa):
    base = apply_overrides(preset("smoke"), ["loss.pd_weight=0.05", "model.tsa_resolutions=8", "train.seed=9"])
    cfg = ab.variant_config(base, name, seed=2)
    assert (cfg.loss.cbdm_tau, cfg.loss.pd_weight, cfg.loss.label_dist, cfg.model.tsa_resolutions) == (tau, pd, dist, tsa)
    assert cfg.train.seed == 2
    # everything else (budget, data, sampler, evaluation) is the base's
    for section in ("data", "diffusion", "sample", "eval"):
        assert getattr(cfg, section) == getattr(base, section)
    assert cfg.train.steps == base.train.steps and cfg.loss.split_ratio == base.loss.split_ratio


def test_variant_config_keeps_the_presets_tau_and_falls_back_to_one():
    base = apply_overrides(preset("smoke"), ["loss.cbdm_tau=0.5"])
    assert ab.variant_config(base, "cbdm", 0).loss.cbdm_tau == 0.5
    assert ab.variant_config(apply_overrides(base, ["loss.cbdm_tau=0"]), "cbdm", 0).loss.cbdm_tau == 1.0


def test_variant_config_refuses_a_component_the_preset_leaves_off():
    with pytest.raises(ab.AblationError, match="loss.pd_weight"):
        ab.variant_config(apply_overrides(preset("smoke"), ["loss.pd_weight=0"]), "pd", 0)
    with pytest.raises(ab.AblationError, match="model.tsa_resolutions"):
        ab.variant_config(apply_overrides(preset("smoke"), ["model.tsa_resolutions="]), "pd-cbdm", 0)
    # variants that do not need the component still work
    assert ab.variant_config(apply_overrides(preset("smoke"), ["loss.pd_weight=0"]), "tsa", 0).loss.pd_weight == 0


# -- tables and chart -------------------------------------------------------------------------------------------------
def _rows() -> pd.DataFrame:
    rows = []
    for variant, fids in (("cbdm", [10.0, 12.0, 14.0]), ("pd-cbdm", [8.0, 9.0, 10.0])):
        for seed, fid in enumerate(fids):
            rows.append({"variant": variant, "seed": seed, "status": "finished", "fid": fid, "recall": 0.5,
                         "f8": 0.9, "fid_tail": fid * 2, "tail_to_head_confusion": 0.1, "consistency_tail": 0.8,
                         "fid_floor": 4.0, "fid_floor_std": 0.5})
    rows.append({"variant": "pd-cbdm", "seed": 3, "status": "failed", "fid": math.nan, "recall": math.nan,
                 "f8": math.nan, "fid_tail": math.nan, "tail_to_head_confusion": math.nan,
                 "consistency_tail": math.nan})
    rows.append({"variant": "ddpm", "seed": 0, "status": "finished", "fid": 20.0, "recall": 0.4, "f8": 0.8,
                 "fid_tail": None, "tail_to_head_confusion": 0.3, "consistency_tail": 0.5})
    return pd.DataFrame(rows)


def test_summarise_means_and_sample_std_over_finished_seeds():
    s = ab.summarise(_rows()).set_index("variant")
    assert list(s.index) == ["ddpm", "cbdm", "pd-cbdm"]  # Table 1's order, not the input's
    assert s.loc["cbdm", "fid_mean"] == pytest.approx(12.0) and s.loc["cbdm", "fid_std"] == pytest.approx(2.0)
    assert s.loc["pd-cbdm", "n"] == 3  # the failed seed is left out
    assert s.loc["pd-cbdm", "fid_mean"] == pytest.approx(9.0) and s.loc["pd-cbdm", "fid_std"] == pytest.approx(1.0)
    assert s.loc["pd-cbdm", "fid_tail_mean"] == pytest.approx(18.0)
    assert math.isnan(s.loc["ddpm", "fid_std"])  # one seed: no spread
    assert math.isnan(s.loc["ddpm", "fid_tail_mean"])  # missing metric stays missing
    assert s.loc["cbdm", "fid_floor"] == 4.0 and s.loc["cbdm", "fid_floor_std"] == 0.5  # the real-vs-real floor
    assert math.isnan(s.loc["cbdm", "recall_floor"])  # rows without a floor: none is invented


def test_format_summary_prints_mean_and_spread():
    text = ab.format_summary(ab.summarise(_rows()))
    assert "12 ± 2" in text and "PD-CBDM (all three)" in text and "n/a" in text
    assert ab.format_summary(pd.DataFrame()) == "(no runs)"


def test_plot_summary_writes_a_png_atomically(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "chart.png"
    fig = ab.plot_summary(ab.summarise(_rows()), path, title="t")
    fid_panel, recall_panel = fig.axes[0], fig.axes[1]
    assert [line.get_ydata()[0] for line in fid_panel.get_lines() if line.get_linestyle() == "--"] == [4.0]
    assert not [line for line in recall_panel.get_lines() if line.get_linestyle() == "--"]
    plt.close(fig)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]  # no temporary file left behind


def test_base_config_scores_the_fixed_w_and_with_grid_the_whole_grid():
    args = ab.build_parser().parse_args(["--preset", "smoke", "--steps", "7", "--set", "eval.proxy_guidance=1.5"])
    cfg = ab.base_config(args)
    assert cfg.eval.guidance_grid == "1.5" and cfg.train.steps == 7
    args = ab.build_parser().parse_args(["--preset", "smoke", "--grid", "--set", "eval.proxy_guidance=1.5"])
    assert ab.base_config(args).eval.guidance_grid == "0,1,1.5"  # the preset's grid 0,1 and the fixed w


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds"),
    (["--resume", "/"], "no ablation.json"),
    (["--steps", "0"], "--steps"),
    (["--variants", "cbdm,nope"], "nope"),
    (["--set", "loss.pd_weight=0", "--variants", "pd"], "loss.pd_weight"),
    (["--set", "train.lr=-1"], "train.lr"),
    (["--tracking-uri", "sqlite:////no/such/folder/mlflow.db"], "/no/such/folder"),
])
def test_bad_options_exit_2_naming_the_problem(tmp_path, capsys, argv, message):
    assert ab.main(["--preset", "smoke", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "ablation.parquet").exists()


# -- end to end ------------------------------------------------------------------------------------------------------
def _client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{out / 'mlflow.db'}")


def _runs(out: Path, kind: str | None = None):
    client = _client(out)
    exp = client.get_experiment_by_name("pdcbdm-ablation")
    query = f"tags.`pdcbdm.kind` = '{kind}'" if kind else ""
    return client.search_runs([exp.experiment_id], filter_string=query)


def _ablation(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(out.parent / "cache")}
    cmd = [sys.executable, "-m", "pipelines.ablation", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_tiny_ablation_writes_tables_chart_and_runs(tiny_ablation):
    out, proc = tiny_ablation
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cbdm-s0" in proc.stdout and "pd-cbdm-s0" in proc.stdout and "finished" in proc.stdout
    rows = pd.read_parquet(out / "ablation.parquet")
    assert sorted(rows["variant"]) == ["cbdm", "pd-cbdm"] and set(rows["seed"]) == {0}
    assert (rows["status"] == "finished").all() and rows["fid"].map(math.isfinite).all()
    assert (rows["seconds"] > 0).all() and (rows["guidance"] == 1.0).all()
    # the table is at the fixed w: without --grid the runs' sweep is that w alone, so their best w is it too
    assert (rows["best_guidance"] == 1.0).all() and rows["fid"].tolist() == rows["fid_w1"].tolist()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["variant"]) == ["cbdm", "pd-cbdm"] and (summary["n"] == 1).all()
    assert {f"{k}_{s}" for k, _, _ in ab.SUMMARY_METRICS for s in ("mean", "std")} <= set(summary.columns)
    by_variant = rows.set_index("variant")["fid"]
    assert summary["fid_mean"].tolist() == pytest.approx([by_variant[v] for v in summary["variant"]])
    assert (out / "ablation.png").read_bytes()[:8] == PNG_MAGIC
    # one seed: the paired comparison has its rows (pd-cbdm against cbdm on each tail metric) but no test
    paired = pd.read_csv(out / "paired.csv")
    assert set(paired["variant"]) == {"pd-cbdm"} and "tail FID" in set(paired["metric"])
    assert (paired["n"] == 1).all() and paired["p_value"].isna().all()
    assert (paired["verdict"] == "within noise").all() and "paired t-test" in proc.stdout
    assert {"fid_tail_floor_std", "kid_tail", "reject_rate"} <= set(rows.columns)
    meta = json.loads((out / "ablation.json").read_text())
    assert meta["name"].startswith("ablation-smoke-") and meta["parent_run_id"]
    assert meta["config"]["train"]["steps"] == 20


@pytest.mark.slow
def test_tiny_ablation_mlflow_parent_with_finished_children(tiny_ablation):
    out, proc = tiny_ablation
    assert proc.returncode == 0, proc.stderr[-3000:]
    parents = _runs(out, "ablation")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    rows = pd.read_parquet(out / "ablation.parquet").set_index("variant")
    assert parent.data.metrics["cbdm.fid_mean"] == pytest.approx(rows.loc["cbdm", "fid"])
    children = _runs(out, "trial")  # the search's trial runs, one per variant x seed
    assert {c.info.run_name for c in children} == {"cbdm-s0", "pd-cbdm-s0"} and len(children) == 2
    assert {c.info.run_id for c in children} == set(rows["mlflow_run_id"])
    client = _client(out)
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["pdcbdm.outcome"] == "completed"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert len(child.data.tags["pdcbdm.config_key"]) == 16
        assert math.isfinite(child.data.metrics["fid"]) and "recall" in child.data.metrics
        assert child.data.params["train.steps"] == "20" and child.data.params["train.seed"] == "0"
        assert len(client.get_metric_history(child.info.run_id, "loss")) >= 2  # the loss history, per log_every
        assert "evaluation/per_class.parquet" in artifact_paths(f"sqlite:///{out / 'mlflow.db'}", child.info.run_id)
    pd_run = next(c for c in children if c.info.run_name == "pd-cbdm-s0")
    assert float(pd_run.data.params["loss.pd_weight"]) > 0 and pd_run.data.params["loss.label_dist"] == "inverted"
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation.parquet", "summary.csv", "paired.csv", "ablation.png", "ablation.json"} <= parent_files


@pytest.mark.slow
def test_rerun_reuses_finished_runs_and_resume_restores_without_new_runs(tiny_ablation):
    out, proc = tiny_ablation
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = {r.info.run_id for r in _runs(out)}
    first = pd.read_parquet(out / "ablation.parquet").set_index("variant")
    # the same command again: both runs reused from MLflow, nothing trained (no Ray), the same parent run
    rerun = _ablation(out, "--preset", "smoke", "--seeds", "1", "--variants", "cbdm,pd-cbdm", "--steps", "20",
                      "--out", str(out))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "2 reused, 0 to train" in rerun.stdout and "started: cell=" not in rerun.stdout
    second = pd.read_parquet(out / "ablation.parquet").set_index("variant")
    assert second["reused"].all() and second.loc["cbdm", "fid"] == first.loc["cbdm", "fid"]
    assert list(second["mlflow_run_id"]) == list(first["mlflow_run_id"])
    # --resume without reuse: Tune's state restored (every trial already ended), the same runs found again
    resumed = _ablation(out, "--resume", str(out), "--no-reuse")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "0 reused, 2 to train" in resumed.stdout and "started: cell=" not in resumed.stdout
    third = pd.read_parquet(out / "ablation.parquet").set_index("variant")
    assert list(third["mlflow_run_id"]) == list(first["mlflow_run_id"]) and (third["status"] == "finished").all()
    assert {r.info.run_id for r in _runs(out)} == before  # no parent, no child run added
    assert all(r.info.status == "FINISHED" for r in _runs(out))
