"""The search's Optuna searcher, driven through Ray's searcher API (suggest / on_trial_result / on_trial_complete)
without a Ray cluster, on a real Optuna study in sqlite; and ASHA's grace period."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from pdcbdm.config import apply_overrides
from pdcbdm.presets import preset
from tune.search import build_scheduler, build_searcher, grace_period, parse_args
from tune.searcher import StepOptunaSearch, startup_trials
from tune.study import reconcile
from tune.verdicts import TUNE_TRIAL_ATTR

STEPS = 40


def _searcher(tmp_path, *flags: str, trials: int = 3) -> StepOptunaSearch:
    args = parse_args(["--preset", "smoke", "--trials", str(trials), *flags])
    cfg = apply_overrides(preset("smoke"), [f"train.steps={STEPS}", "train.eval_every=20"])
    return build_searcher(args, cfg, "s", tmp_path / "optuna.db", trials)


def _study(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def _by_tune_id(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """The trials Tune has asked for; the study also holds the enqueued start points not yet asked (WAITING)."""
    return {t.user_attrs[TUNE_TRIAL_ATTR]: t for t in study.trials if TUNE_TRIAL_ATTR in t.user_attrs}


def test_stopped_trials_are_pruned_and_completed_ones_carry_the_final_objective(tmp_path):
    searcher = _searcher(tmp_path)
    for trial_id in ("done", "stopped", "broken"):
        assert searcher.suggest(trial_id)
    # Tune's training_iteration restarts at 1 after a restore; the training step does not
    searcher.on_trial_result("done", {"step": 20, "training_iteration": 1, "objective": 30.0, "proxy_fid": 30.0})
    searcher.on_trial_result("broken", {"step": 20, "training_iteration": 1, "objective": 40.0, "proxy_fid": 40.0})
    final = {"step": STEPS, "training_iteration": 1, "objective": 12.0, "proxy_fid": 28.0, "fid": 12.0}
    searcher.on_trial_result("done", final)
    searcher.on_trial_complete("done", final)
    # Tune's order when ASHA stops a trial: its last result goes to on_trial_complete only
    searcher.on_trial_complete("stopped", {"step": 20, "training_iteration": 1, "objective": 25.0, "proxy_fid": 25.0})
    searcher.on_trial_complete("broken", {"step": 20, "objective": 40.0}, error=True)

    trials = _by_tune_id(_study(tmp_path))
    assert set(trials) == {"done", "stopped", "broken"}
    assert trials["done"].state == TrialState.COMPLETE and trials["done"].value == 12.0  # the final FID
    assert trials["done"].intermediate_values == {20: 30.0}  # proxies by step; the last step is the value
    assert trials["stopped"].state == TrialState.PRUNED and trials["stopped"].intermediate_values == {20: 25.0}
    assert trials["broken"].state == TrialState.FAIL
    assert trials["done"].params["loss.label_dist"] == "inverted"  # the preset is the first point
    study = _study(tmp_path)
    assert study.best_trial.user_attrs[TUNE_TRIAL_ATTR] == "done"  # a better proxy of a pruned trial does not win


def test_searcher_state_survives_save_and_restore(tmp_path):
    searcher = _searcher(tmp_path)
    searcher.suggest("a")
    searcher.on_trial_result("a", {"step": 20, "objective": 9.0})
    searcher.save_to_dir(str(tmp_path), session_str="x")  # what Tune does for --resume
    restored = StepOptunaSearch(space=lambda t: None, metric="objective", mode="min", max_steps=1)
    restored.restore_from_dir(str(tmp_path))
    assert isinstance(restored, StepOptunaSearch) and restored._max_steps == STEPS
    restored.on_trial_result("a", {"step": 20, "training_iteration": 1, "objective": 99.0})  # the same step again
    restored.on_trial_complete("a", {"step": 20, "objective": 9.0})
    (trial,) = _by_tune_id(_study(tmp_path)).values()
    assert trial.state == TrialState.PRUNED and trial.intermediate_values == {20: 9.0}


def test_multi_objective_uses_tpe_and_prunes_stopped_trials(tmp_path):
    searcher = _searcher(tmp_path, "--multi-objective", trials=8)
    searcher.suggest("a")
    searcher.suggest("b")
    final = {"step": STEPS, "objective": 12.0, "objective_tail": 20.0}
    searcher.on_trial_result("a", {"step": 20, "objective": 30.0, "objective_tail": 50.0})
    searcher.on_trial_complete("a", final)
    searcher.on_trial_complete("b", {"step": 20, "objective": 25.0, "objective_tail": 45.0})
    study = _study(tmp_path)
    assert len(study.directions) == 2
    assert isinstance(searcher._ot_study.sampler, optuna.samplers.TPESampler)
    assert searcher._ot_study.sampler._n_startup_trials == 2
    trials = _by_tune_id(study)
    assert trials["a"].state == TrialState.COMPLETE and trials["a"].values == [12.0, 20.0]
    assert trials["b"].state == TrialState.PRUNED


@pytest.mark.parametrize("trials, startup", [(1, 2), (3, 2), (8, 2), (12, 3), (32, 8), (100, 25), (100_000, 25)])
def test_tpe_start_up_is_sized_to_the_budget(tmp_path, trials, startup):
    assert startup_trials(trials) == startup
    searcher = _searcher(tmp_path, trials=trials)
    assert searcher._ot_study.sampler._n_startup_trials == startup


def test_asha_grace_period_waits_for_the_ema():
    smoke, digits = preset("smoke"), preset("digits")
    assert grace_period(smoke) == 30  # EMA ready at 20, first evaluation at 30
    assert grace_period(apply_overrides(smoke, ["train.steps=40", "train.eval_every=20"])) == 20
    assert grace_period(digits) == 300  # EMA 0.99 is ready at 200: the first evaluation (300)
    assert grace_period(digits, "digits") == 900  # the digits preset waits for half its budget
    assert grace_period(digits, "digits", asked=400) == 600  # --asha-grace, on an evaluation step
    args = parse_args(["--preset", "digits"])
    asha = build_scheduler(args, digits)
    assert isinstance(asha, ASHAScheduler) and min(t for t, _ in asha._brackets[0]._rungs) == 900  # first rung
    # the grace period reaches the budget: no early stopping (ASHA is a FIFOScheduler subclass: compare types)
    assert type(build_scheduler(args, apply_overrides(digits, ["train.steps=300"]))) is FIFOScheduler
    assert type(build_scheduler(args, apply_overrides(digits, ["train.steps=600"]))) is ASHAScheduler
    assert type(build_scheduler(parse_args(["--no-asha"]), digits)) is FIFOScheduler


def test_resume_fails_trials_asked_after_the_last_searcher_save(tmp_path):
    """A SIGKILL between ``study.ask()`` and Tune's next save of the searcher leaves a RUNNING trial nobody owns;
    TPE's constant liar would count it forever. The restored searcher marks it FAIL and keeps its own."""
    searcher = _searcher(tmp_path, trials=4)
    searcher.suggest("owned")
    searcher.save_to_dir(str(tmp_path), session_str="x")
    searcher.suggest("lost")  # asked, then the driver is killed before the next save
    restored = StepOptunaSearch(space=lambda t: None, metric="objective", mode="min", max_steps=1)
    restored.restore_from_dir(str(tmp_path))
    trials = _by_tune_id(_study(tmp_path))
    assert trials["lost"].state == TrialState.FAIL
    assert trials["owned"].state == TrialState.RUNNING  # Tune resumes it and reports to it
    restored.on_trial_complete("owned", {"step": STEPS, "objective": 5.0})
    assert _by_tune_id(_study(tmp_path))["owned"].state == TrialState.COMPLETE
    assert restored.fail_orphans() == []


