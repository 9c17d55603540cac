"""MLflow for the search: one parent run per search, one child run per trial (found again by its trial id, so a
resumed search continues the same runs), metrics and artifacts logged by rank 0, run status set by the driver.

MLflow's own record types are used wherever the UI has a view for them: ``log_image(key=, step=)`` for the sample
grids during training (the UI's step slider), ``log_table`` (the UI's table view), ``log_dict`` for JSON,
``log_figure`` for plots, ``log_inputs`` for the training data, and each run's end as the ``OUTCOME_TAG`` tag.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import unquote, urlparse, urlsplit

import mlflow
import mlflow.data
import requests
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tune import redact
from tune.redact import redact_text, redact_url
from tune.tags import (CELL_TAG, CODE_VERSION_TAG, CONFIG_KEY_TAG, DATA_CONTEXT_TAG, ERROR_TAG, EXPERIMENT_KIND_TAG,
                       EXTRACTOR_TAG, KIND_TAG, NOTE_CONTENT_TAG, OUTCOME_TAG, PARENT_RUN_ID_TAG, SEARCH_ID_TAG,
                       SEARCH_TAG, TRIAL_TAG)

# the EXPERIMENT_KIND_TAG value a user sets by choosing "Model training" over "GenAI" in MLflow's UI
EXPERIMENT_KIND = "custom_model_development"
UI_PORT = 5000


TRACKING_ENV = redact.TRACKING_ENV
# what MLflow sends a tracking server to authenticate: never to a host the user did not name (``recorded_uri``)
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_TRACKING_CLIENT_CERT_PATH")
# what a trial process needs besides the URI to reach the store and its artifacts (``env_for_workers``)
WORKER_ENV_PREFIXES = ("MLFLOW_TRACKING_", "AWS_")
WORKER_ENV_KEYS = ("MLFLOW_S3_ENDPOINT_URL", "REQUESTS_CA_BUNDLE")


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message names the URI (its secrets masked) and the cause."""


def default_tracking_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def absolute_uri(uri: str) -> str:
    """A sqlite URI with a relative path (sqlite:///rel.db) made absolute, so that it names the same file from
    any working directory (a resumed search, a worker process); other URIs as given."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return f"{prefix}{Path(uri[len(prefix):]).resolve()}"
    return uri


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    """The command that opens the MLflow UI on this store (its secrets masked: the reader fills them in), and with
    ``experiment_id`` the page to open there: the experiment's training runs (``landing_url``)."""
    shown = redact_url(uri)
    if uri.startswith(("http://", "https://")):
        page = landing_url(shown, experiment_id) if experiment_id else shown
        return f"open {page} in a browser"
    command = f"mlflow ui --backend-store-uri {shown} --port {UI_PORT}"
    if experiment_id:
        return f"{command}, then open {landing_url(f'http://127.0.0.1:{UI_PORT}', experiment_id)}"
    return command


