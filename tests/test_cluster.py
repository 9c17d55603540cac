"""Scale-out: the smoke search on a Ray cluster started with `ray start --head` on 127.0.0.1, logging to a real
`mlflow server` on 127.0.0.1 (artifacts served over HTTP)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.searchutil import (TINY, artifact_paths, files_holding, free_port, run_search, seed_cache, trial_runs,
                              wait_http)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


ADMIN = "pdcbdm-admin"


@pytest.fixture
def mlflow_server_started(tmp_path):
    """The README's recipe: ``mlflow server --app-name basic-auth`` (the admin's password from the environment,
    never in a file), on 127.0.0.1, started and not yet waited for (``mlflow_server`` waits). Yields (process,
    URI, user, password).

    Two settings the recipe leaves at MLflow's defaults, for the suite's time on 2 cores: one server process
    (``--workers 1``; the default 4 take most of the start), and MLflow's opt-in cache of successful credential
    checks (``auth_cache_ttl_seconds``): without it every request pays the password hash (0.3 s a request here,
    about 130 requests a search). A request without or with wrong credentials is checked as before."""
    port, password = free_port(), secrets.token_urlsafe(16)
    config = tmp_path / "auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                      f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = {ADMIN}\n"
                      f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      f"auth_cache_ttl_seconds = 600\n")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_AUTH_CONFIG_PATH": str(config),
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri",
           f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "server-artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc, f"http://127.0.0.1:{port}", ADMIN, password
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def mlflow_server(mlflow_server_started, ray_head):
    """(URI, user, password) of the basic-auth server once it answers. It starts before the Ray head and is waited
    for after it: the two start-ups overlap."""
    proc, uri, user, password = mlflow_server_started
    wait_http(f"{uri}/health", proc, 180)
    return uri, user, password


@pytest.fixture
def ray_head(tmp_path):
    """The README's recipe: a head started with ``RAY_AUTH_MODE=token`` and a token of its own (here in the
    environment: the test must not touch the user's ~/.ray/auth_token). Yields (address, dashboard URL, token)."""
    port, dashboard, token = free_port(), free_port(), secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    temp = Path("/tmp") / f"ray-test-{port}"  # short: Ray's socket paths must stay under 107 characters
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "2", "--num-gpus", "0", "--resources", '{"train_driver": 2}', "--temp-dir", str(temp),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", token
    finally:
        _stop_cluster(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def _stop_cluster(temp: str) -> None:
    """Kill this cluster's processes only (`ray stop` would stop every Ray instance on the machine): those whose
    command line names its temp folder, /tmp/ray-test-6379 but not /tmp/ray-test-63790 (another run's cluster)."""
    import psutil

    own = re.compile(re.escape(temp) + r"(?![\w-])")
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if own.search(" ".join(proc.info["cmdline"] or [])):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _status(url: str, headers: dict | None = None, data: bytes | None = None) -> int:
    """The HTTP status of a request (GET, or POST with ``data``)."""
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_search_on_a_token_ray_cluster_with_a_basic_auth_mlflow_server(tmp_path, mlflow_server, ray_head,
                                                                       search_cache, monkeypatch):
    uri, user, password = mlflow_server
    address, dashboard, token = ray_head
    # the closed recipe refuses strangers: MLflow without credentials, Ray's job API without the token
    search = f"{uri}/api/2.0/mlflow/runs/search"
    assert _status(search, data=b'{"experiment_ids": ["0"]}') == 401
    assert _status(f"{dashboard}/api/jobs/") == 401
    assert _status(f"{dashboard}/api/jobs/", {"Authorization": f"Bearer {token}"}) == 200
    out, shared = tmp_path / "out", tmp_path / "shared-storage"
    ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # Ray tries to join 20 times a second apart by default; the wrong token is refused at the first try
    stranger = run_search(tmp_path / "stranger", "stranger", "--address", address, "--tracking-uri", uri,
                          env={**ray_env, "RAY_AUTH_TOKEN": "not-the-token", "RAY_gcs_server_port_wait_time_s": "1"})
    assert stranger.returncode == 2, stranger.stdout[-3000:] + stranger.stderr[-3000:]
    assert "cannot join the Ray cluster" in stranger.stderr and "needs the head's token" in stranger.stderr
    assert "ray get-auth-token --generate" in stranger.stderr and token not in stranger.stderr
    # the MLflow password in the tracking URI's user info, another in the Optuna storage URL: the search works
    # with both, and neither (nor Ray's token) reaches a file, the server's records or the output
    login = uri.replace("http://", f"http://{user}:{password}@")
    study_password = secrets.token_hex(8)
    storage = f"sqlite:///{out / 'study.db'}?password={study_password}"
    proc = run_search(out, "cluster", "--trials", "1", "--no-asha", "--address", address, "--tracking-uri", login,
                      "--optuna-storage", storage, "--storage-path", str(shared), *TINY, env=ray_env,
                      cache=search_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"open the MLflow UI: open {uri}" in proc.stdout
    assert "uploading " in proc.stdout and " MiB (left out: " in proc.stdout
    hidden = {"MLflow password": password, "Ray token": token, "Optuna password": study_password}
    assert any(shared.rglob("searcher-state-*.pkl")) and any(shared.rglob("tuner.pkl"))
    assert files_holding(tmp_path, hidden) == []  # search folder, Tune's pickles, study, server db, artifacts
    assert [k for k, v in hidden.items() if v in proc.stdout + proc.stderr] == []
    # a resume needs the URLs again, from the flags or the environment: refused before Ray starts without them
    resume = ("--resume", str(out / "searches" / "cluster"), "--address", address)
    with ThreadPoolExecutor(2) as pool:  # both end before Ray starts: the two start-ups overlap
        no_uri = pool.submit(run_search, out, "ignored", *resume, env=ray_env)
        no_storage = pool.submit(run_search, out, "ignored", *resume, env={**ray_env, "MLFLOW_TRACKING_URI": login})
    refused = no_uri.result()
    assert refused.returncode == 2 and "MLFLOW_TRACKING_URI" in refused.stderr, refused.stderr[-3000:]
    refused = no_storage.result()
    assert refused.returncode == 2 and "PDCBDM_OPTUNA_STORAGE" in refused.stderr, refused.stderr[-3000:]
    assert not (out / "mlflow.db").exists()  # everything went to the server
    assert (shared / "cluster" / "tune").is_dir() and any((shared / "cluster" / "train").iterdir())
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    runs = trial_runs(uri, "cluster")
    assert len(runs) == 1 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert "fid" in run.data.metrics and "loss.pd_weight" in run.data.params
        files = artifact_paths(uri, run.info.run_id)
        assert "evaluation/per_class.parquet" in files and any(f.startswith("images/samples+step+") for f in files)
        assert run.outputs.model_outputs  # the EMA network as the run's MLflow model
    assert any((tmp_path / "server-artifacts").rglob("model.pt2"))  # stored by the server, not the client


# -- the search's own local Ray session: what reaches the nodes, and how -------------------------------------------

NODE_SECRET, SEARCH_SECRET = "pw-in-the-raylet-env-7f3a", "pw-the-search-ships-91c2"
PASSWORD = "MLFLOW_TRACKING_PASSWORD"


@pytest.fixture(scope="module")
def search_ray(tmp_path_factory):
    """The search's Ray session (``connect_ray``, local, with its dashboard), started with a tracking password and
    a feature cache in the environment, which its worker processes inherit as a node's would. Yields (plan,
    the node's cache folder, the dashboard's address)."""
    import ray

    from tune import search

    tmp = tmp_path_factory.mktemp("search-ray")
    saved = dict(os.environ)
    os.environ.update({PASSWORD: NODE_SECRET, "PDCBDM_CACHE": str(tmp / "node-cache")})
    try:
        p = search.plan(search.parse_args(["--preset", "smoke", "--out", str(tmp / "out"), "--name", "nodes"]))
        search.connect_ray(p)
        yield p, tmp / "node-cache", os.environ["RAY_API_SERVER_ADDRESS"]
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def _worker_side(config: dict) -> dict:
    """What a Train worker does with the trial's credentials (``receive_credentials``), and what it sees."""
    import json

    import ray

    from tune.worker import receive_credentials

    receive_credentials(config)
    return {"password": os.environ.get(PASSWORD), "runtime_env": json.dumps(ray.get_runtime_context().runtime_env)}


def _trial_side(settings) -> dict:
    """What a trial's function does (``share_credentials``) before its workers start; ``settings`` arrive as a
    task argument, through the object store, as ``tune.with_parameters`` sends them."""
    import json

    import ray

    from tune.trainable import share_credentials

    ref = share_credentials(settings.env)
    worker = ray.get(ray.remote(num_cpus=0)(_worker_side).remote({"secrets": ref}))
    return {"worker": worker, "runtime_env": json.dumps(ray.get_runtime_context().runtime_env)}


def test_credentials_reach_the_workers_through_the_object_store_not_the_runtime_env(search_ray, monkeypatch):
    import ray

    from tune import search

    p, _, dashboard = search_ray
    # the credential the search ships differs from the one its local workers inherited: only the object store
    # path can bring this one
    monkeypatch.setenv(PASSWORD, SEARCH_SECRET)
    settings = search.trial_settings(p, "0", "parent")
    assert settings.env[PASSWORD] == SEARCH_SECRET
    got = ray.get(ray.remote(num_cpus=0)(_trial_side).remote(settings))
    assert got["worker"]["password"] == SEARCH_SECRET
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    assert _status(f"{dashboard}/api/jobs/") == 401  # the search's own cluster wants its token too
    req = urllib.request.Request(f"{dashboard}/api/jobs/", headers=get_auth_headers_if_auth_enabled({}))
    with urllib.request.urlopen(req, timeout=30) as resp:
        jobs = resp.read().decode()
    assert "runtime_env" in jobs and "PYTHONPATH" in jobs  # the dashboard does show runtime envs
    for shown in (jobs, got["runtime_env"], got["worker"]["runtime_env"]):
        assert SEARCH_SECRET not in shown and NODE_SECRET not in shown, shown


def test_asset_check_ships_the_digits_network_and_names_a_node_without_data(search_ray, tmp_path, monkeypatch,
                                                                             digits_network):
    from pdcbdm.config import apply_overrides
    from tune.cluster import ClusterError, check_assets_for_cluster

    p, node_cache, _ = search_ray
    seed_cache(tmp_path / "driver", digits_network)  # the session's network, trained in the driver's cache
    monkeypatch.setenv("PDCBDM_CACHE", str(tmp_path / "driver" / "cache"))  # the driver's; the node's is node_cache
    check_assets_for_cluster(p.cfg, "127.0.0.1:6379")
    (trained,) = (tmp_path / "driver" / "cache").glob("digits-cnn-*.pt")
    assert (node_cache / trained.name).read_bytes() == trained.read_bytes()  # the driver's, shipped
    no_data = apply_overrides(p.cfg, ["data.dataset=cifar10-lt", f"data.root={tmp_path / 'nothing'}"])
    with pytest.raises(ClusterError, match=r"node \S+ \(\w{8}\): cannot load the data .*FileNotFoundError"):
        check_assets_for_cluster(no_data, "127.0.0.1:6379")
    check_assets_for_cluster(no_data, "local")  # one machine: the driver's own checks suffice
