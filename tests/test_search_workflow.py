"""Issue 15's search workflow: a warm start from an earlier search (--warm-start).

The earlier search is an Optuna study written directly (no Ray run). The input checks run without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from pdcbdm.config import preset
from tune import space_file, warm_start

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


def _params(tau: float, dist: str, split: float, pd_weight: float = 0.1) -> dict:
    return {"loss.pd_weight": pd_weight, "loss.cbdm_tau": tau, "loss.cbdm_gamma": 0.25, "loss.label_dist": dist,
            "loss.split_ratio": split, "model.tsa_resolutions": "8"}


def earlier_search(folder: Path, directions: tuple[str, ...] = ("minimize",)) -> Path:
    """An earlier search's folder as tune/search.py leaves it (search.json, optuna.db), its study written directly:
    3 trials that fit SPACE with the smoke preset (2 COMPLETE, 1 PRUNED) and 4 that do not."""
    folder.mkdir(parents=True)
    storage = f"sqlite:///{folder / 'optuna.db'}"
    (folder / "search.json").write_text(json.dumps({"name": "src", "optuna_storage": storage,
                                                    "search_dir": str(folder), "args": {}}))
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


def _storage(location: str):
    from tune.search import optuna_storage

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
    (no_study / "search.json").write_text(json.dumps({"name": "x", "args": {}}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "search.json").write_text(json.dumps({"name": "x", "args": {}}))
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