def landing_url(server: str, experiment_id: str) -> str:
    """The UI page of the experiment's training runs. MLflow 3.17's UI opens an experiment in its GenAI mode
    (traces, "Evaluation runs") unless the URL asks for ``workflowType=machine_learning``: it reads the mode from
    the URL or from the browser's last choice, not from the experiment's ``EXPERIMENT_KIND_TAG``."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def use_uri(uri: str) -> str:
    """The tracking URI this process uses for ``uri`` as the user gave it, with no password left in it where
    MLflow could print or raise it: an http(s) URI's user info moves into MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD of this process (where they are unset: MLflow prefers them to the URL's anyway),
    which ``env_for_workers`` hands to the trials through Ray's object store, and the URI continues without it.
    Any other URI with a secret (a database's, whose driver needs its password) is ``redact.remember``-ed, so
    that objects Tune unpickles in this process find it again, and returned as it is."""
    if not is_http(uri):
        return redact.remember(uri)
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return redact.remember(uri)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user))
    if colon:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    return redact.remember(parts._replace(netloc=hostport).geturl())


def host_of(uri: str) -> str | None:
    """An http(s) URI's ``host:port`` (the port MLflow would connect to), or None for other stores."""
    if not is_http(uri):
        return None
    parts = urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = None
    return f"{(parts.hostname or '').lower()}:{port}"


def recorded_uri(saved: str, given: str | None, record: str) -> tuple[str, list[str]]:
    """The real tracking URI of a search continued from its record (``--resume``, ``confirm --search``):
    ``saved`` is the record's URI (search.json's; masked where it held a secret), ``given`` this command's
    --tracking-uri (or None), ``record`` how messages name the record. Returns the URI and the warnings to print.

    - A masked URI is taken again from ``given`` or MLFLOW_TRACKING_URI, the one that masks to it (same scheme,
      host and database); with neither, TrackingError says to give one of them.
    - ``given`` naming another store than the record is a TrackingError; MLFLOW_TRACKING_URI naming another
      store is a warning (the record's store is used).
    - An http(s) server that neither ``given`` nor MLFLOW_TRACKING_URI names gets no credentials:
      MLFLOW_TRACKING_USERNAME / PASSWORD / TOKEN / CLIENT_CERT_PATH are removed from this process's environment
      (so the trials get none either), and a warning says so."""
    given = absolute_uri(given) if given else None
    env_uri = absolute_uri(os.environ[TRACKING_ENV]) if os.environ.get(TRACKING_ENV) else None
    if given and redact_url(given) != saved:
        raise TrackingError(f"--tracking-uri {redact_url(given)} is not the MLflow store of {record} ({saved}); "
                            f"give that one, or leave the flag out")
    warnings = []
    if env_uri and redact_url(env_uri) != saved:
        warnings.append(f"{record} logs to the MLflow store {saved} (its record), not to {TRACKING_ENV}="
                        f"{redact_url(env_uri)}")
    uri = given or (env_uri if env_uri and redact_url(env_uri) == saved else saved)
    if redact.is_redacted(uri):
        raise TrackingError(f"{record}: the record keeps the MLflow tracking URI without its credentials ({saved}); "
                            f"give it again with --tracking-uri URL or the {TRACKING_ENV} environment variable")
    host = host_of(uri)
    if host is not None and host not in {host_of(v) for v in (given, env_uri) if v}:
        dropped = [k for k in CREDENTIAL_VARS if os.environ.pop(k, None) is not None]
        if dropped:
            warnings.append(f"not sending {', '.join(dropped)} to the MLflow server {host}: only {record} names "
                            f"it, not this command or {TRACKING_ENV} (give --tracking-uri {redact_url(uri)} to "
                            f"send them)")
    return uri, warnings


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail early, naming the URI (its secrets masked), when an HTTP server does not answer or a sqlite file's
    folder is missing."""
    parsed, shown = urlparse(uri), redact_url(uri)
    if parsed.scheme in ("http", "https"):
        # urllib takes user info for part of the host name: ask the host alone (/health needs no login)
        url = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl().rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {shown} answered HTTP {resp.status} on /health")
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
            reason = redact_text(str(getattr(exc, "reason", exc)))
            raise TrackingError(f"MLflow tracking server {shown} is unreachable ({reason}); start it with "
                                f"`mlflow server --host HOST --port PORT` or pass another --tracking-uri") from None
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not path.parent.is_dir():
            raise TrackingError(f"MLflow sqlite store {shown}: folder {path.parent} does not exist")
    elif parsed.scheme in ("", "file"):
        raise TrackingError(f"MLflow tracking URI {shown!r}: MLflow 3 refuses the plain file store; use "
                            f"sqlite:////abs/path/mlflow.db or http://host:port")


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking store could not be reached (refused, timed out, a gateway's 502-504), as
    opposed to a request it refused: only an outage is worth retrying later."""
    if isinstance(exc, (ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
                        requests.exceptions.Timeout)):
        return True
    text = str(exc)
    return isinstance(exc, MlflowException) and any(sign in text for sign in (
        "Max retries exceeded", "Connection refused", "Failed to establish", "timed out", "Read timed out",
        "502", "503", "504", "TEMPORARILY_UNAVAILABLE", "RemoteDisconnected", "Connection aborted"))


def prepare_store(uri: str) -> None:
    """Create and migrate a sqlite store once, under an exclusive lock on its folder: two searches started at once
    in a fresh --out would otherwise race MLflow's schema creation (one of them crashing). Other stores: nothing."""
    if urlparse(uri).scheme != "sqlite":
        return
    folder = Path(uri[len("sqlite:///"):].split("?", 1)[0]).parent
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        MlflowClient(uri).search_experiments(max_results=1)  # creates the tables, or migrates them
    finally:
        os.close(fd)


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    """The experiment's id, creating it (with an absolute artifact location for local stores) if missing. Either
    way it carries ``EXPERIMENT_KIND_TAG`` = model training, unless it already says what it holds (a user's
    choice in the UI is kept)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if artifact_root is not None and not uri.startswith(("http://", "https://")):
        location = (artifact_root.resolve() / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _find_run(client: MlflowClient, experiment_id: str, kind: str, tags: Mapping[str, str]) -> str | None:
    """The run of ``kind`` carrying every tag value of ``tags``, or None."""
    query = " and ".join([*(f"tags.`{k}` = '{v}'" for k, v in tags.items()), f"tags.`{KIND_TAG}` = '{kind}'"])
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def parent_run(uri: str, experiment_id: str, search: str, params: Mapping[str, Any], kind: str = "search",
               search_id: str | None = None) -> str:
    """The search's parent run: found by the search's id (a resume; its kind tag tells it from the trial runs,
    which carry the id too) or created. ``kind``: "search", or a grid's ("ablation", "confirm"); ``search_id``
    defaults to the name (a caller with no search.json)."""
    client = MlflowClient(uri)
    sid = search_id or search
    run_id = _find_run(client, experiment_id, kind, {SEARCH_ID_TAG: sid})
    if run_id is None:
        run = client.create_run(experiment_id, run_name=search,
                                tags={SEARCH_TAG: search, SEARCH_ID_TAG: sid, KIND_TAG: kind})
        run_id = run.info.run_id
        log_params(uri, run_id, params)
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


def trial_run(uri: str, experiment_id: str, parent_id: str, search: str, trial_id: str, trial_name: str,
              params: Mapping[str, Any], search_id: str | None = None) -> str:
    """The trial's child run: the existing one of this trial id in this search (a resumed or retried trial), or a
    new one."""
    client = MlflowClient(uri)
    sid = search_id or search
    run_id = _find_run(client, experiment_id, "trial", {TRIAL_TAG: trial_id, SEARCH_ID_TAG: sid})
    if run_id is None:
        tags = {TRIAL_TAG: trial_id, SEARCH_TAG: search, SEARCH_ID_TAG: sid, KIND_TAG: "trial",
                PARENT_RUN_ID_TAG: parent_id}
        run_id = client.create_run(experiment_id, run_name=trial_name, tags=tags).info.run_id
        log_params(uri, run_id, params)
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


def log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    """Params as text (at most 6,000 characters each), every URL in them with its secrets masked."""
    items = [Param(k, "" if v is None else redact_text(str(v))[:6000]) for k, v in params.items()]
    client = MlflowClient(uri)
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Tags as text, every URL in them with its secrets masked."""
    client = MlflowClient(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, redact_text(str(v)))


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
    MlflowClient(uri).log_image(run_id, mlflow.Image(str(path)), key=key, step=step, synchronous=True)


def log_image_file(uri: str, run_id: str, path: Path, artifact_file: str) -> None:
    """A PNG as a static image artifact (shown in the artifact view)."""
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
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    # the digest is given, so MLflow only reads the arrays' shapes and dtypes (schema and profile)
    dataset = mlflow.data.from_numpy(images, targets=labels, name=name, digest=digest,
                                     source=CodeDatasetSource(tags=dict(source)))
    tag = InputTag(key=DATA_CONTEXT_TAG, value="training")
    MlflowClient(uri).log_inputs(run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[tag])])


