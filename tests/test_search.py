"""The smoke search end to end: real Ray (local), real Optuna (sqlite), real MLflow (sqlite store)."""

from __future__ import annotations

import re

from pathlib import Path

import optuna
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.searchutil import artifact_paths, trial_runs
from tune.mlflow_model import load_logged_model, model_uri_of_run
from tune.space_file import default_knobs
from tune.summary import confirm_hint

pytestmark = pytest.mark.slow


def test_smoke_search_records_every_trial(smoke_search):
    tmp_path, _, proc = smoke_search
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "open the MLflow UI: mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    folder = tmp_path / "searches" / "e2e"
    # the closing line: the confirm command for the completed trials (rank 1 against rank 2), or why there is none
    completed = int((pd.read_parquet(folder / "trials.parquet")["status"] == "completed").sum())
    # Ray's raylet may print a warning of its own at any time (worker processes started under load)
    ours = [line for line in proc.stdout.splitlines() if "(raylet)" not in line]
    assert ours[-1] == confirm_hint(folder, completed)
    assert "started:" in proc.stdout and "rank" in proc.stdout
    # the line of the last trial to end counts it as ended too
    assert re.search(r"(finished|stopped early at step \d+ \(ASHA\)); 2 terminated$", proc.stdout, re.M), proc.stdout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    runs = trial_runs(uri, "e2e")
    assert len(runs) == 2
    table = pd.read_parquet(tmp_path / "searches" / "e2e" / "trials.parquet")
    assert len(table) == 2 and set(table["status"]) <= {"completed", "stopped"}
    assert pads.dataset(tmp_path / "searches" / "e2e" / "trials.parquet").count_rows() == 2  # pyarrow opens it too
    assert set(table["mlflow_run_id"]) == {r.info.run_id for r in runs}
    for run in runs:
        assert run.info.status == "FINISHED"  # ASHA-stopped trials too; none left RUNNING
        assert run.data.tags["pdcbdm.ray_checkpoints"].endswith(f"/train-{run.data.tags['pdcbdm.trial_id']}")
        assert len(run.data.tags["pdcbdm.config_key"]) == 16  # what a grid (ablation, confirm) reuses runs by
        for key in default_knobs():
            assert key in run.data.params
        assert "proxy_fid" in run.data.metrics and "loss" in run.data.metrics
        assert run.data.tags["pdcbdm.precision"] == "fp32" and run.data.tags["pdcbdm.device"] == "cpu"
        assert len(run.data.tags["pdcbdm.nodes.step0"]) == 56  # the Ray node id of its one rank
        assert run.data.tags["pdcbdm.eval_protocol"] == "fast"
        assert run.data.tags["pdcbdm.extractor"].startswith("digits-cnn/sha256:")  # the feature space of its scores
        assert "pd_grad_share" in run.data.metrics  # the PD term's gradient share, logged every log_every steps
        files = artifact_paths(uri, run.info.run_id)
        assert "config.json" in files
        # the proxy grids as MLflow's image series "samples" (the run page's step slider): one per evaluation
        assert any(f.startswith("images/samples+step+20+") and f.endswith(".png") for f in files), files
        _one_value_per_key_and_step(uri, run)
        assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "digits-lt"
        assert any(k.startswith("system/") for k in run.data.metrics)  # rank 0's system metrics
        status = table.set_index("mlflow_run_id").loc[run.info.run_id, "status"]
        outcome = run.data.tags["pdcbdm.outcome"]
        assert outcome == "completed" if status == "completed" else outcome == "early-stopped by ASHA at step 20"
    done = [r for r in runs if table.set_index("mlflow_run_id").loc[r.info.run_id, "status"] == "completed"]
    assert done, "the best trial runs to the end"
    for run in done:
        # consistency and tail-to-head confusion count only samples the judge can read (None, so not logged, when
        # a 40-step smoke model draws none); the reject rate says how many it could not, the floors what real
        # images score at the same size
        for key in ("fid", "recall", "precision", "f8", "f1_8", "fid_head", "fid_tail", "best_guidance", "reject_rate",
                    "fid_floor", "recall_floor", "is_mean", "noise_error", "objective"):
            assert key in run.data.metrics, key
        files = artifact_paths(uri, run.info.run_id)
        assert {"evaluation/per_class.parquet", "evaluation/per_class.json", "evaluation/guidance_grid.json",
                "samples/final/samples_w0.png", "samples/final/samples_w1.png"} <= set(files)
        assert not any(f.startswith("checkpoint/") for f in files)  # no training state uploaded
        # MLflow holds the EMA network as a pickle-free pt2 model; the training checkpoint stays in Ray's storage
        _loads_as_mlflow_model(uri, run.info.run_id)
        ray_ckpt = Path(run.data.tags["pdcbdm.ray_checkpoint"])
        assert (ray_ckpt / "checkpoint.pt").is_file()
        assert ray_ckpt.parent == Path(run.data.tags["pdcbdm.ray_checkpoints"])
        assert "optimizer" in torch.load(ray_ckpt / "checkpoint.pt", weights_only=True)
    # no trial left files in the system temp folder (samples, tables, checkpoints; libraries' own caches such as
    # torchinductor_* or multiprocessing's pymp-* are not the trials')
    tmpdir = (tmp_path / "tmpdir").resolve()
    left = [p for p in tmpdir.rglob("*") if p.name.startswith("pdcbdm") or p.suffix in (".png", ".parquet", ".pt")]
    assert left == [], left[:20]
    ranked = table[table["status"] == "completed"]
    assert list(ranked["fid"]) == sorted(ranked["fid"])

    # every completed trial was scored over eval.guidance_grid ("0,1") and reports its best w, also in the table
    assert ranked["best_guidance"].notna().all() and set(ranked["best_guidance"]) <= {0.0, 1.0}
    assert "best_w" in proc.stdout and "sample.guidance" not in table.columns  # w is not searched

    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'searches' / 'e2e' / 'optuna.db'}")
    assert len(study.trials) == 2
    assert study.trials[0].params["loss.label_dist"] == "inverted"  # the preset is evaluated first
    # Optuna and the table agree: completed trials COMPLETE with the final FID, ASHA-stopped ones PRUNED with
    # their proxy FIDs keyed by training step, and the study's best trial is rank 1
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert set(by_id) == set(table["trial_id"])
    state = {"completed": optuna.trial.TrialState.COMPLETE, "stopped": optuna.trial.TrialState.PRUNED}
    for row in table.itertuples():
        trial = by_id[row.trial_id]
        assert trial.state == state[row.status], (row.trial_id, row.status, trial.state)
        assert set(trial.intermediate_values) <= {20}  # steps, not Tune's iterations (which would be 1, 2)
        if row.status == "completed":
            assert trial.value == pytest.approx(row.fid)
        else:
            assert trial.intermediate_values == {20: pytest.approx(row.proxy_fid)}
    assert table.iloc[0]["status"] == "completed"
    assert study.best_trial.user_attrs["tune_trial_id"] == table.iloc[0]["trial_id"]


