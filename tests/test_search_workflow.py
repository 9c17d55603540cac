"""The search workflow: a space file (--space), a warm start from an earlier search (--warm-start) and a
time budget (--time-budget).

One real search (local Ray, Optuna in sqlite, MLflow in sqlite) runs all three at once and is checked through its
files, its Optuna study and its MLflow runs; the earlier search it warm-starts from is an Optuna study written
directly (no second Ray run). The input checks run without Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from pdcbdm.io import write_json_atomic
from pdcbdm.presets import preset
from tests.searchutil import ROOT, TINY, artifact_paths, search_cmd, seed_cache, trial_runs
from tune import budget, space_file, warm_start

SPACE = """# a narrower space than the default: three knobs, the others stay at the preset's values
loss.cbdm_tau: {range: [0.5, 1.5]}
loss.label_dist: {choices: [cbdm, inverted]}
loss.split_ratio: {range: [0.6, 0.8], step: 0.1}
"""
# the default space's distributions for the smoke preset: what an earlier default search recorded
OLD = {"loss.pd_weight": FloatDistribution(0.01, 1.0, log=True), "loss.cbdm_tau": FloatDistribution(0.1, 2.0),
       "loss.cbdm_gamma": FloatDistribution(0.05, 1.0),
       "loss.label_dist": CategoricalDistribution(["cbdm", "inverted", "uniform", "power:0.5"]),
       "loss.split_ratio": FloatDistribution(0.5, 0.9, step=0.1),
       "model.tsa_resolutions": CategoricalDistribution(["", "8", "4", "8,4"])}
BUDGET_MINUTES = 30  # cut short by the test once the first trial runs (see run_cut_by_budget)


def _params(tau: float, dist: str, split: float, pd_weight: float = 0.1) -> dict:
    return {"loss.pd_weight": pd_weight, "loss.cbdm_tau": tau, "loss.cbdm_gamma": 0.25, "loss.label_dist": dist,
            "loss.split_ratio": split, "model.tsa_resolutions": "8"}


def _search_json(folder: Path, name: str, storage: str) -> None:
    """search.json as a search over the default space with the smoke preset writes it (the entries a warm start
    reads)."""
    space = {"file": str(space_file.DEFAULT_SPACE), "start_points": [],
             "knobs": space_file.load(space_file.DEFAULT_SPACE, preset("smoke"))}
    (folder / "search.json").write_text(json.dumps({"name": name, "optuna_storage": storage, "search_dir": str(folder),
                                                    "args": {}, "config": preset("smoke").to_dict(),
                                                    "space": space}))


def earlier_search(folder: Path, directions: tuple[str, ...] = ("minimize",)) -> Path:
    """An earlier search's folder as tune/search.py leaves it (search.json, optuna.db), its study written directly:
    3 trials that fit SPACE with the smoke preset (2 COMPLETE, 1 PRUNED) and 4 that do not."""
    folder.mkdir(parents=True)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    _search_json(folder, "src", storage)
    study = optuna.create_study(study_name="src", storage=storage, directions=list(directions))
    one = len(directions) == 1

    def add(params: dict, state: TrialState = TrialState.COMPLETE, value: float = 30.0, **kw) -> None:
        done = state == TrialState.COMPLETE
        study.add_trial(create_trial(state=state, values=([value] * len(directions)) if done else None,
                                     params=params, distributions=OLD, **kw))

    add(_params(0.8, "inverted", 0.6), value=30.0, user_attrs={"tune_trial_id": "aaa_00000"})
    add(_params(1.2, "cbdm", 0.7), value=25.0)
    add(_params(1.0, "inverted", 0.8), TrialState.PRUNED, intermediate_values={20: 40.0} if one else None)
    add(_params(1.1, "cbdm", 0.7), TrialState.FAIL)
    add(_params(1.9, "cbdm", 0.7))  # cbdm_tau outside [0.5, 1.5]
    add(_params(1.0, "cbdm", 0.7, pd_weight=0.5))  # pd_weight is fixed at the preset's 0.1 in the new search
    add(_params(1.0, "inverted", 0.7), user_attrs={warm_start.WARM_START_ATTR: "/elsewhere"})
    return folder


def _space(tmp_path: Path) -> dict:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return space_file.load(path, preset("smoke"))


# --- input checks: no Ray ---


def test_warm_start_takes_the_finished_trials_that_fit(tmp_path):
    src = earlier_search(tmp_path / "searches" / "src")
    spec = _space(tmp_path)
    got = warm_start.load(src, space_file.distributions(spec), ["minimize"], preset("smoke").flat(),
                          _storage)
    assert len(got.trials) == 3
    assert dict(got.skipped) == {"failed": 1, "outside the space": 1, "with a value of a knob fixed here": 1,
                                 "copied there from another search": 1}
    assert got.summary() == (f"warm start: 3 trial(s) from {src} (4 skipped: 1 failed, 1 outside the space, "
                             f"1 with a value of a knob fixed here, 1 copied there from another search)")
    states = sorted(t.state.name for t in got.trials)
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]
    for t in got.trials:
        assert set(t.params) == set(spec) and t.distributions == space_file.distributions(spec)
        assert t.user_attrs[warm_start.WARM_START_ATTR] == str(src) and "tune_trial_id" not in t.user_attrs
    pruned = next(t for t in got.trials if t.state == TrialState.PRUNED)
    assert pruned.intermediate_values == {20: 40.0}  # TPE ranks pruned trials by them
    assert sorted(t.value for t in got.trials if t.state == TrialState.COMPLETE) == [25.0, 30.0]
    # an earlier search with another budget: its values are on another scale, which the summary says
    meta = json.loads((src / "search.json").read_text())
    other = preset("smoke").to_dict()
    other["train"]["steps"] = 99
    other["loss"]["pd_weight"] = 0.5  # searched there: compared per trial, not here
    (src / "search.json").write_text(json.dumps({**meta, "config": other}))
    again = warm_start.load(src, space_file.distributions(spec), ["minimize"], preset("smoke").flat(), _storage)
    assert again.differs == ["train.steps"] and "base config differs in train.steps" in again.summary()


def _storage(location: str):
    from tune.study import optuna_storage

    return optuna_storage(location)


def test_warm_start_refuses_what_is_no_usable_search(tmp_path, capsys):
    """Exit 2 before Ray or MLflow, naming the folder: no search.json, a missing or broken study, another number
    of objectives."""
    import ray

    from tune.search import main

    out = tmp_path / "out"
    not_search = tmp_path / "empty"
    not_search.mkdir()
    no_study = tmp_path / "no-study"
    no_study.mkdir()
    _search_json(no_study, "x", f"sqlite:///{no_study / 'optuna.db'}")
    broken = tmp_path / "broken"
    broken.mkdir()
    _search_json(broken, "x", f"sqlite:///{broken / 'optuna.db'}")
    (broken / "optuna.db").write_text("not a database")
    multi = earlier_search(tmp_path / "multi", ("minimize", "minimize"))
    cases = [(not_search, "not a search folder"), (no_study, "does not exist"), (broken, "cannot read"),
             (multi, "optimises 2 objective(s)")]
    for folder, says in cases:
        assert main(["--preset", "smoke", "--warm-start", str(folder), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--warm-start {folder}" in err and says in err, err
    assert not out.exists() and not ray.is_initialized()


def test_warm_trials_precede_the_first_proposal_and_end_tpe_startup(tmp_path):
    """The preset's point is still the first trial proposed; TPE counts the copied trials towards its random
    start-up (2 for 3 trials), so the next proposal is TPE's, not the random sampler's."""
    from tune.search import build_searcher, parse_args

    src = earlier_search(tmp_path / "searches" / "src")
    args = parse_args(["--preset", "smoke", "--seed", "0"])
    cfg = preset("smoke")
    spec = _space(tmp_path)
    warm = [warm_start.load(src, space_file.distributions(spec), ["minimize"], cfg.flat(), _storage)]
    second = {}
    for label, sources in (("cold", []), ("warm", warm)):
        searcher = build_searcher(args, cfg, label, tmp_path / f"{label}.db", 3, spec, sources)
        first = searcher.suggest("t1")
        assert first == {"loss.cbdm_tau": 1.0, "loss.label_dist": "inverted", "loss.split_ratio": 0.7}
        second[label] = searcher.suggest("t2")
        study = searcher._ot_study
        assert len(study.trials) == 2 + len(sources and sources[0].trials)
    random = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    space_file.suggest(random, spec)
    assert second["cold"] == random.params  # start-up: the random sampler's first draw
    assert second["warm"] != random.params  # past the start-up from the first proposal: TPE


def test_budget_state_survives_a_resume(tmp_path):
    """A resumed search's budget is its own (or none); that an earlier run's budget ended the proposals stays."""
    first = budget.start(tmp_path, 10, now=1000.0)
    assert first["deadline"] == 1600.0 and not budget.passed(tmp_path / budget.BUDGET_FILE, now=1599.0)
    assert budget.passed(tmp_path / budget.BUDGET_FILE, now=1600.0) and not budget.reached(tmp_path)
    budget.mark_reached(tmp_path / budget.BUDGET_FILE)
    again = budget.start(tmp_path, None, now=5000.0)
    assert again["deadline"] is None and not budget.passed(tmp_path / budget.BUDGET_FILE, now=1e12)
    assert budget.reached(tmp_path) and again["earlier"][0]["minutes"] == 10


# --- one search with all three ---


def run_cut_by_budget(out: Path, name: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a search and, once its first trial has started (its progress line), move its deadline to now.

    Where a fixed short budget would fall between "proposed" and "first report" depends on the machine's load
    (here the two trials started 7 s after the budget began on a quiet day and 40 s in at a load of 45, their first
    report 47 s and 147 s in). Moving the recorded deadline (the searcher and the stopper read budget.json on every
    call) puts it there on any machine: what is tested is what happens at the deadline."""
    log_path = out / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(out / "cache")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(search_cmd(out, name, *extra), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                text=True, env=env)
        start, state = time.monotonic(), out / "searches" / name / budget.BUDGET_FILE
        while proc.poll() is None and time.monotonic() - start < timeout:
            if " started: " in log_path.read_text() and state.is_file():
                write_json_atomic(state, {**budget.read(state), "deadline": time.time()})
                break
            time.sleep(0.5)
        try:
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, log_path.read_text(), "")