def log_artifacts(uri: str, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


def finish_run(uri: str, run_id: str, status: str, error: str | None = None, outcome: str | None = None) -> None:
    """Mark a run FINISHED / FAILED / KILLED; a failure's text goes into a tag and an artifact-free note;
    ``outcome`` (how it ended, in words) into ``OUTCOME_TAG``; the URLs in both with their secrets masked."""
    client = MlflowClient(uri)
    if outcome:
        client.set_tag(run_id, OUTCOME_TAG, redact_text(outcome)[:500])
    if error:
        error = redact_text(error)
        client.set_tag(run_id, ERROR_TAG, error[:5000])
        client.set_tag(run_id, NOTE_CONTENT_TAG, f"Trial failed:\n\n```\n{error[:20000]}\n```")
    client.set_terminated(run_id, status=status)


def kill_unfinished(uri: str, experiment_id: str, search_id: str, parent_id: str) -> int:
    """Mark the search's trial runs that are still RUNNING (or SCHEDULED) KILLED, then its parent run; returns the
    number of trial runs marked. A resumed search sets them RUNNING again when it continues them."""
    client = MlflowClient(uri)
    unfinished = [r for r in runs_of_search(uri, experiment_id, search_id)
                  if r.info.status in ("RUNNING", "SCHEDULED")]
    for run in unfinished:
        client.set_tag(run.info.run_id, OUTCOME_TAG, "killed")
        client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent_id, status="KILLED")
    return len(unfinished)


