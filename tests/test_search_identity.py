"""State integrity of a search: one identity per search (its id on every MLflow run) and one driver per folder
(the driver lock, search.json created exclusively), the sqlite store created once under a lock, a search that never
started a trial resumed by starting it, finished runs reused only by the same code and feature network, and an
unreadable newest checkpoint replaced by the one before it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pdcbdm.io import write_json_atomic
from tests.searchutil import ROOT
from tune import tracking
from tune.runner import SearchError
from tune.search import parse_args, plan
from tune.search_folder import LOCK_FILE, create_json, driver_lock
from tune.tags import CODE_VERSION_TAG, EXTRACTOR_TAG

HOLD = """
import sys, time
from pathlib import Path
from tune.search_folder import driver_lock
with driver_lock(Path(sys.argv[1]), "search 'x'", RuntimeError):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_driver_of_one_folder_is_refused_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SearchError, match=rf"is being run by pid {holder.pid} on host .+ since"):
            with driver_lock(tmp_path, "search 'x'", SearchError):
                pass
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, no stale file blocks the next driver
        holder.wait()
    with driver_lock(tmp_path, "search 'x'", SearchError):
        assert f"pid {os.getpid()} on host" in (tmp_path / LOCK_FILE).read_text()


def test_search_json_is_created_by_exactly_one_of_two_drivers(tmp_path):
    create_json(tmp_path / "search.json", {"name": "a"}, "search 'a'", SearchError)
    with pytest.raises(SearchError, match="already exists"):
        create_json(tmp_path / "search.json", {"name": "b"}, "search 'a'", SearchError)
    assert '"a"' in (tmp_path / "search.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.json"]  # no temporary file left


def test_two_processes_create_one_sqlite_store_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (f"from tune import tracking; tracking.prepare_store({uri!r}); "
            f"print(tracking.ensure_experiment({uri!r}, 'pdcbdm', None))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1  # one experiment, found by all three


def test_a_search_that_never_started_a_trial_is_started_by_its_resume(tmp_path, capsys):
    p = plan(parse_args(["--preset", "smoke", "--out", str(tmp_path), "--name", "early", "--trials", "2"]))
    p.search_dir.mkdir(parents=True)
    write_json_atomic(p.search_dir / "search.json", p.meta())  # then the driver died before Tune ran
    resumed = plan(parse_args(["--resume", str(p.search_dir)]))
    assert resumed.restart and not resumed.resume and resumed.search_id == p.search_id and resumed.trials == 2
    assert "no trial had started" in capsys.readouterr().out
    # a re-run of the same name is refused before Ray starts, pointing at the resume
    with pytest.raises(SearchError, match="already exists.*--resume"):
        plan(parse_args(["--preset", "smoke", "--out", str(tmp_path), "--name", "early"]))


def test_every_lookup_of_a_search_uses_its_id(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    exp = tracking.ensure_experiment(uri, "pdcbdm", tmp_path / "mlartifacts")
    first = tracking.parent_run(uri, exp, "same", {}, search_id="id-1")
    second = tracking.parent_run(uri, exp, "same", {}, search_id="id-2")
    tracking.trial_run(uri, exp, first, "same", "t0", "t0", {}, search_id="id-1")
    tracking.trial_run(uri, exp, second, "same", "t0", "t0", {}, search_id="id-2")
    assert first != second
    assert [r.data.tags["pdcbdm.search_id"] for r in tracking.runs_of_search(uri, exp, "id-1")] == ["id-1"]
    assert tracking.trial_run_id(uri, exp, "t0", "id-2") != tracking.trial_run_id(uri, exp, "t0", "id-1")


def test_a_finished_run_stands_in_only_for_the_same_code_and_feature_network(tmp_path):
    from mlflow.tracking import MlflowClient

    from pdcbdm.version import code_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "pdcbdm", tmp_path / "mlartifacts")
    code = code_version()
    assert len(code) == 16 and code == code_version()
    client = MlflowClient(uri)

    def run(**tags):
        return client.get_run(client.create_run(exp, tags=tags).info.run_id)

    same = run(**{CODE_VERSION_TAG: code, EXTRACTOR_TAG: "digits-cnn/sha256:a"})
    assert tracking.reuse_mismatch(same, code, "digits-cnn/sha256:a") is None
    older = run(**{CODE_VERSION_TAG: "0123456789abcdef", EXTRACTOR_TAG: "digits-cnn/sha256:a"})
    assert "trained by other code (code version 0123456789abcdef" in tracking.reuse_mismatch(older, code,
                                                                                              "digits-cnn/sha256:a")
    untagged = run()  # a run of code from before the tag
    assert "code version unknown" in tracking.reuse_mismatch(untagged, code, "digits-cnn/sha256:a")
    assert "another feature network" in tracking.reuse_mismatch(same, code, "inception-v3-compat/sha256:b")


def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    import ray.train

    from pdcbdm.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from tune.worker import CKPT, first_readable

    run = tmp_path / "train-x"
    for i, name in enumerate(("checkpoint_2026-12-07_01-00-00.000000", "checkpoint_2026-12-07_01-10-00.000000",
                              "checkpoint_2026-12-07_01-20-00.000000")):
        (run / name).mkdir(parents=True)
        save_checkpoint(run / name / CKPT, {"config": {}, "num_classes": 2, "step": 10 * (i + 1), "net": {},
                                            "ema": {}})
    newest = run / "checkpoint_2026-12-07_01-20-00.000000" / CKPT
    newest.write_bytes(newest.read_bytes()[:100])  # a half-uploaded file
    step = first_readable(ray.train.Checkpoint(str(newest.parent)), lambda f: load_checkpoint(f / CKPT)["step"])
    assert step == 20
    err = capsys.readouterr().err
    assert "checkpoint_2026-12-07_01-20-00.000000 cannot be read" in err and "older checkpoint" in err
    for folder in run.iterdir():
        (folder / CKPT).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="01-20-00"):  # none readable: the newest one's error
        first_readable(ray.train.Checkpoint(str(newest.parent)), lambda f: load_checkpoint(f / CKPT))


