"""Scale-out: the smoke search on a Ray cluster started with `ray start --head` on 127.0.0.1, logging to a real
`mlflow server` on 127.0.0.1 (artifacts served over HTTP)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.searchutil import TINY, artifact_paths, run_search, trial_runs

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout}s")


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", 90, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def ray_head(tmp_path):
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    temp = Path("/tmp") / f"ray-test-{port}"  # short: Ray's socket paths must stay under 107 characters
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "2", "--num-gpus", "0", "--resources", '{"train_driver": 2}', "--temp-dir", str(temp)]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def _stop_cluster(temp: str) -> None:
    """Kill this cluster's processes only (`ray stop` would stop every Ray instance on the machine)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def test_search_on_a_ray_cluster_with_a_remote_mlflow_server(tmp_path, mlflow_server, ray_head):
    out = tmp_path / "out"
    shared = tmp_path / "shared-storage"
    proc = run_search(out, "cluster", "--trials", "2", "--no-asha", "--address", ray_head,
                      "--tracking-uri", mlflow_server, "--storage-path", str(shared), *TINY,
                      env={"RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"open the MLflow UI: open {mlflow_server}" in proc.stdout
    assert not (out / "mlflow.db").exists()  # everything went to the server
    assert (shared / "cluster" / "tune").is_dir() and any((shared / "cluster" / "train").iterdir())
    runs = trial_runs(mlflow_server, "cluster")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert "fid" in run.data.metrics and "loss.pd_weight" in run.data.params
        files = artifact_paths(mlflow_server, run.info.run_id)
        assert "checkpoint/checkpoint.pt" in files and "evaluation/per_class.parquet" in files
        assert any(f.startswith("samples/") for f in files)
    assert any((tmp_path / "server-artifacts").rglob("checkpoint.pt"))  # stored by the server, not the client
