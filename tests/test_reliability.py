"""Search reliability: bad input fails early, divergence and worker crashes, kill -9 and --resume."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.searchutil import ROOT, TINY, run_search, search_cmd, trial_runs
from tune.search import main

BAD_INPUTS = [
    (["--set", "loss.nope=1"], "unknown config field 'loss.nope'"),
    (["--set", "train.steps=abc"], "train.steps expects int, got 'abc'"),
    (["--set", "loss.split_ratio=1.5"], "loss.split_ratio must be in (0, 1), got 1.5"),
    (["--tracking-uri", "http://127.0.0.1:9"], "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    (["--address", "127.0.0.1:9"], "Ray address 127.0.0.1:9 is unreachable"),
    (["--set", "data.dataset=cifar10-lt", "--set", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--resume", "/nonexistent/search"], "not a search folder"),
    (["--trials", "0"], "--trials must be >= 1"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_bad_input_fails_before_any_trial(tmp_path, capsys, argv, message):
    code = main(["--preset", "smoke", "--out", str(tmp_path), "--name", "bad", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run may be left behind"
    assert not (tmp_path / "searches" / "bad").exists()


@pytest.mark.slow
def test_divergence_fails_one_trial_and_a_worker_crash_resumes(tmp_path):
    faults = tmp_path / "faults"
    faults.mkdir()
    env = {"PDCBDM_FAULTS": "nan@25,kill@30", "PDCBDM_FAULT_DIR": str(faults)}
    proc = run_search(tmp_path, "faults", "--trials", "2", "--no-asha", "--concurrency", "2", *TINY, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # the search went on
    assert sorted(p.name for p in faults.iterdir()) == ["kill@30", "nan@25"]
    assert "FAILED: " in proc.stdout and "non-finite loss at step 26" in proc.stdout

    table = pd.read_parquet(tmp_path / "searches" / "faults" / "trials.parquet")
    assert sorted(table["status"]) == ["completed", "failed"]
    failed = table[table["status"] == "failed"].iloc[0]
    assert "non-finite loss" in failed["error"]

    runs = {r.info.run_id: r for r in trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "faults")}
    bad, good = runs[failed["mlflow_run_id"]], runs[table[table["status"] == "completed"].iloc[0]["mlflow_run_id"]]
    assert bad.info.status == "FAILED" and "non-finite loss at step 26" in bad.data.tags["pdcbdm.error"]
    assert good.info.status == "FINISHED" and "fid" in good.data.metrics
    assert good.data.metrics["resumed_from_step"] == 20  # restarted from the step-20 checkpoint, not from 0

    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{tmp_path / 'searches/faults/optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL"]

    # a resume keeps an errored trial errored (not re-run, as resume_errored=True did: its run could end
    # FINISHED in MLflow while Optuna holds it FAIL): Tune, Optuna and MLflow agree on every trial
    again = run_search(tmp_path, "ignored", "--resume", str(tmp_path / "searches" / "faults"))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = pd.read_parquet(tmp_path / "searches" / "faults" / "trials.parquet").set_index("trial_id")
    assert resumed["status"].to_dict() == table.set_index("trial_id")["status"].to_dict()
    runs = {r.info.run_id: r for r in trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "faults")}
    assert len(runs) == 2 and runs[failed["mlflow_run_id"]].info.status == "FAILED"
    assert "resumed_from_step" not in runs[failed["mlflow_run_id"]].data.metrics  # not run again
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{tmp_path / 'searches/faults/optuna.db'}")
    state = {t.user_attrs["tune_trial_id"]: t.state.name for t in study.trials}
    assert state == {row.Index: {"completed": "COMPLETE", "failed": "FAIL"}[row.status] for row in resumed.itertuples()}


def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    raise AssertionError(f"{text!r} not seen in {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_sigkill_then_resume_completes_every_trial_once(tmp_path):
    log = tmp_path / "first.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(tmp_path / "cache")}
    cmd = search_cmd(tmp_path, "killed", "--trials", "2", "--no-asha", "--concurrency", "2",
                     *TINY)  # 40 steps, an evaluation (and checkpoint) every 20
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for(proc, log, "step 20/40", timeout=400)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        proc.wait()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert any(r.info.status == "RUNNING" for r in trial_runs(uri, "killed"))

    resumed = run_search(tmp_path, "ignored", "--resume", str(tmp_path / "searches" / "killed"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = trial_runs(uri, "killed")
    assert len(runs) == 2 and len({r.data.tags["pdcbdm.trial_id"] for r in runs}) == 2  # no duplicate runs
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all("fid" in r.data.metrics and r.data.tags["pdcbdm.outcome"] == "completed" for r in runs)
    assert any(r.data.metrics.get("resumed_from_step", 0) >= 20 for r in runs)  # continued from a checkpoint
    table = pd.read_parquet(tmp_path / "searches" / "killed" / "trials.parquet")
    assert len(table) == 2 and set(table["status"]) == {"completed"}
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{tmp_path / 'searches/killed/optuna.db'}")
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2
    assert not [t.number for t in study.trials if t.state.name == "RUNNING"]  # no orphan left to TPE's liar


@pytest.mark.slow
def test_ctrl_c_marks_unfinished_runs_killed_and_prints_the_resume_command(tmp_path):
    """Tune returns normally on SIGINT: the search must still end non-zero, with the parent and the interrupted
    trials' runs KILLED (not FINISHED, not RUNNING) and the exact command that resumes it."""
    log = tmp_path / "search.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(tmp_path / "cache")}
    cmd = search_cmd(tmp_path, "cut", "--trials", "2", "--no-asha", "--concurrency", "2", *TINY)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for(proc, log, "step 20/40", timeout=400)
        proc.send_signal(signal.SIGINT)  # Ctrl-C reaches the driver
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert f"python tune/search.py --resume {tmp_path / 'searches' / 'cut'}" in text, text[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = trial_runs(uri, "cut")
    unfinished = [r for r in runs if "fid" not in r.data.metrics]  # only a trial that ran its 40 steps has a FID
    assert runs and all(r.info.status == "KILLED" and r.data.tags["pdcbdm.outcome"] == "killed" for r in unfinished)
    (parent,) = MlflowClient(uri).search_runs([runs[0].info.experiment_id], "tags.`pdcbdm.kind` = 'search'")
    assert parent.info.status == "KILLED"
    assert not (tmp_path / "searches" / "cut" / "trials.parquet").exists()  # no table of "stopped" trials
