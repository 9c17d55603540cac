"""The MLflow records of a search without Ray: outcome tags, the best trial's command, the parent run's summary
(ranked table, Optuna plots with and without enough trials) in a real sqlite store."""

from __future__ import annotations

import json
import shlex

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient

from pdcbdm.config import apply_overrides
from pdcbdm.presets import preset
from tune.report import best_command, optuna_figures, record_search
from tune.results import completion_outcome, failure_outcome
from tune import tags
from tune.tags import BEST_COMMAND_TAG


def test_outcome_words():
    assert completion_outcome(40, 40) == "completed"
    assert completion_outcome(20, 40) == "early-stopped by ASHA at step 20"
    assert failure_outcome("Traceback ...\n  File x\nNonFiniteLossError: loss is nan at step 25\n") == \
        "failed: NonFiniteLossError: loss is nan at step 25"
    assert failure_outcome(None) == "failed: unknown error"


def test_best_command_reproduces_the_trials_config():
    row = pd.Series({"trial_id": "ab_00001", "loss.pd_weight": 0.025, "loss.label_dist": "uniform",
                     "model.tsa_resolutions": "8", "loss.cbdm_tau": float("nan")})
    command = best_command("smoke", ["train.steps=40"], row)
    argv = shlex.split(command)
    assert argv[:5] == ["python", "-m", "pdcbdm.train", "--preset", "smoke"]
    assert argv[-2:] == ["--out", "runs/best-ab_00001"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert "loss.cbdm_tau=nan" not in sets  # a value the trial did not have is not pinned
    cfg = apply_overrides(preset("smoke"), sets)  # the command's overrides are valid config fields
    assert cfg.loss.pd_weight == 0.025 and cfg.loss.label_dist == "uniform" and cfg.train.steps == 40


def _study(values: list[float]) -> optuna.Study:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for v in values:
        trial = study.ask()
        trial.suggest_float("loss.pd_weight", 1e-3, 1.0, log=True)
        trial.suggest_categorical("loss.label_dist", ["inverted", "uniform"])
        study.tell(trial, v)
    return study


def _figure_text(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in [*ax.texts, ax.title, ax.xaxis.label, ax.yaxis.label])


def test_optuna_figures_say_when_there_are_too_few_trials():
    import matplotlib.pyplot as plt

    few = optuna_figures(_study([3.0]))
    assert set(few) == {"optuna/param_importances.png", "optuna/parallel_coordinate.png"}
    assert all("too few to rank" in _figure_text(f) for f in few.values())
    # 3 trials draw parallel coordinates but do not rank 2 parameters (two completed trials per parameter)
    three = optuna_figures(_study([3.0, 1.0, 2.0]))
    assert "too few to rank 2" in _figure_text(three["optuna/param_importances.png"])
    assert "too few" not in _figure_text(three["optuna/parallel_coordinate.png"])
    enough = optuna_figures(_study([3.0, 1.0, 2.0, 5.0]))
    assert all("too few" not in _figure_text(f) for f in enough.values())
    assert "over 4 completed trials" in _figure_text(enough["optuna/param_importances.png"])
    assert "bootstrap" in _figure_text(enough["optuna/param_importances.png"])
    assert "loss.pd_weight" in _figure_text(enough["optuna/param_importances.png"]) or \
        any("loss.pd_weight" in t.get_text() for ax in enough["optuna/param_importances.png"].axes
            for t in ax.get_yticklabels())
    for fig in [*few.values(), *three.values(), *enough.values()]:
        plt.close(fig)


def test_parent_run_summary_in_a_real_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("s", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp).info.run_id
    table = pd.DataFrame([
        {"rank": 1, "trial_id": "t2", "status": "completed", "loss.pd_weight": 0.05, "fid": 50.0,
         "best_guidance": 1.0, "mlflow_run_id": None},
        {"rank": 2, "trial_id": "t1", "status": "stopped", "loss.pd_weight": 0.5, "fid": None,
         "best_guidance": None, "mlflow_run_id": None},
    ])
    command = record_search(uri, parent, table, _study([3.0]), "smoke", [])
    files = {a.path for a in client.list_artifacts(parent)} | {a.path for a in client.list_artifacts(parent, "optuna")}
    assert {"trials.json", "optuna/param_importances.png", "optuna/parallel_coordinate.png"} <= files
    assert client.get_run(parent).data.tags[BEST_COMMAND_TAG] == command and "loss.pd_weight=0.05" in command
    assert client.download_artifacts(parent, "best_trial/command.txt", str(tmp_path))
    back = json.loads(open(client.download_artifacts(parent, "trials.json", str(tmp_path))).read())
    assert [row[back["columns"].index("trial_id")] for row in back["data"]] == ["t2", "t1"]  # pandas "split"


def test_no_command_without_a_completed_trial(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("s", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    table = pd.DataFrame([{"rank": 1, "trial_id": "t1", "status": "stopped", "fid": None, "mlflow_run_id": None}])
    assert record_search(uri, parent, table, _study([]), "smoke", []) is None
    assert BEST_COMMAND_TAG not in client.get_run(parent).data.tags


def test_scoring_facts_and_tag_names_keep_their_wire_format():
    """An evaluator's scoring facts land under the tags runs have always carried, and no two constants of
    tune/tags.py name the same tag."""
    assert tags.scoring_tags({"reference_kind": "balanced-train", "judge": "none"}) == {
        "pdcbdm.reference_kind": "balanced-train", "pdcbdm.judge": "none"}
    names = [v for k, v in vars(tags).items() if k.endswith("_TAG")]
    assert len(names) == len(set(names)) and tags.nodes_tag(0) == "pdcbdm.nodes.step0"