def config_key(cfg: Mapping[str, Any]) -> str:
    """The content key of a resolved config (``Config.to_dict()``): 16 hex digits of the sha256 of its sorted JSON."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_run(uri: str, experiment_id: str, key: str) -> Any | None:
    """The latest run of ``experiment_id`` that trained the config with this ``config_key`` to the end (FINISHED,
    outcome "completed"), or None; whichever code trained it (``reusable`` says whether it may stand in)."""
    query = (f"tags.`{CONFIG_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED' and "
             f"tags.`{OUTCOME_TAG}` = 'completed' and tags.`{KIND_TAG}` = 'trial'")
    runs = MlflowClient(uri).search_runs([experiment_id], filter_string=query, max_results=1,
                                         order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def reuse_mismatch(run: Any, code: str, extractor: str) -> str | None:
    """Why a finished run of the same config cannot stand in for a new one, or None: it was trained by other
    code, or scored in another feature space."""
    tags = run.data.tags
    if tags.get(CODE_VERSION_TAG) != code:
        return f"trained by other code (code version {tags.get(CODE_VERSION_TAG) or 'unknown'}, now {code})"
    if tags.get(EXTRACTOR_TAG) != extractor:
        return f"scored with another feature network ({tags.get(EXTRACTOR_TAG) or 'unknown'}, now {extractor})"
    return None


def cell_run(uri: str, experiment_id: str, search_id: str, cell: str) -> Any | None:
    """The latest trial run of the grid ``search_id`` for ``cell`` (a re-run's retry of a failed cell is newer)."""
    query = (f"tags.`{SEARCH_ID_TAG}` = '{search_id}' and tags.`{CELL_TAG}` = '{cell}' and "
             f"tags.`{KIND_TAG}` = 'trial'")
    runs = MlflowClient(uri).search_runs([experiment_id], filter_string=query, max_results=1,
                                         order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def trial_run_id(uri: str, experiment_id: str, trial_id: str, search_id: str) -> str | None:
    return _find_run(MlflowClient(uri), experiment_id, "trial", {TRIAL_TAG: trial_id, SEARCH_ID_TAG: search_id})


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    """The run's tags."""
    return dict(MlflowClient(uri).get_run(run_id).data.tags)


def log_missing(uri: str, run_id: str, metrics: Mapping[str, Any], step: int) -> list[str]:
    """Log the finite entries of ``metrics`` whose history in the run has no value at ``step`` (records a trial
    held through a tracking outage and lost when it was stopped). Returns the keys logged."""
    client = MlflowClient(uri)
    missing = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)
               and not any(m.step == step for m in client.get_metric_history(run_id, k))}
    log_metrics(uri, run_id, missing, step)
    return sorted(missing)


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """The run's latest value of each metric."""
    return dict(MlflowClient(uri).get_run(run_id).data.metrics)


def runs_of_search(uri: str, experiment_id: str, search_id: str) -> list[Any]:
    """The trial runs of the search ``search_id`` (never those of another search of the same name)."""
    client = MlflowClient(uri)
    return client.search_runs([experiment_id], filter_string=f"tags.`{SEARCH_ID_TAG}` = '{search_id}' and "
                              f"tags.`{KIND_TAG}` = 'trial'", max_results=10_000)


def env_for_workers() -> dict[str, str]:
    """Environment the trial processes need to reach the same store and its artifacts on any node: every
    ``MLFLOW_TRACKING_*`` (credentials, TLS settings such as MLFLOW_TRACKING_SERVER_CERT_PATH), every ``AWS_*``
    (AWS_SESSION_TOKEN included), MLFLOW_S3_ENDPOINT_URL and REQUESTS_CA_BUNDLE. It travels in the pickled trial
    settings through Ray's object store (``tune.trainable.share_credentials``), never in a runtime env."""
    return {k: v for k, v in os.environ.items() if k.startswith(WORKER_ENV_PREFIXES) or k in WORKER_ENV_KEYS}
