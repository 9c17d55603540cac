"""pipelines/ablation.py: variant configs, the summary table and chart, option errors, and one tiny end-to-end run
(smoke preset, CBDM and PD-CBDM, 1 seed, 20 steps) checked through its files and its MLflow runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pdcbdm.config import Config, apply_overrides, preset
from pipelines import ablation as ab

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
                         "f8": 0.9, "fid_tail": fid * 2, "tail_to_head_confusion": 0.1, "consistency_tail": 0.8})
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


def test_format_summary_prints_mean_and_spread():
    text = ab.format_summary(ab.summarise(_rows()))
    assert "12 ± 2" in text and "PD-CBDM (all three)" in text and "n/a" in text
    assert ab.format_summary(pd.DataFrame()) == "(no runs)"


def test_plot_summary_writes_a_png_atomically(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "chart.png"
    plt.close(ab.plot_summary(ab.summarise(_rows()), path, title="t"))
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]  # no temporary file left behind


def test_reusable_only_for_a_finished_result_of_the_same_config(tmp_path):
    cfg = ab.variant_config(preset("smoke"), "cbdm", 0).to_dict()
    spec = ab.RunSpec("cbdm", 0, cfg, str(tmp_path))
    assert ab.reusable(spec) is None
    (tmp_path / "result.json").write_text(json.dumps({"status": "finished", "config": cfg, "variant": "cbdm"}))
    assert ab.reusable(spec)["variant"] == "cbdm"
    other = ab.RunSpec("cbdm", 0, ab.variant_config(preset("smoke"), "cbdm", 1).to_dict(), str(tmp_path))
    assert ab.reusable(other) is None
    (tmp_path / "result.json").write_text(json.dumps({"status": "failed", "config": cfg}))
    assert ab.reusable(spec) is None


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds"),
    (["--jobs", "0"], "--jobs"),
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


def _runs(out: Path, kind: str):
    client = _client(out)
    exp = client.get_experiment_by_name("pdcbdm-ablation")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`pdcbdm.kind` = '{kind}'")


@pytest.mark.slow
def test_tiny_ablation_writes_tables_chart_and_runs(tiny_ablation):
    out, proc = tiny_ablation
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cbdm seed 0" in proc.stdout and "pd-cbdm seed 0" in proc.stdout and "FID" in proc.stdout
    rows = pd.read_parquet(out / "ablation.parquet")
    assert sorted(rows["variant"]) == ["cbdm", "pd-cbdm"] and set(rows["seed"]) == {0}
    assert (rows["status"] == "finished").all() and rows["fid"].map(math.isfinite).all()
    assert (rows["train_seconds"] > 0).all()
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
    for key in ("cbdm-s0", "pd-cbdm-s0"):
        result = json.loads((out / "runs" / key / "result.json").read_text())
        assert result["status"] == "finished" and result["steps"] == 20
        assert Config.from_dict(result["config"]).train.steps == 20
        assert (out / "runs" / key / "samples_w1.png").read_bytes()[:8] == PNG_MAGIC
    pd_cfg = Config.load_json(out / "runs" / "pd-cbdm-s0" / "config.json")
    assert pd_cfg.loss.pd_weight > 0 and pd_cfg.loss.label_dist == "inverted" and pd_cfg.model.tsa_resolutions


@pytest.mark.slow
def test_tiny_ablation_mlflow_parent_with_finished_children(tiny_ablation):
    out, proc = tiny_ablation
    assert proc.returncode == 0, proc.stderr[-3000:]
    parents = _runs(out, "ablation")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.info.run_name.startswith("ablation-smoke-")
    assert parent.data.metrics["cbdm.fid_mean"] == pytest.approx(
        pd.read_parquet(out / "ablation.parquet").set_index("variant").loc["cbdm", "fid"])
    children = _runs(out, "ablation-run")
    assert len(children) == 2
    assert {c.info.run_name for c in children} == {"cbdm-s0", "pd-cbdm-s0"}
    client = _client(out)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert math.isfinite(child.data.metrics["fid"]) and "recall" in child.data.metrics
        assert child.data.params["train.steps"] == "20"
        assert len(client.get_metric_history(child.info.run_id, "loss")) >= 2  # the loss history, per log_every
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "samples")}
        assert "samples/samples_w1.png" in artifacts
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation.parquet", "summary.csv", "ablation.png"} <= parent_files


@pytest.mark.slow
def test_rerun_reuses_finished_runs(tiny_ablation, tmp_path):
    out, proc = tiny_ablation
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = tmp_path / "again"
    shutil.copytree(out / "runs", again / "runs")
    env = {**os.environ, "PDCBDM_CACHE": str(out.parent / "cache")}
    cmd = [sys.executable, "-m", "pipelines.ablation", "--preset", "smoke", "--seeds", "1", "--variants",
           "cbdm,pd-cbdm", "--steps", "20", "--out", str(again)]
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("reused") == 2
    first, second = (pd.read_parquet(d / "ablation.parquet").set_index("variant") for d in (out, again))
    assert second.loc["cbdm", "fid"] == first.loc["cbdm", "fid"]
    assert all(c.info.status == "FINISHED" for c in _runs(again, "ablation-run"))