def _one_value_per_key_and_step(uri: str, run) -> None:
    """Every metric has at most one value per step; ``step`` is MLflow's axis, not a metric."""
    client = MlflowClient(uri)
    assert "step" not in run.data.metrics
    for key in ("loss", "dm", "proxy_fid"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps and len(steps) == len(set(steps)), (key, steps)


def _loads_as_mlflow_model(uri: str, run_id: str) -> None:
    """runs:/ID/model loads with MLflow (pickle refused) as the step-40 EMA network, at any batch size."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    net, cfg, meta = load_logged_model(model_uri_of_run(run_id))
    assert meta["step"] == 40 and meta["weights"] == "ema" and cfg.train.steps == 40
    for batch in (1, 5):
        x = torch.randn(batch, *meta["image_shape"])
        t, y = torch.zeros(batch, dtype=torch.long), torch.full((batch,), meta["num_classes"])
        assert net(x, t, y).shape == x.shape


def test_parent_run_summarises_the_search(smoke_search):
    tmp_path, _, proc = smoke_search
    assert proc.returncode == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("pdcbdm")
    parent = client.search_runs([exp.experiment_id], "tags.`pdcbdm.kind` = 'search'")[0]
    files = set(artifact_paths(uri, parent.info.run_id))
    assert {"trials.parquet", "trials.json", "optuna/param_importances.png", "optuna/parallel_coordinate.png",
            "best_trial/command.txt"} <= files
    assert any(f.startswith("best_trial/samples_w") for f in files)
    command = parent.data.tags["pdcbdm.best_command"]
    assert command.startswith("python -m pdcbdm.train --preset smoke --set train.steps=40") and command in proc.stdout
    table = pd.read_parquet(tmp_path / "searches" / "e2e" / "trials.parquet")
    assert parent.data.tags["pdcbdm.best_trial"] == table.iloc[0]["trial_id"]
