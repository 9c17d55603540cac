"""A trial's MLflow logging survives a tracking-server outage: a real `mlflow server` on 127.0.0.1 is stopped while
the trial's logger writes, and started again on the same store; the held records arrive in order, and a server
still gone at the trial's end fails it."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import mlflow
from mlflow.tracking import MlflowClient

from tests.searchutil import MlflowServer, free_port
from tune.run_logger import RankZeroLogger, TrackingUnavailable

pytestmark = pytest.mark.slow


@contextmanager
def _server(store: Path, port: int):
    """`mlflow server` on ``store`` at 127.0.0.1:``port`` while the block runs."""
    server = MlflowServer(store, port)
    try:
        yield server.start()
    finally:
        server.stop()


def test_records_are_held_through_an_outage_and_a_server_gone_at_the_end_fails_the_trial(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    store, port = tmp_path / "mlflow.db", free_port()
    with _server(store, port) as uri:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        log = RankZeroLogger(uri, run_id, patience_s=90)
        log.metrics({"loss": 1.0}, 1)
    # the server is gone: training goes on, every record is held in order
    log.metrics({"loss": 0.5}, 2, wait=False)
    log.tags({"pdcbdm.stage": "during the outage"})
    log.metrics({"proxy_fid": 40.0}, 2)
    grid = tmp_path / "evaluation" / "samples.png"  # an evaluation's file, its folder removed before the server is back
    grid.parent.mkdir()
    grid.write_bytes(b"\x89PNG not really")
    log.files([grid], "evaluation")
    shutil.rmtree(grid.parent)
    log.flush()  # an evaluation's flush: no wait, nothing raised
    assert log.held == 4 and "MLflow is unreachable" in capsys.readouterr().err
    with _server(store, port) as uri:
        log.metrics({"proxy_fid": 30.0}, 3)  # the next record writes the held ones first
        assert log.held == 0
        run = MlflowClient(uri).get_run(run_id)
        history = [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "loss")]
        assert history == [(1, 1.0), (2, 0.5)] and run.data.tags["pdcbdm.stage"] == "during the outage"
        assert [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "proxy_fid")] == [
            (2, 40.0), (3, 30.0)]
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="evaluation/samples.png",
                                                       tracking_uri=uri, dst_path=str(tmp_path / "got")))
        assert got.read_bytes() == b"\x89PNG not really" and log._held_files is None  # its copy removed
    # gone again at the trial's end: the final flush waits out its patience, then fails the trial
    log.patience_s = 2
    log.metrics({"fid": 20.0}, 4)
    with pytest.raises(TrackingUnavailable, match="stayed unreachable for 2 s at the trial's end: 1 record"):
        log.flush(final=True)


def test_a_trial_shorter_than_the_system_metrics_interval_still_logs_one_sample(tmp_path):
    """MLflow's monitor logs its first point after one interval and drops the samples it took since its last
    point when it stops; the logger logs one point at the start and publishes the rest at the end, so a short
    trial (a 40-step smoke trial ends in seconds) has its system metrics too."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("short")).info.run_id
    log = RankZeroLogger(uri, run_id)
    log.start_system_metrics(interval_s=60.0)
    # a trial ASHA stops is ended by Ray, without close(): its first point is in already
    assert any(k.startswith("system/cpu") for k in client.get_run(run_id).data.metrics)
    log.close()
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(history) == 2  # and the samples since, published at the end