@pytest.fixture(scope="module")
def workflow_search(tmp_path_factory, search_cache):
    """2 smoke trials over SPACE, one at a time, warm-started from an earlier search, cut by the time budget: the
    first stops at its first report, the second never starts."""
    out = tmp_path_factory.mktemp("workflow")
    seed_cache(out, search_cache)
    src = earlier_search(out / "searches" / "src")
    space = out / "space.yaml"
    space.write_text(SPACE)
    proc = run_cut_by_budget(out, "wf", "--trials", "2", "--concurrency", "1", "--seed", "1", *TINY,
                             "--space", str(space), "--warm-start", str(src), "--time-budget", str(BUDGET_MINUTES))
    return out, src, space, proc


@pytest.mark.slow
def test_budget_stops_trials_as_early_stopped(workflow_search):
    out, _, _, proc = workflow_search
    assert proc.returncode == 0, proc.stdout[-6000:]
    folder = out / "searches" / "wf"
    table = pd.read_parquet(folder / "trials.parquet")
    assert len(table) == 1 and set(table["status"]) == {"stopped"} and set(table["stopped_by"]) == {"time budget"}
    assert set(table["step"]) == {20}
    assert (f"time budget of {BUDGET_MINUTES:g} min reached: 1 trial(s) stopped early, 1 not started"
            in proc.stdout), proc.stdout[-3000:]
    assert proc.stdout.count("stopped early at step 20 (time budget)") == 1
    assert budget.reached(folder) and "interrupted" not in proc.stdout
    uri = f"sqlite:///{out / 'mlflow.db'}"
    runs = trial_runs(uri, "wf")
    assert len(runs) == 1
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["pdcbdm.outcome"] == "stopped by the time budget at step 20"
    study = optuna.load_study(study_name="wf", storage=f"sqlite:///{folder / 'optuna.db'}")
    own = warm_start.own_trials(study)
    assert sorted(t.user_attrs["tune_trial_id"] for t in own) == sorted(table["trial_id"])
    assert all(t.state == TrialState.PRUNED and t.intermediate_values == {20: pytest.approx(v)}
               for t, v in zip(sorted(own, key=lambda t: t.user_attrs["tune_trial_id"]),
                               table.sort_values("trial_id")["proxy_fid"]))
    parent = MlflowClient(uri).search_runs([runs[0].info.experiment_id], "tags.`pdcbdm.kind` = 'search'")[0]
    assert parent.info.status == "FINISHED" and "1 trial(s) stopped early" in parent.data.tags["pdcbdm.time_budget"]


