"""Helpers for the end-to-end search tests: run tune/search.py, read the MLflow store back."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "train.steps=40", "--set", "train.eval_every=20", "--set", "train.log_every=10"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    """Wait until ``url`` answers HTTP 200 (a server ``proc`` started); fail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout:.0f} s")


class MlflowServer:
    """A plain `mlflow server` on ``store`` (sqlite) at 127.0.0.1:``port`` in its own session, which a test can
    stop (the whole session: its workers too) and start again on the same store and port."""

    def __init__(self, store: Path, port: int) -> None:
        self.store, self.port, self.proc = store, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def _args(self) -> list[str]:
        return ["--backend-store-uri", f"sqlite:///{self.store}", "--default-artifact-root",
                (self.store.parent / "artifacts").as_uri()]

    def _env(self) -> dict[str, str]:
        return {}

    def start(self, timeout: float = 120) -> str:
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", *self._args(), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self._env()}
        with open(self.store.parent / f"server-{time.monotonic_ns()}.log", "wb") as sink:
            self.proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        wait_http(f"{self.uri}/health", self.proc, timeout)
        return self.uri

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None


class BasicAuthMlflowServer(MlflowServer):
    """docs/cluster-and-gpu.md's recipe: ``mlflow server --app-name basic-auth`` (the admin's password from the environment,
    never in a file), artifacts served over HTTP (``--artifacts-destination``). ``user`` and ``password`` log in.

    Two settings the recipe leaves at MLflow's defaults, for the suite's time on 2 cores: one server process
    (``--workers 1``; the default 4 take most of the start), and MLflow's opt-in cache of successful credential
    checks (``auth_cache_ttl_seconds``): without it every request pays the password hash (0.3 s a request here,
    about 130 requests a search). A request without or with wrong credentials is checked as before."""

    user = "pdcbdm-admin"

    def __init__(self, folder: Path, port: int) -> None:
        super().__init__(folder / "server.db", port)
        self.folder, self.password = folder, secrets.token_urlsafe(16)
        self.config = folder / "auth.ini"
        self.config.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                               f"database_uri = sqlite:///{folder / 'auth.db'}\nadmin_username = {self.user}\n"
                               f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                               f"auth_cache_ttl_seconds = 600\n")

    def _args(self) -> list[str]:
        return ["--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{self.store}",
                "--artifacts-destination", str(self.folder / "server-artifacts")]

    def _env(self) -> dict[str, str]:
        return {"MLFLOW_AUTH_CONFIG_PATH": str(self.config), "MLFLOW_AUTH_ADMIN_PASSWORD": self.password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}

    @property
    def login(self) -> str:
        """The tracking URI with the credentials in its user info."""
        return self.uri.replace("http://", f"http://{self.user}:{self.password}@")


def http_status(url: str, headers: dict | None = None, data: bytes | None = None) -> int:
    """The HTTP status of a request (GET, or POST with ``data``)."""
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def search_cmd(out: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "tune" / "search.py"), "--preset", "smoke", "--out", str(out),
            "--name", name, *extra]


def seed_cache(out: Path, cache: Path | None) -> None:
    """Copy a filled feature cache (the digits network, reference statistics, floors: the ``search_cache`` fixture)
    into ``out/cache``, so that a test's search does not train and compute them again (about 40 s a search)."""
    if cache is not None:
        shutil.copytree(cache, out / "cache", dirs_exist_ok=True)


def run_search(out: Path, name: str, *extra: str, timeout: int = 600, env: dict | None = None,
               cache: Path | None = None, probe: Path | None = None) -> subprocess.CompletedProcess:
    """Run tune/search.py to its end. With ``probe``, every port its processes listen on while it runs is sent
    one unauthenticated request (``tests.netprobe``) and the answers are written to ``probe`` (JSON)."""
    seed_cache(out, cache)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(out / "cache"), **(env or {})}
    cmd = search_cmd(out, name, *extra)
    if probe is None:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    from tests.netprobe import ProbeWhileRunning

    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=full_env) as proc, ProbeWhileRunning(proc.pid) as watch:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    watch.save(probe)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def trial_runs(uri: str, search: str, experiment: str = "pdcbdm") -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`pdcbdm.search` = '{search}' and "
                              "tags.`pdcbdm.kind` = 'trial'", max_results=1000)


def artifact_paths(uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run, recursively."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out = []
    for item in client.list_artifacts(run_id, path):
        out += artifact_paths(uri, run_id, item.path) if item.is_dir else [item.path]
    return out


def files_holding(folder: Path, secrets: dict[str, str]) -> list[str]:
    """Every file under ``folder`` whose bytes hold one of ``secrets``, as 'PATH: which'."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {k}" for k, v in secrets.items() if v.encode() in data]
    return found


def stop_ray_node(temp: str) -> None:
    """Kill the processes of the Ray node(s) started with ``--temp-dir temp`` (`ray stop` would stop every Ray on
    the machine): those whose command line names the folder or that hold a file open under it (/tmp/ray-test-6379
    but not /tmp/ray-test-63790, another run's). The open files find what the command line misses: the agents
    (titled ``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``, which outlive a killed raylet) and the head's Ray
    client server (``-m ray.util.client.server``), all with their logs open in the node's session folder."""
    import re

    import psutil

    own = re.compile(re.escape(temp) + r"(?![\w-])")
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if own.search(" ".join(proc.info["cmdline"] or [])) or any(own.match(f.path) for f in proc.open_files()):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
