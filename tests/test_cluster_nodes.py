"""Scale-out, and a node lost mid-trial: the smoke search on a two-node Ray cluster (a head and a second node
started with `ray start` on 127.0.0.1, token authentication on: docs/cluster-and-gpu.md's recipe), logging to a real `mlflow
server` with basic auth (artifacts served over HTTP), its Optuna study in a storage whose URL holds a password.
Each trial's two DDP ranks are spread one to a node (``--placement spread``); while the first trial trains, the
second node's raylet is killed with SIGKILL. Ray Train restarts the trial's worker group on the head from its last
checkpoint, and the search ends with Tune, Optuna and MLflow agreeing; no secret reaches a file or the output.

Where the ranks ran comes from Ray Train's own record of its runs (``RAY_TRAIN_ENABLE_STATE_TRACKING=1`` on the
nodes: every attempt of a Train run with each worker's rank, node and status), read from the head's dashboard
(``/api/train/v2/runs/v1``) after the search: the product records no node ids (the MLflow run's ``pdcbdm.device``
says "cpu")."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import optuna
import pandas as pd
import psutil
import pytest

from tests.searchutil import (ROOT, BasicAuthMlflowServer, artifact_paths, files_holding, free_port, http_status,
                              run_search, search_cmd, seed_cache, stop_ray_node, trial_runs)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
STEPS = ["--set", "train.steps=80", "--set", "train.eval_every=20", "--set", "train.log_every=10"]
PROGRESS = re.compile(r"\] (\w+) step 20/80: ")


@dataclass
class Cluster:
    """The two-node cluster: the head's GCS address and dashboard URL, its token, each node's temp folder."""

    address: str
    dashboard: str
    token: str
    head_temp: str
    node_temp: str

    @property
    def env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def get(self, path: str) -> Any:
        """A GET of the head's dashboard with the cluster's token; the JSON it answers."""
        req = urllib.request.Request(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _raylets(temp: str) -> list[psutil.Process]:
    """The raylet of the node whose temp folder is ``temp`` (not of one whose folder only starts with it)."""
    own = re.compile(re.escape(temp) + r"(?![\w-])")
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "raylet" and own.search(" ".join(proc.info["cmdline"] or [])):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _node_id(raylet: psutil.Process) -> str:
    (flag,) = [a for a in raylet.cmdline() if a.startswith("--node_id=")]
    return flag.split("=", 1)[1]


def _alive_nodes(cluster: Cluster) -> list[dict]:
    try:
        reply = cluster.get("/api/v0/nodes?limit=100")
    except OSError:  # the dashboard is still starting
        return []
    return [n for n in reply["data"]["result"]["result"] if n["state"] == "ALIVE"]


@contextmanager
def two_node_cluster(folder: Path, cache: Path | None) -> Iterator[Cluster]:
    """A head (1 CPU, the search's ``train_driver`` resource, its dashboard on 127.0.0.1) and a second node (1 CPU),
    each with its own temp folder (Ray takes ``--temp-dir`` per node) and its own feature cache (a copy of
    ``cache`` under ``folder``: a trial's rank 0 reads it on its node), sharing the head's token through the
    environment; waited for until both are alive. Their processes are killed by temp folder at the end
    (``stop_ray_node``)."""
    port, dashboard, token = free_port(), free_port(), secrets.token_hex(32)
    head_temp, node_temp = f"/tmp/ray-test-{port}", f"/tmp/ray-test-{port}-n2"  # short: socket paths < 107 chars
    # every Train run's attempts, with their workers' nodes, kept by a state actor on the head
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
    for node in ("head", "n2"):
        seed_cache(folder / node, cache)
    cluster = Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", token, head_temp, node_temp)
    try:
        _ray_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
                    "--num-gpus", "0", "--resources", '{"train_driver": 2}', "--temp-dir", head_temp,
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                    "--ray-client-server-port", str(free_port())],  # not 10001, which another cluster may hold
                   {**env, "PDCBDM_CACHE": str(folder / "head" / "cache")})
        _ray_start(["--address", cluster.address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                    "--num-gpus", "0", "--temp-dir", node_temp], {**env, "PDCBDM_CACHE": str(folder / "n2" / "cache")})
        deadline = time.monotonic() + 120
        while len(_alive_nodes(cluster)) < 2:
            assert time.monotonic() < deadline, f"the cluster did not show 2 alive nodes: {_alive_nodes(cluster)}"
            time.sleep(0.5)
        yield cluster
    finally:
        for temp in (node_temp, head_temp):
            stop_ray_node(temp)
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def cluster_and_tracking(tmp_path, search_cache):
    """(Cluster, the basic-auth MLflow server, started): the two start-ups overlap."""
    (tmp_path / "mlflow").mkdir()
    server = BasicAuthMlflowServer(tmp_path / "mlflow", free_port())
    with ThreadPoolExecutor(1) as pool:
        started = pool.submit(server.start)
        try:
            with two_node_cluster(tmp_path / "nodes", search_cache) as cluster:
                started.result()
                yield cluster, server
        finally:
            started.exception()  # wait for the start before stopping
            server.stop()


def _closed_to_strangers(cluster: Cluster, uri: str, tmp_path: Path) -> None:
    """MLflow without credentials and Ray's job API without the token are refused; a search with the wrong token
    is refused before it starts, saying how to get the right one."""
    assert http_status(f"{uri}/api/2.0/mlflow/runs/search", data=b'{"experiment_ids": ["0"]}') == 401
    assert http_status(f"{cluster.dashboard}/api/jobs/") == 401
    assert http_status(f"{cluster.dashboard}/api/jobs/", {"Authorization": f"Bearer {cluster.token}"}) == 200
    # Ray tries to join 20 times a second apart by default; the wrong token is refused at the first try
    stranger = run_search(tmp_path / "stranger", "stranger", "--address", cluster.address, "--tracking-uri", uri,
                          env={**cluster.env, "RAY_AUTH_TOKEN": "not-the-token", "RAY_gcs_server_port_wait_time_s": "1"})
    assert stranger.returncode == 2, stranger.stdout[-3000:] + stranger.stderr[-3000:]
    assert "cannot join the Ray cluster" in stranger.stderr and "needs the head's token" in stranger.stderr
    assert "ray get-auth-token --generate" in stranger.stderr and cluster.token not in stranger.stderr


def _wait_line(proc: subprocess.Popen, log: Path, pattern: re.Pattern, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.search(log.read_text())
        if found:
            return found
        assert proc.poll() is None, f"the search ended ({proc.returncode}) before {pattern.pattern!r}:\n" \
                                    f"{log.read_text()[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{pattern.pattern!r} not seen in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _train_runs(cluster: Cluster) -> dict[str, dict]:
    """Ray Train's record of its runs on the cluster, by run name (``train-TRIALID``): each with its attempts."""
    return {run["name"]: run for run in cluster.get("/api/train/v2/runs/v1")["train_runs"]}


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _gone(proc: psutil.Process) -> bool:
    """Ended (a zombie too: its parent, the raylet, was killed, and init may not reap at once)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_search_on_two_token_nodes_survives_losing_one_and_keeps_its_secrets(tmp_path, cluster_and_tracking,
                                                                               search_cache, monkeypatch):
    cluster, server = cluster_and_tracking
    uri = server.uri
    _closed_to_strangers(cluster, uri, tmp_path)
    (head,), (second,) = _raylets(cluster.head_temp), _raylets(cluster.node_temp)
    head_id, second_id = _node_id(head), _node_id(second)
    out, shared, log = tmp_path / "out", tmp_path / "shared-storage", tmp_path / "search.log"
    seed_cache(out, search_cache)
    # the MLflow password in the tracking URI's user info, another in the Optuna storage URL: the search works
    # with both, and neither (nor Ray's token) reaches a file, the server's records or the output
    study_password = secrets.token_hex(8)
    storage = f"sqlite:///{out / 'study.db'}?password={study_password}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(out / "cache"), **cluster.env}
    cmd = search_cmd(out, "nodes", "--trials", "2", "--no-asha", "--concurrency", "1", "--address",
                     cluster.address, "--tracking-uri", server.login, "--optuna-storage", storage, "--storage-path",
                     str(shared), "--workers-per-trial", "2", "--cpus-per-worker", "0.5", "--placement", "spread",
                     "--max-worker-failures", "2", *STEPS)
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        # the first trial's step-20 report came with its checkpoint: lose the second node now. Its rank there
        # outlives its raylet by 1 to 3 s (Ray's workers notice their raylet's death on a timer) and trains on:
        # 80 steps leave it time to die mid-training, not after the trial's last report. The search's driver
        # joined through the head's raylet (Ray prefers the head among the nodes of one host): it lives on
        first = _wait_line(proc, log, PROGRESS, timeout=300).group(1)
        ranks = [p for p in second.children(recursive=True) if _name(p) == "ray::RayTrainWorker"]
        second.send_signal(signal.SIGKILL)
        proc.wait(timeout=400)
        assert proc.returncode == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert _gone(second) and not _gone(head)
    assert len(ranks) == 1 and _gone(ranks[0])  # the trial's rank on the second node died with it
    assert f"open the MLflow UI: open {uri}" in output
    assert "uploading " in output and " MiB (left out: " in output
    hidden = {"MLflow password": server.password, "Ray token": cluster.token, "Optuna password": study_password}
    assert any(shared.rglob("searcher-state-*.pkl")) and any(shared.rglob("tuner.pkl"))
    assert files_holding(tmp_path, hidden) == []  # search folder, Tune's pickles, study, server db, artifacts
    assert [k for k, v in hidden.items() if v in output] == []
    _resume_needs_the_urls_again(out, cluster, server)

    # where the ranks ran: Ray Train's attempts of the first trial's run, one rank on each node, then (the
    # attempt that failed when the second node died) a new group on the head alone, which finished
    runs = _train_runs(cluster)
    attempts = sorted(runs[f"train-{first}"]["attempts"], key=lambda a: a["start_time_ns"])
    seen = [(a["status"], [w["node_id"] for w in sorted(a["workers"], key=lambda w: w["world_rank"])])
            for a in attempts]
    assert sorted(seen[0][1]) == sorted([head_id, second_id]), seen
    assert [status for status, _ in seen] == ["ERRORED"] * (len(seen) - 1) + ["FINISHED"], seen
    assert len(seen) >= 2 and seen[-1][1] == [head_id, head_id], seen
    others = [run for name, run in runs.items() if name != f"train-{first}"]
    assert [[[w["node_id"] for w in a["workers"]] for a in run["attempts"]] for run in others] == \
        [[[head_id, head_id]]]  # the second trial: one attempt, on the head

    # Tune's table: both trials completed
    folder = out / "searches" / "nodes"
    assert not (out / "mlflow.db").exists()  # everything went to the server
    assert (shared / "nodes" / "tune").is_dir() and any((shared / "nodes" / "train").iterdir())
    table = pd.read_parquet(folder / "trials.parquet")
    assert sorted(table["status"]) == ["completed", "completed"] and first in set(table["trial_id"]), table
    # MLflow: one finished run per trial; the first continued from the checkpoint it had before the node died
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
    runs_by_trial = {r.data.tags["pdcbdm.trial_id"]: r for r in trial_runs(uri, "nodes")}
    assert set(runs_by_trial) == set(table["trial_id"])
    assert {r.info.status for r in runs_by_trial.values()} == {"FINISHED"}
    resumed = runs_by_trial[first].data.metrics
    assert resumed.get("resumed_from_step") in (20.0, 40.0, 60.0), resumed  # a checkpoint, not the start
    # the run says where each attempt's ranks ran: spread over both nodes, then both on the head
    tags = runs_by_trial[first].data.tags
    assert sorted(tags["pdcbdm.nodes.step0"].split(",")) == sorted([head_id, second_id]), tags
    assert tags[f"pdcbdm.nodes.step{int(resumed['resumed_from_step'])}"] == f"{head_id},{head_id}", tags
    assert all("resumed_from_step" not in r.data.metrics for t, r in runs_by_trial.items() if t != first)
    for row in table.itertuples():
        run = runs_by_trial[row.trial_id]
        assert run.info.run_id == row.mlflow_run_id and run.data.tags["pdcbdm.outcome"] == "completed"
        assert run.data.metrics["fid"] == pytest.approx(row.fid)
        files = artifact_paths(uri, run.info.run_id)
        assert "evaluation/per_class.parquet" in files and any(f.startswith("images/samples+step+") for f in files)
        assert run.outputs.model_outputs  # the EMA network as the run's MLflow model
    assert any((tmp_path / "mlflow" / "server-artifacts").rglob("model.pt2"))  # stored by the server, not the client
    # Optuna: each trial COMPLETE with the table's FID; its best trial is the table's first
    study = optuna.load_study(study_name="nodes", storage=storage)
    by_trial = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    assert set(by_trial) == set(table["trial_id"])
    for row in table.itertuples():
        assert by_trial[row.trial_id].state == optuna.trial.TrialState.COMPLETE
        assert by_trial[row.trial_id].value == pytest.approx(row.fid)
    assert study.best_trial.user_attrs["tune_trial_id"] == table.iloc[0]["trial_id"] and table.iloc[0]["rank"] == 1


def _resume_needs_the_urls_again(out: Path, cluster: Cluster, server: BasicAuthMlflowServer) -> None:
    """search.json keeps the URLs masked: a --resume without them (flags or environment) is refused before Ray."""
    resume = ("--resume", str(out / "searches" / "nodes"), "--address", cluster.address)
    with ThreadPoolExecutor(2) as pool:  # both end before Ray starts: the two start-ups overlap
        no_uri = pool.submit(run_search, out, "ignored", *resume, env=cluster.env)
        no_storage = pool.submit(run_search, out, "ignored", *resume,
                                 env={**cluster.env, "MLFLOW_TRACKING_URI": server.login})
    refused = no_uri.result()
    assert refused.returncode == 2 and "MLFLOW_TRACKING_URI" in refused.stderr, refused.stderr[-3000:]
    refused = no_storage.result()
    assert refused.returncode == 2 and "PDCBDM_OPTUNA_STORAGE" in refused.stderr, refused.stderr[-3000:]
