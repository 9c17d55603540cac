"""MLflow for the search: one parent run per search, one child run per trial (found again by its trial id, so a
resumed search continues the same runs), metrics and artifacts logged by rank 0, run status set by the driver."""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlparse

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

TRIAL_TAG = "pdcbdm.trial_id"
SEARCH_TAG = "pdcbdm.search"
KIND_TAG = "pdcbdm.kind"


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message names the URI and the cause."""


def default_tracking_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def absolute_uri(uri: str) -> str:
    """A sqlite URI with a relative path (sqlite:///rel.db) made absolute, so that it names the same file from
    any working directory (a resumed search, a worker process); other URIs as given."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return f"{prefix}{Path(uri[len(prefix):]).resolve()}"
    return uri


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --port 5000"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail early, naming the URI, when an HTTP server does not answer or a sqlite file's folder is missing."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered HTTP {resp.status} on /health")
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it with "
                                f"`mlflow server --host HOST --port PORT` or pass another --tracking-uri") from None
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise TrackingError(f"MLflow sqlite store {uri}: folder {path.parent} does not exist")
    elif parsed.scheme in ("", "file"):
        raise TrackingError(f"MLflow tracking URI {uri!r}: MLflow 3 refuses the plain file store; use "
                            f"sqlite:////abs/path/mlflow.db or http://host:port")


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    """The experiment's id, creating it (with an absolute artifact location for local stores) if missing."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_root is not None and not uri.startswith(("http://", "https://")):
        location = (artifact_root.resolve() / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _find_run(client: MlflowClient, experiment_id: str, tag: str, value: str, kind: str) -> str | None:
    query = f"tags.`{tag}` = '{value}' and tags.`{KIND_TAG}` = '{kind}'"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def parent_run(uri: str, experiment_id: str, search: str, params: Mapping[str, Any]) -> str:
    """The search's parent run: found by the search name (resume; its kind tag tells it from the trial runs,
    which carry the search name too) or created."""
    client = MlflowClient(uri)
    run_id = _find_run(client, experiment_id, SEARCH_TAG, search, "search")
    if run_id is None:
        run = client.create_run(experiment_id, run_name=search, tags={SEARCH_TAG: search, KIND_TAG: "search"})
        run_id = run.info.run_id
        log_params(uri, run_id, params)
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


def trial_run(uri: str, experiment_id: str, parent_id: str, search: str, trial_id: str, trial_name: str,
              params: Mapping[str, Any]) -> str:
    """The trial's child run: the existing one of this trial id (a resumed or retried trial), or a new one."""
    client = MlflowClient(uri)
    run_id = _find_run(client, experiment_id, TRIAL_TAG, trial_id, "trial")
    if run_id is None:
        tags = {TRIAL_TAG: trial_id, SEARCH_TAG: search, KIND_TAG: "trial", "mlflow.parentRunId": parent_id}
        run_id = client.create_run(experiment_id, run_name=trial_name, tags=tags).info.run_id
        log_params(uri, run_id, params)
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, "" if v is None else str(v)[:6000]) for k, v in params.items()]
    client = MlflowClient(uri)
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    client = MlflowClient(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Log the numeric entries of ``metrics`` at ``step`` (None and non-numbers are skipped)."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    client = MlflowClient(uri)
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i:i + 500])


def log_artifacts(uri: str, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def finish_run(uri: str, run_id: str, status: str, error: str | None = None) -> None:
    """Mark a run FINISHED / FAILED / KILLED; a failure's text goes into a tag and an artifact-free note."""
    client = MlflowClient(uri)
    if error:
        client.set_tag(run_id, "pdcbdm.error", error[:5000])
        client.set_tag(run_id, "mlflow.note.content", f"Trial failed:\n\n```\n{error[:20000]}\n```")
    client.set_terminated(run_id, status=status)


def kill_unfinished(uri: str, experiment_id: str, search: str, parent_id: str) -> int:
    """Mark the search's trial runs that are still RUNNING (or SCHEDULED) KILLED, then its parent run; returns the
    number of trial runs marked. A resumed search sets them RUNNING again when it continues them."""
    client = MlflowClient(uri)
    unfinished = [r for r in runs_of_search(uri, experiment_id, search) if r.info.status in ("RUNNING", "SCHEDULED")]
    for run in unfinished:
        client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent_id, status="KILLED")
    return len(unfinished)


def trial_run_id(uri: str, experiment_id: str, trial_id: str) -> str | None:
    return _find_run(MlflowClient(uri), experiment_id, TRIAL_TAG, trial_id, "trial")


def runs_of_search(uri: str, experiment_id: str, search: str) -> list[Any]:
    client = MlflowClient(uri)
    return client.search_runs([experiment_id], filter_string=f"tags.`{SEARCH_TAG}` = '{search}' and "
                              f"tags.`{KIND_TAG}` = 'trial'", max_results=10_000)


def env_for_workers() -> dict[str, str]:
    """Environment the trial processes need to reach the same store (credentials of a remote server)."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
            "MLFLOW_TRACKING_INSECURE_TLS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")
    return {k: os.environ[k] for k in keys if k in os.environ}
