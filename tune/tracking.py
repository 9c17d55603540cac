"""MLflow for the search: one parent run per search, one child run per trial (found again by its trial id, so a
resumed search continues the same runs), metrics and artifacts logged by rank 0, run status set by the driver.

MLflow's own record types are used wherever the UI has a view for them: ``log_image(key=, step=)`` for the sample
grids during training (the UI's step slider), ``log_table`` (the UI's table view), ``log_dict`` for JSON,
``log_figure`` for plots, ``log_inputs`` for the training data, and each run's end as the ``OUTCOME_TAG`` tag.
"""

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
# how a trial's run ended, in words: "completed", "early-stopped by ASHA at step N", "failed: REASON", "killed"
# (MLflow's status says FINISHED for the first two)
OUTCOME_TAG = "pdcbdm.outcome"
# a hash of a trial's resolved config (seed and evaluation settings included): two runs with the same key trained
# and scored the same thing, so a grid (tune/grid.py) reuses a FINISHED, completed run instead of training again
CONFIG_KEY_TAG = "pdcbdm.config_key"
CELL_TAG = "pdcbdm.cell"  # a grid cell's name (``variant-sSEED``, ``rank1-s1000``): the run of that cell


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


def parent_run(uri: str, experiment_id: str, search: str, params: Mapping[str, Any], kind: str = "search") -> str:
    """The search's parent run: found by the search name (resume; its kind tag tells it from the trial runs,
    which carry the search name too) or created. ``kind``: "search", or a grid's ("ablation", "confirm")."""
    client = MlflowClient(uri)
    run_id = _find_run(client, experiment_id, SEARCH_TAG, search, kind)
    if run_id is None:
        run = client.create_run(experiment_id, run_name=search, tags={SEARCH_TAG: search, KIND_TAG: kind})
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


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, Any], step: int,
                synchronous: bool = True) -> list[Any]:
    """Log the numeric entries of ``metrics`` at ``step`` (None and non-numbers are skipped). With
    ``synchronous=False`` MLflow's async queue sends them and the returned operations' ``wait()`` confirms it."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    client = MlflowClient(uri)
    pending = []
    for i in range(0, len(items), 500):
        op = client.log_batch(run_id, metrics=items[i:i + 500], synchronous=synchronous)
        if op is not None:
            pending.append(op)
    return pending


def log_image(uri: str, run_id: str, path: Path, key: str, step: int) -> None:
    """A PNG as one step of the image series ``key`` (the run page's step slider)."""
    import mlflow

    MlflowClient(uri).log_image(run_id, mlflow.Image(str(path)), key=key, step=step, synchronous=True)


def log_image_file(uri: str, run_id: str, path: Path, artifact_file: str) -> None:
    """A PNG as a static image artifact (shown in the artifact view)."""
    import mlflow

    MlflowClient(uri).log_image(run_id, mlflow.Image(str(path)), artifact_file=artifact_file)


def log_table(uri: str, run_id: str, table: Any, artifact_file: str) -> None:
    """A DataFrame as an MLflow table: a JSON artifact the UI shows as a table (MLflow appends the rows to an
    existing file of the same name)."""
    MlflowClient(uri).log_table(run_id, data=table, artifact_file=artifact_file)


def log_dict(uri: str, run_id: str, data: Any, artifact_file: str) -> None:
    """A dict or list as a JSON (or YAML, by the file's extension) artifact."""
    MlflowClient(uri).log_dict(run_id, data, artifact_file)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    """A text artifact."""
    MlflowClient(uri).log_text(run_id, text, artifact_file)


def log_figure(uri: str, run_id: str, figure: Any, artifact_file: str) -> None:
    """A matplotlib figure as an image artifact."""
    MlflowClient(uri).log_figure(run_id, figure, artifact_file)


def log_training_data(uri: str, run_id: str, images: Any, labels: Any, name: str, source: Mapping[str, str]) -> None:
    """The training set as the run's dataset input (context "training"): its name, a digest of every image and
    label (so two runs on the same data show the same digest), its shapes; the arrays are not uploaded."""
    import hashlib

    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    # the digest is given, so MLflow only reads the arrays' shapes and dtypes (schema and profile)
    dataset = mlflow.data.from_numpy(images, targets=labels, name=name, digest=digest,
                                     source=CodeDatasetSource(tags=dict(source)))
    tag = InputTag(key="mlflow.data.context", value="training")
    MlflowClient(uri).log_inputs(run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[tag])])


def log_artifacts(uri: str, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def finish_run(uri: str, run_id: str, status: str, error: str | None = None, outcome: str | None = None) -> None:
    """Mark a run FINISHED / FAILED / KILLED; a failure's text goes into a tag and an artifact-free note;
    ``outcome`` (how it ended, in words) into ``OUTCOME_TAG``."""
    client = MlflowClient(uri)
    if outcome:
        client.set_tag(run_id, OUTCOME_TAG, outcome[:500])
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
        client.set_tag(run.info.run_id, OUTCOME_TAG, "killed")
        client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent_id, status="KILLED")
    return len(unfinished)


def config_key(cfg: Mapping[str, Any]) -> str:
    """The content key of a resolved config (``Config.to_dict()``): 16 hex digits of the sha256 of its sorted JSON."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_run(uri: str, experiment_id: str, key: str) -> Any | None:
    """The latest run of ``experiment_id`` that trained the config with this ``config_key`` to the end (FINISHED,
    outcome "completed"), or None."""
    query = (f"tags.`{CONFIG_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED' and "
             f"tags.`{OUTCOME_TAG}` = 'completed' and tags.`{KIND_TAG}` = 'trial'")
    runs = MlflowClient(uri).search_runs([experiment_id], filter_string=query, max_results=1,
                                         order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def cell_run(uri: str, experiment_id: str, search: str, cell: str) -> Any | None:
    """The latest trial run of grid ``search`` for ``cell`` (a re-run's retry of a failed cell is newer)."""
    query = f"tags.`{SEARCH_TAG}` = '{search}' and tags.`{CELL_TAG}` = '{cell}' and tags.`{KIND_TAG}` = 'trial'"
    runs = MlflowClient(uri).search_runs([experiment_id], filter_string=query, max_results=1,
                                         order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


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