@pytest.mark.slow
def test_the_space_file_is_searched_and_recorded(workflow_search):
    out, src, space, proc = workflow_search
    assert proc.returncode == 0
    folder = out / "searches" / "wf"
    resolved = space_file.load(space, preset("smoke"))
    saved = json.loads((folder / "search.json").read_text())
    assert saved["space"] == {"file": str(space), "knobs": resolved, "start_points": []}  # the file has none
    table = pd.read_parquet(folder / "trials.parquet")
    assert [c for c in table.columns if "." in c] == list(resolved)  # only the file's knobs are searched
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("pdcbdm").experiment_id],
                                "tags.`pdcbdm.kind` = 'search'")[0]
    assert "space.json" in artifact_paths(uri, parent.info.run_id)
    assert json.loads(Path(client.download_artifacts(parent.info.run_id, "space.json", str(out))).read_text()) \
        == saved["space"]
    assert parent.data.params["space_file"] == str(space) and parent.data.params["warm_start"] == f"{src} (3)"
    study = optuna.load_study(study_name="wf", storage=f"sqlite:///{folder / 'optuna.db'}")
    first = min(warm_start.own_trials(study), key=lambda t: t.number)
    assert first.params == {"loss.cbdm_tau": 1.0, "loss.label_dist": "inverted", "loss.split_ratio": 0.7}
    for t in warm_start.own_trials(study):
        assert t.distributions == space_file.distributions(resolved)