def test_the_status_callback_says_what_it_could_not_record_instead_of_killing_the_driver(monkeypatch, capsys):
    """A tracking server gone when a trial ends: the driver's callback prints what it could not record (a raise
    would kill the driver before Tune saves the trial's end, and Tune, Optuna and MLflow would disagree)."""
    from types import SimpleNamespace

    from tune.trainable import MlflowStatusCallback

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    callback = MlflowStatusCallback("http://user:pw@127.0.0.1:9", "0", 40, "id-1")
    trial = SimpleNamespace(trial_id="t0", last_result={"step": 40})
    callback.on_trial_complete(0, [], trial)
    callback.on_trial_error(0, [], SimpleNamespace(trial_id="t1", last_result={}, error_file=None,
                                                   get_error=lambda: None, error_msg="boom"))
    err = capsys.readouterr().err
    assert "could not record the end of trial t0 in MLflow" in err and "trial t1" in err and "pw@" not in err


def test_a_run_of_a_trial_tune_never_held_is_closed_at_the_summary(tmp_path):
    """A trial started in the last seconds before a kill: its MLflow run exists, Tune's saved state never had it;
    the resumed search's summary marks it KILLED (none is left RUNNING), and leaves the others alone."""
    from mlflow.tracking import MlflowClient

    from tune.summary import close_lost_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "pdcbdm", tmp_path / "mlartifacts")
    parent = tracking.parent_run(uri, exp, "s", {}, search_id="id")
    kept = tracking.trial_run(uri, exp, parent, "s", "t0", "t0", {}, search_id="id")
    lost = tracking.trial_run(uri, exp, parent, "s", "t9", "t9", {}, search_id="id")
    runs = tracking.runs_of_search(uri, exp, "id")
    assert close_lost_runs(uri, runs, {"t0"}) == [lost]
    client = MlflowClient(uri)
    assert client.get_run(lost).info.status == "KILLED" and client.get_run(kept).info.status == "RUNNING"
    assert client.get_run(lost).data.tags["pdcbdm.outcome"].startswith("lost: started just before")


def test_a_shared_optuna_storage_never_gives_two_searches_one_study(tmp_path):
    """--optuna-storage shared between searches (a journal file here): a new search whose name already has a study
    there is refused before Ray starts, instead of continuing the other search's study."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    journal = tmp_path / "studies.journal"
    optuna.create_study(study_name="taken", storage=JournalStorage(JournalFileBackend(str(journal))))
    argv = ["--preset", "smoke", "--out", str(tmp_path / "out"), "--optuna-storage", str(journal)]
    with pytest.raises(SearchError, match="already holds a study named 'taken'"):
        plan(parse_args([*argv, "--name", "taken"]))
    assert plan(parse_args([*argv, "--name", "free"])).name == "free"
