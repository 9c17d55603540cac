"""A search's winner in MLflow's model registry (tune/registry.py), in a real sqlite store: the rank-1 trial's
network registered as ``pdcbdm-<search>`` with the alias ``best``, ``models:/NAME@best`` loaded by the pipelines'
model source (pinned to its version, through the same safe loader), ``pipelines.confirm`` moving the alias to the
confirmed winner, the experiment's kind tag, and a planted registry version refused like a planted run model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from pdcbdm.presets import preset
from pdcbdm.training import CheckpointError
from pdcbdm.training.trainer import build_network
from pipelines import confirm as cf
from pipelines.evaluate import log_to_run
from pipelines.model_source import load_network, source_name
from tests.searchutil import MlflowServer, free_port
from tune import registry, tracking
from tune.mlflow_model import log_ema_model
from tune.report import register
from tune.tags import BEST_MODEL_TAG, EXPERIMENT_KIND_TAG, SEARCH_ID_TAG, VERSIONS_TAG

SHAPE = (1, 16, 16)
NUM_CLASSES = 10
SEARCH = "reg"


def _payload() -> dict:
    return {"config": preset("smoke").to_dict(), "num_classes": NUM_CLASSES, "class_counts": [5] * NUM_CLASSES,
            "image_shape": list(SHAPE), "class_names": [f"c{k}" for k in range(NUM_CLASSES)], "step": 7}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A search's records as tune/search.py leaves them: the experiment, the parent run, two trial runs each with
    its logged EMA network (different weights), and a ranked table naming them."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    experiment = tracking.ensure_experiment(uri, "pdcbdm", tmp / "mlartifacts")
    parent = tracking.parent_run(uri, experiment, SEARCH, {}, search_id="sid-1")
    nets, runs = [], []
    for i in range(2):
        torch.manual_seed(i)
        nets.append(build_network(preset("smoke"), NUM_CLASSES, SHAPE).eval())
        runs.append(tracking.trial_run(uri, experiment, parent, SEARCH, f"t{i + 1}", f"trial-{i + 1}", {},
                                       search_id="sid-1"))
        log_ema_model(uri, runs[-1], nets[-1], _payload())
    mlflow.set_tracking_uri(before)  # log_ema_model sets MLflow's global URI; the search's driver has none
    table = pd.DataFrame([
        {"rank": 1, "trial_id": "t1", "status": "completed", "fid": 22.7, "fid_floor": 11.9, "fid_floor_std": 1.6,
         "mlflow_run_id": runs[0]},
        {"rank": 2, "trial_id": "t2", "status": "completed", "fid": 25.3, "fid_floor": 11.9, "fid_floor_std": 1.6,
         "mlflow_run_id": runs[1]},
    ])
    yield SimpleNamespace(uri=uri, tmp=tmp, experiment=experiment, parent=parent, runs=runs, nets=nets, table=table,
                          client=MlflowClient(uri), name=registry.registered_name(SEARCH))
    mlflow.set_tracking_uri(before)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_experiment_is_tagged_as_model_training(store):
    tags = store.client.get_experiment(store.experiment).tags
    assert tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    store.client.set_experiment_tag(store.experiment, EXPERIMENT_KIND_TAG, "genai_development")
    assert tracking.ensure_experiment(store.uri, "pdcbdm", None) == store.experiment  # a user's choice is kept
    assert store.client.get_experiment(store.experiment).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    store.client.set_experiment_tag(store.experiment, EXPERIMENT_KIND_TAG, "custom_model_development")


def test_the_ui_command_names_the_training_runs_page():
    line = tracking.ui_command("sqlite:////x/mlflow.db", "3")
    assert line == ("mlflow ui --backend-store-uri sqlite:////x/mlflow.db --port 5000, then open "
                    "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning")
    assert tracking.ui_command("http://h:5000/", "3") == \
        "open http://h:5000/#/experiments/3/runs?workflowType=machine_learning in a browser"


def test_the_search_registers_rank_1_with_alias_best(store, capsys):
    assert mlflow.get_tracking_uri() != store.uri  # registered through the store given, not MLflow's global one
    register(store.uri, store.parent, store.table)
    assert "models:/pdcbdm-reg@best (version 1 of pdcbdm-reg" in capsys.readouterr().out
    version = store.client.get_model_version_by_alias(store.name, "best")
    assert version.version == 1 and version.run_id == store.runs[0]
    model = registry.logged_model(store.client, store.runs[0])
    assert version.source == model.artifact_location and "/models/m-" in version.source
    assert {k: version.tags[k] for k in ("pdcbdm.trial_id", "fid", "fid_floor", "fid_floor_std")} == \
        {"pdcbdm.trial_id": "t1", "fid": "22.7", "fid_floor": "11.9", "fid_floor_std": "1.6"}
    assert version.tags[SEARCH_ID_TAG] == "sid-1"
    assert store.client.get_run(store.parent).data.tags[BEST_MODEL_TAG] == "models:/pdcbdm-reg@best"
    logged = store.client.get_logged_model(model.model_id)
    assert json.loads(logged.tags[VERSIONS_TAG]) == [{"name": store.name, "version": "1"}]
    # a resumed search's end registers nothing twice
    assert registry.register_best(store.uri, store.table, SEARCH, "sid-1")[0] == "1"
    assert len(store.client.search_model_versions(f"name = '{store.name}'")) == 1


def test_no_registration_without_a_logged_model(store):
    table = store.table.assign(mlflow_run_id=[store.parent, store.runs[1]])  # the parent run logged no model
    version, line = registry.register_best(store.uri, table, "other", "sid-2")
    assert version is None and "has no logged model" in line
    stopped = store.table.assign(status="stopped")
    assert registry.register_best(store.uri, stopped, "other", "sid-2") == (None, "no network registered: no "
                                                                                   "completed trial")


def test_models_uri_best_loads_the_registered_network(store):
    registry.register_best(store.uri, store.table, SEARCH, "sid-1")
    mlflow.set_tracking_uri(store.uri)  # what --tracking-uri does in evaluate and generate
    net, cfg, data = load_network("models:/pdcbdm-reg@best", "ema")
    assert _same_weights(net, store.nets[0]) and cfg.model == preset("smoke").model
    assert data["source"] == "models:/pdcbdm-reg/1" and data["registered"]["alias"] == "best"
    assert data["registered"]["run_id"] == store.runs[0]
    assert source_name("models:/pdcbdm-reg@best", data) == "models:/pdcbdm-reg/1"  # what metrics.json names
    by_number, _, _ = load_network("models:/pdcbdm-reg/1", "ema")
    assert _same_weights(by_number, store.nets[0])
    with pytest.raises(CheckpointError, match="models:/pdcbdm-reg@nope"):
        load_network("models:/pdcbdm-reg@nope", "ema")
    with pytest.raises(CheckpointError, match="models:/pdcbdm-missing/1"):
        load_network("models:/pdcbdm-missing/1", "ema")


def test_evaluate_logs_a_registered_models_metrics_to_its_run(store):
    registry.register_best(store.uri, store.table, SEARCH, "sid-1")
    mlflow.set_tracking_uri(store.uri)
    summary = {"checkpoint": "models:/pdcbdm-reg/1", "best": {"fid": 21.5}, "best_guidance": 1.0, "step": 7}
    assert log_to_run("models:/pdcbdm-reg@best", summary) == store.runs[0]
    assert store.client.get_run(store.runs[0]).data.metrics["evaluate_fid"] == 21.5


def test_confirm_moves_best_to_the_confirmed_winner(store, tmp_path):
    registry.register_best(store.uri, store.table, SEARCH, "sid-1")
    folder = tmp_path / "searches" / SEARCH
    folder.mkdir(parents=True)
    (folder / "search.json").write_text(json.dumps({"name": SEARCH, "args": {}, "config": {}}))
    configs = [{"config_rank": r, "trial_id": f"t{r}", "mlflow_run_id": store.runs[r - 1]} for r in (1, 2)]
    # over the new seeds rank 2 is lower: it wins, and its network (not registered yet) becomes best
    summary = pd.DataFrame([{"config_rank": 1, "trial_id": "t1", "n": 3, "fid_mean": 26.0, "fid_std": 4.0},
                            {"config_rank": 2, "trial_id": "t2", "n": 3, "fid_mean": 23.0, "fid_std": 5.0}])
    lead = cf.lead_test([22.0, 26.0, 30.0], [18.0, 23.0, 28.0])
    plan = SimpleNamespace(args=SimpleNamespace(search=str(folder)), uri=store.uri, name="confirm-reg")
    line = cf.promote_winner(plan, "parent123", summary, configs, lead)
    assert line == "models:/pdcbdm-reg@best is now version 2 (the confirmed winner's network)"
    best = store.client.get_model_version_by_alias(store.name, "best")
    assert best.version == 2 and best.run_id == store.runs[1]
    assert best.tags["pdcbdm.confirm.verdict"] == lead["verdict"] and best.tags["pdcbdm.confirm.search_rank"] == "2"
    assert best.tags["pdcbdm.confirm.fid_mean"] == "23" and best.tags["pdcbdm.confirm.seeds"] == "3"
    assert best.tags["pdcbdm.confirm.parent_run"] == "parent123"
    mlflow.set_tracking_uri(store.uri)
    assert _same_weights(load_network("models:/pdcbdm-reg@best", "ema")[0], store.nets[1])
    # too few finished runs: the alias stays
    few = summary.assign(n=1)
    assert "not moved: no configuration has 2 finished runs" in cf.promote_winner(plan, "p", few, configs, lead)
    assert store.client.get_model_version_by_alias(store.name, "best").version == 2
    store.client.set_registered_model_alias(store.name, "best", "1")  # back for the other tests


def test_a_planted_registered_version_is_refused_like_a_planted_run_model(store, tmp_path):
    """A version whose source is a pickled MLflow model with a code folder (someone else's registration): the
    files are copied and refused; nothing of them is imported."""
    mlflow.set_tracking_uri(store.uri)
    template = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{store.runs[0]}/model",
                                                        dst_path=str(tmp_path / "t")))
    planted = tmp_path / "planted"
    shutil.copytree(template, planted)
    marker = tmp_path / "ran"
    (planted / "code").mkdir()
    (planted / "code" / "payload.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    store.client.create_registered_model("planted")
    store.client.create_model_version("planted", source=planted.as_uri())
    store.client.set_registered_model_alias("planted", "best", "1")
    with pytest.raises(CheckpointError, match="code folder"):
        load_network("models:/planted@best", "ema")
    assert not marker.exists()


def test_a_tracking_server_registers_and_serves_the_winner(tmp_path):
    """The same through `mlflow server` (artifacts on its file root): the server accepts the logged model's folder
    as the version's source, and models:/NAME@best loads over HTTP."""
    server = MlflowServer(tmp_path / "server.db", free_port())
    before = mlflow.get_tracking_uri()
    try:
        uri = server.start()
        experiment = tracking.ensure_experiment(uri, "pdcbdm", None)
        parent = tracking.parent_run(uri, experiment, SEARCH, {}, search_id="sid-9")
        run = tracking.trial_run(uri, experiment, parent, SEARCH, "t1", "trial-1", {}, search_id="sid-9")
        torch.manual_seed(3)
        net = build_network(preset("smoke"), NUM_CLASSES, SHAPE).eval()
        log_ema_model(uri, run, net, _payload())
        table = pd.DataFrame([{"rank": 1, "trial_id": "t1", "status": "completed", "fid": 30.0,
                               "mlflow_run_id": run}])
        assert registry.register_best(uri, table, SEARCH, "sid-9")[0] == "1"
        assert registry.pin("models:/pdcbdm-reg@best", MlflowClient(uri)).run_id == run
        loaded, _, data = load_network("models:/pdcbdm-reg@best", "ema")  # log_ema_model set the server's URI
        assert _same_weights(loaded, net) and data["source"] == "models:/pdcbdm-reg/1"
    finally:
        server.stop()
        mlflow.set_tracking_uri(before)
