"""Tune, Optuna and MLflow agree after the faults that used to split them: the tracking server gone mid-trial,
and the driver killed in the seconds between telling Optuna a trial's end and Tune's next save of its state
(``tune.verdicts``; the kills are ``tune.faults``' ``die@fail`` and ``die@pruned``: the driver SIGKILLs itself
right after the searcher's tell, so the window is hit on every run, not by chance)."""

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

from pdcbdm.io import write_json_atomic
from tests.searchutil import ROOT, TINY, MlflowServer, free_port, search_cmd, seed_cache, trial_runs
from tune import budget, faults
from tune.verdicts import TUNE_TRIAL_ATTR

pytestmark = pytest.mark.slow


def _start(out: Path, log: Path, argv: list[str], faults: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(out / "cache"), "PDCBDM_FAULTS": faults,
           "PDCBDM_FAULT_DIR": str(out / "faults")}
    with open(log, "w") as sink:
        return subprocess.Popen(argv, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path, ready, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready(log.read_text()):
            return
        assert proc.poll() is None, f"exited before {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no {what} in {timeout} s:\n{log.read_text()[-3000:]}")


def _killed(proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    """The driver ended by its own SIGKILL; the local Ray cluster it started goes with its session."""
    try:
        code = proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert code == -signal.SIGKILL, f"exit {code}:\n{log.read_text()[-3000:]}"


def _first_loss_logged(uri: str) -> bool:
    """Whether a trial run of the search has logged its first loss (the trials are training)."""
    try:
        return any("loss" in r.data.metrics for r in trial_runs(uri, "rec"))
    except Exception:  # noqa: BLE001 - the experiment may not exist yet
        return False


def test_an_outage_and_kills_between_optuna_and_tune_end_in_three_records_that_agree(tmp_path, search_cache):
    """1. Two trials with a time budget, held at step 15 (``hold@15``). Once they train, the MLflow server is stopped
    for 5 s and the budget runs out before they are released: both stop at their step-20 report (its records wait for the server, and are lost with the trial) and the
    driver dies right after Optuna is told the first PRUNED (Tune's saved state: both running).
    2. --resume: trial X reports the stop Optuna recorded without training; Y trains on from its step-20
    checkpoint, its worker crashes at step 22 (Ray Train restarts it from that checkpoint), it diverges at step 25
    and the driver dies right after Optuna is told FAIL.
    3. --resume: Y fails at once (not trained again; the error its run recorded is named). Every record says X
    stopped by the budget at step 20 with one proxy FID, Y failed; no run is left RUNNING."""
    seed_cache(tmp_path, search_cache)
    (tmp_path / "faults").mkdir()
    server = MlflowServer(tmp_path / "mlflow.db", free_port())
    uri = server.start()
    folder = tmp_path / "searches" / "rec"
    state = folder / budget.BUDGET_FILE
    try:
        first = tmp_path / "first.log"
        proc = _start(tmp_path, first, search_cmd(tmp_path, "rec", "--tracking-uri", uri, "--trials", "2",
                                                  "--no-asha", "--concurrency", "2", "--time-budget", "30", *TINY),
                      "die@pruned,hold@15")
        _wait(proc, first, lambda _: _first_loss_logged(uri), "a logged loss")
        server.stop()
        write_json_atomic(state, {**budget.read(state), "deadline": time.time()})  # the budget runs out
        (tmp_path / "faults" / faults.RELEASE).touch()  # the trials held at step 15 go on to their step-20 report
        time.sleep(5)
        server.start()
        _killed(proc, first)

        second = tmp_path / "second.log"
        resume = search_cmd(tmp_path, "ignored", "--resume", str(folder))
        _killed(_start(tmp_path, second, resume, "kill@22,nan@25,die@fail"), second)

        done = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=400,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(tmp_path / "cache")})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert sorted(p.name for p in (tmp_path / "faults").iterdir()) == ["die@fail", "die@pruned", "kill@22", "nan@25",
                                                                     faults.RELEASE]

        table = pd.read_parquet(folder / "trials.parquet")
        assert sorted(table["status"]) == ["failed", "stopped"]
        y, x = (table[table["status"] == s].iloc[0] for s in ("failed", "stopped"))
        assert "failed before the search was killed" in y["error"] and "non-finite loss at step 26" in y["error"]
        assert x["step"] == 20 and x["stopped_by"] == "time budget"
        study = optuna.load_study(study_name="rec", storage=f"sqlite:///{folder / 'optuna.db'}")
        optuna_of = {t.user_attrs[TUNE_TRIAL_ATTR]: t for t in study.trials if TUNE_TRIAL_ATTR in t.user_attrs}
        assert {k: t.state.name for k, t in optuna_of.items()} == {y["trial_id"]: "FAIL", x["trial_id"]: "PRUNED"}
        assert optuna_of[x["trial_id"]].intermediate_values == {20: pytest.approx(x["proxy_fid"])}
        client = MlflowClient(uri)
        runs = {r.data.tags["pdcbdm.trial_id"]: r for r in trial_runs(uri, "rec")}
        assert set(runs) == {x["trial_id"], y["trial_id"]}  # one run per trial
        assert runs[y["trial_id"]].info.status == "FAILED"
        assert "non-finite loss at step 26" in runs[y["trial_id"]].data.tags["pdcbdm.error"]
        assert runs[y["trial_id"]].data.metrics["resumed_from_step"] == 20  # after the kill and after the crash
        stopped = runs[x["trial_id"]]
        assert stopped.info.status == "FINISHED"
        assert stopped.data.tags["pdcbdm.outcome"] == "stopped by the time budget at step 20"
        assert "resumed_from_step" not in stopped.data.metrics  # never trained again
        assert [(m.step, pytest.approx(m.value)) for m in client.get_metric_history(stopped.info.run_id,
                                                                                    "proxy_fid")] == [
            (20, x["proxy_fid"])]
        parent = client.search_runs([stopped.info.experiment_id], "tags.`pdcbdm.kind` = 'search'")
        assert [p.info.status for p in parent] == ["FINISHED"]
        assert "trials table:" in done.stdout  # the driver ends with its summary, not a traceback
    finally:
        server.stop()