@pytest.mark.slow
def test_warm_start_trials_enter_the_study_but_no_table(workflow_search):
    out, src, _, proc = workflow_search
    assert proc.returncode == 0
    assert f"warm start: 3 trial(s) from {src} (4 skipped:" in proc.stdout
    folder = out / "searches" / "wf"
    study = optuna.load_study(study_name="wf", storage=f"sqlite:///{folder / 'optuna.db'}")
    copied = [t for t in study.trials if warm_start.WARM_START_ATTR in t.user_attrs]
    assert len(copied) == 3 and all("tune_trial_id" not in t.user_attrs for t in copied)
    assert {t.user_attrs[warm_start.WARM_START_ATTR] for t in copied} == {str(src)}
    table = pd.read_parquet(folder / "trials.parquet")
    assert len(study.trials) == 3 + len(table)  # the table holds Tune's trials only


@pytest.mark.slow
def test_resume_reads_the_saved_space_and_takes_a_fresh_budget(workflow_search):
    """--resume plans with the space saved in search.json (the file may have changed since) and with the
    --time-budget of its own command line; checked without running it."""
    from tune.search import parse_args, plan

    out, _, space, proc = workflow_search
    assert proc.returncode == 0
    folder = out / "searches" / "wf"
    saved = json.loads((folder / "search.json").read_text())["space"]
    space.write_text("loss.cbdm_gamma: {range: [0.1, 0.2]}\n")
    p = plan(parse_args(["--resume", str(folder)]))
    assert p.space == saved["knobs"] and p.space_file == saved["file"]
    assert p.args.time_budget is None and p.warm == []
    assert plan(parse_args(["--resume", str(folder), "--time-budget", "5"])).args.time_budget == 5
