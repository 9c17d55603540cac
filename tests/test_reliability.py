"""Search reliability: divergence and worker crashes, kill -9 and --resume (bad input: tests/test_bad_input.py)."""

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

from tests.searchutil import ROOT, TINY, run_search, search_cmd, seed_cache, trial_runs

def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    raise AssertionError(f"{text!r} not seen in {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_divergence_sigkill_and_a_worker_crash_then_resume_finish_every_trial_once(tmp_path, search_cache):
    """One search meets every fault (one Ray search and one resume instead of two of each): trial A diverges at
    step 15 and fails; the driver is killed with SIGKILL while trial B is at step 20; on --resume, A stays failed
    (Tune, Optuna and MLflow agree; it is not re-run), B continues from its step-20 checkpoint, its worker crashes
    at step 30 and Ray Train restarts it from that checkpoint again; every trial has one MLflow run."""
    log = tmp_path / "first.log"
    faults = tmp_path / "faults"
    faults.mkdir()
    fault_env = {"PDCBDM_FAULTS": "nan@15,kill@30", "PDCBDM_FAULT_DIR": str(faults)}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(tmp_path / "cache"), **fault_env}
    seed_cache(tmp_path, search_cache)
    cmd = search_cmd(tmp_path, "faults", "--trials", "2", "--no-asha", "--concurrency", "2",
                     *TINY)  # 40 steps, an evaluation (and checkpoint) every 20
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        # the driver's FAILED line, not the worker's traceback: it comes after the MLflow callback has recorded
        # the failure, which a kill between the two would lose (a race CI once lost)
        _wait_for(proc, log, "FAILED: ", timeout=500)
        _wait_for(proc, log, "step 20/40", timeout=400)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        proc.wait()
    (failed_line,) = [line for line in log.read_text().splitlines() if "FAILED: " in line]
    assert "non-finite loss at step 16" in failed_line, failed_line
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert any(r.info.status == "RUNNING" for r in trial_runs(uri, "faults"))

    resumed = run_search(tmp_path, "ignored", "--resume", str(tmp_path / "searches" / "faults"), env=fault_env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert sorted(p.name for p in faults.iterdir()) == ["kill@30", "nan@15"]  # the crash came after the resume

    table = pd.read_parquet(tmp_path / "searches" / "faults" / "trials.parquet")
    assert sorted(table["status"]) == ["completed", "failed"]
    failed, done = (table[table["status"] == s].iloc[0] for s in ("failed", "completed"))
    assert "non-finite loss at step 16" in failed["error"]
    runs = {r.info.run_id: r for r in trial_runs(uri, "faults")}
    assert len(runs) == 2 and len({r.data.tags["pdcbdm.trial_id"] for r in runs.values()}) == 2  # no duplicates
    bad, good = runs[failed["mlflow_run_id"]], runs[done["mlflow_run_id"]]
    assert bad.info.status == "FAILED" and "non-finite loss at step 16" in bad.data.tags["pdcbdm.error"]
    assert "resumed_from_step" not in bad.data.metrics  # an errored trial is not run again by a resume
    assert good.info.status == "FINISHED" and "fid" in good.data.metrics
    assert good.data.tags["pdcbdm.outcome"] == "completed"
    assert good.data.metrics["resumed_from_step"] == 20  # after the SIGKILL and after the crash: from step 20
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{tmp_path / 'searches/faults/optuna.db'}")
    state = {t.user_attrs["tune_trial_id"]: t.state.name for t in study.trials}
    assert state == {row.trial_id: {"completed": "COMPLETE", "failed": "FAIL"}[row.status] for row in table.itertuples()}
    assert not [t.number for t in study.trials if t.state.name == "RUNNING"]  # no orphan left to TPE's liar


def _wait_for_folder(proc: subprocess.Popen, log: Path, pattern: Path, timeout: float) -> None:
    """Wait until a path matching ``pattern`` (a glob in its last part) exists while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(pattern.parent.glob(pattern.name)):
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"no {pattern} in {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_ctrl_c_marks_unfinished_runs_killed_and_prints_the_resume_command(tmp_path, search_cache):
    """Tune returns normally on SIGINT: the search must still end non-zero, with the parent and the interrupted
    trials' runs KILLED (not FINISHED, not RUNNING) and the exact command that resumes it.

    Ctrl-C comes once the trial's training has started: its Ray Train folder exists, which the trial creates after
    its MLflow run (the driver's handling does not depend on how far the trial got; waiting for its first report
    cost the worker's start, its first 20 steps and an evaluation)."""
    log = tmp_path / "search.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(tmp_path / "cache")}
    seed_cache(tmp_path, search_cache)
    cmd = search_cmd(tmp_path, "cut", "--trials", "1", "--no-asha", *TINY)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for_folder(proc, log, tmp_path / "searches" / "cut" / "train" / "train-*", timeout=400)
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