def test_reconcile_tells_optuna_the_end_tune_recorded(tmp_path):
    searcher = _searcher(tmp_path, trials=4)
    for trial_id in ("done", "stopped", "failed", "other"):
        searcher.suggest(trial_id)
    study = _study(tmp_path)
    told = reconcile(study, {"done": ("completed", [7.0]), "stopped": ("stopped", None), "failed": ("failed", None)})
    assert len(told) == 3
    trials = _by_tune_id(_study(tmp_path))
    assert trials["done"].state == TrialState.COMPLETE and trials["done"].value == 7.0
    assert trials["stopped"].state == TrialState.PRUNED and trials["failed"].state == TrialState.FAIL
    assert trials["other"].state == TrialState.RUNNING  # not in Tune's table: left alone


def test_optuna_storage_may_be_a_journal_file(tmp_path):
    from tune.search import plan
    from tune.study import optuna_storage

    journal = tmp_path / "shared" / "study.log"
    args = parse_args(["--preset", "smoke", "--trials", "3", "--optuna-storage", str(journal)])
    cfg = apply_overrides(preset("smoke"), [f"train.steps={STEPS}", "train.eval_every=20"])
    p = plan(parse_args(["--preset", "smoke", "--out", str(tmp_path / "out"), "--optuna-storage", str(journal)]))
    assert p.optuna_storage == str(journal) and p.meta()["optuna_storage"] == str(journal)
    searcher = build_searcher(args, cfg, "j", p.optuna_storage, 3)
    searcher.suggest("a")
    searcher.save_to_dir(str(tmp_path), session_str="x")  # the storage is pickled with Tune's state
    restored = StepOptunaSearch(space=lambda t: None, metric="objective", mode="min", max_steps=1)
    restored.restore_from_dir(str(tmp_path))
    restored.on_trial_complete("a", {"step": STEPS, "objective": 3.0})
    study = optuna.load_study(study_name="j", storage=optuna_storage(str(journal)))
    assert journal.is_file() and [t.value for t in _by_tune_id(study).values()] == [3.0]
    rdb = f"sqlite:///{tmp_path / 'other.db'}"
    assert isinstance(optuna_storage(rdb), optuna.storages.RDBStorage)


