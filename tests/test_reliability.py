"""Search reliability: Ctrl-C (divergence, worker crashes, kills and --resume: tests/test_fault_records.py; bad
input: tests/test_bad_input.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.searchutil import ROOT, TINY, search_cmd, seed_cache, trial_runs


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