def test_a_checkpoint_keeps_the_metrics_reported_with_it(tmp_path):
    """What a trial killed after its last report reports again when it is resumed."""
    from pdcbdm.train import load_data
    from pdcbdm.training import Trainer
    from tune.worker import stored_metrics, write_checkpoint

    cfg = apply_overrides(preset("smoke"), ["train.batch_size=4"])
    metrics = {"step": 40, "fid": 12.5, "objective": 12.5, "proxy_fid": float("inf")}
    folder = write_checkpoint(Trainer(cfg, load_data(cfg)), metrics, tmp_path)
    assert (folder / "checkpoint.pt").is_file() and stored_metrics(folder) == metrics
    assert stored_metrics(tmp_path / "none") == {}


def test_start_points_are_enqueued_up_to_the_trial_budget(tmp_path):
    """The default space's CBDM baseline is the second trial of a search of 3; a search of 1 enqueues only the
    preset's point, so no start point is left WAITING in the study."""
    searcher = _searcher(tmp_path, trials=3)
    waiting = [t for t in _study(tmp_path).trials if t.state == TrialState.WAITING]
    assert len(waiting) == 2  # enqueued: their values are fixed when asked
    for trial_id in ("first", "second"):
        searcher.suggest(trial_id)
    trials = _by_tune_id(_study(tmp_path))
    assert trials["first"].params["loss.label_dist"] == "inverted"
    second = trials["second"].params
    assert second["loss.label_dist"] == "cbdm" and second["model.tsa_resolutions"] == ""
    one = tmp_path / "one"
    one.mkdir()
    _searcher(one, trials=1)
    assert len(_study(one).trials) == 1


def test_the_studys_verdicts_carry_what_a_resume_needs_to_end_a_trial_the_same_way(tmp_path):
    """Optuna told a trial's end and the driver was killed before Tune saved it: the resume reads the study's
    verdicts (tune.verdicts) and each such trial reports the same end without training (tests/test_fault_records.py
    runs it end to end). A verdict names the step and value a stopped trial was stopped at, and by whom."""
    from tune import budget, verdicts

    searcher = _searcher(tmp_path, trials=4)
    for trial_id in ("asha", "budget", "broken", "done", "running"):
        assert searcher.suggest(trial_id) or trial_id == "running"
    searcher.on_trial_result("asha", {"step": 20, "objective": 7.0})
    searcher.on_trial_complete("asha", {"step": 20, "objective": 7.0})
    searcher.on_trial_complete("budget", {"step": 20, "objective": 9.0, budget.STOPPED_KEY: True})
    searcher.on_trial_complete("broken", {"step": 10}, error=True)
    searcher.on_trial_complete("done", {"step": STEPS, "objective": 5.0})
    found = verdicts.from_study(_study(tmp_path))
    assert set(found) == {"asha", "budget", "broken", "done"}  # a trial still running has none
    assert found["asha"] == verdicts.Verdict("PRUNED", 20, 7.0, (), "ASHA")
    assert found["budget"] == verdicts.Verdict("PRUNED", 20, 9.0, (), "time budget")
    assert found["broken"].state == "FAIL" and found["done"] == verdicts.Verdict("COMPLETE", values=(5.0,))
    searcher.on_trial_complete("asha", {"step": STEPS, "objective": 1.0})  # told again: Optuna keeps its end
    assert _by_tune_id(_study(tmp_path))["asha"].state == TrialState.PRUNED
    message = verdicts.failure_message("t1", "Traceback ...\nNonFiniteLossError: non-finite loss at step 16\n")
    assert "failed before the search was killed" in message and "non-finite loss at step 16" in message


