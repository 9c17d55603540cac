"""A search's winner in MLflow's model registry: the rank-1 trial's logged EMA network (``tune.mlflow_model``) is a
version of the registered model ``pdcbdm-<search name>`` with the alias ``best``; ``pipelines.confirm`` moves the
alias to the configuration that wins over new seeds and tags that version with its result.

    models:/pdcbdm-NAME@best      the current winner        models:/pdcbdm-NAME/3     one version, for good

``pin`` turns such a URI into its version (an alias moves: what was evaluated or generated names the version).
Registering copies nothing and loads nothing: a version's source is the trial's logged model (its folder, with its
id), and whoever loads it goes through ``tune.mlflow_model.load_logged_model``, which checks the files and never
imports or unpickles anything of them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tune import tracking
from tune.mlflow_model import MODEL_NAME
from tune.redact import redact_text
from tune.tags import CHOSEN_BY_TAG, SEARCH_ID_TAG, SEARCH_TAG, TRIAL_TAG, VERSIONS_TAG, confirm_tag

PREFIX = "pdcbdm-"
BEST_ALIAS = "best"
# models:/NAME@ALIAS or models:/NAME/VERSION (a logged model's models:/m-ID has neither "@" nor "/")
REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))/?")


class RegistryError(ValueError):
    """A registry URI that names no version; the message names the URI and the cause."""


@dataclass(frozen=True)
class Pinned:
    """One registered version: what a registry URI meant when it was read."""

    name: str
    version: str
    run_id: str | None
    source: str
    alias: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def record(self) -> dict[str, Any]:
        """The JSON-able record kept beside a result (metrics.json's ``registered``)."""
        return {"name": self.name, "version": self.version, "alias": self.alias, "run_id": self.run_id,
                "source": self.source}


def registered_name(search: str) -> str:
    """The registered model of a search's winners (search names are ``[A-Za-z0-9._-]``: safe in a URI)."""
    return f"{PREFIX}{search}"


def best_uri(search: str) -> str:
    return f"models:/{registered_name(search)}@{BEST_ALIAS}"


def is_registry_uri(spec: Any) -> bool:
    """Whether ``spec`` names a registered version (by alias or number), not a run's or a logged model's URI."""
    return REGISTRY_URI.fullmatch(str(spec)) is not None


def pin(spec: str, client: MlflowClient | None = None) -> Pinned:
    """The version a registry URI names now (``MlflowClient()``: the process's tracking and registry store);
    RegistryError when the model, alias or version is not there."""
    match = REGISTRY_URI.fullmatch(spec)
    if match is None:
        raise RegistryError(f"{spec}: not a registry URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    client = client or MlflowClient()
    name, alias = match["name"], match["alias"]
    try:
        mv = (client.get_model_version_by_alias(name, alias) if alias
              else client.get_model_version(name, match["version"]))
    except MlflowException as exc:
        raise RegistryError(f"{spec}: no such registered model version in MLflow "
                            f"({redact_text(exc.message)[:300]})") from None
    return Pinned(name, str(mv.version), mv.run_id, mv.source, alias)


# ---------------------------------------------------------------- registering


def logged_model(client: MlflowClient, run_id: str) -> Any | None:
    """The run's READY logged model ``MODEL_NAME`` (the latest, should there be several), or None."""
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    ready = [m for m in models if m.name == MODEL_NAME and str(m.status) == "READY"]
    return max(ready, key=lambda m: m.creation_timestamp) if ready else None


def version_of_run(client: MlflowClient, name: str, run_id: str, tags: Mapping[str, Any]) -> str | None:
    """The version of ``name`` holding the run's logged model: the existing one (a resumed search or a second
    confirm registers nothing twice), else a new one with ``tags``. None when the run has no logged model (its
    logging failed: the run's error tag says why)."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if found:
        return str(max(int(v.version) for v in found))
    model = logged_model(client, run_id)
    if model is None:
        return None
    try:
        client.create_registered_model(name, description="A search's winning networks (the EMA weights of the "
                                                         "trial): alias 'best' is the current winner.")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # the source is the logged model's folder, not its models:/m-ID: a sqlite or database registry resolves that
    # through MLflow's global tracking URI, not this client's; a server accepts the folder given the model's id
    mv = client.create_model_version(name, source=model.artifact_location, run_id=run_id, model_id=model.model_id,
                                     tags={k: str(v) for k, v in tags.items()})
    _link(client, model.model_id, name, str(mv.version))
    return str(mv.version)


def _link(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """The logged model's ``tune.tags.VERSIONS_TAG`` as ``mlflow.register_model`` writes it (the UI's link from the
    model to its registered versions); a tracking server has written it already."""
    existing = client.get_logged_model(model_id).tags.get(VERSIONS_TAG)
    versions = json.loads(existing) if existing else []
    entry = {"name": name, "version": version}
    if entry not in versions:
        client.set_logged_model_tags(model_id, {VERSIONS_TAG: json.dumps([*versions, entry])})


def _plain(value: Any) -> Any:
    """A table cell as text for a tag: '' for a missing value, 4 significant digits for a float."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else value


def register_best(uri: str, table: pd.DataFrame, search: str, search_id: str) -> tuple[str | None, str]:
    """Register the rank-1 completed trial's network as a version of ``pdcbdm-<search>`` (tagged with the trial,
    its FID and the FID's noise floor) and point the alias ``best`` at it. Returns (the version, or None when
    nothing was registered; the line to print: the URI, or why not). Never raises on MLflow's side: the search's
    results stand without it."""
    done = table[table["status"] == "completed"] if not table.empty else table
    if done.empty:
        return None, "no network registered: no completed trial"
    row = done.iloc[0]
    run_id = row.get("mlflow_run_id")
    if not isinstance(run_id, str) or not run_id or not search:
        return None, f"no network registered: trial {row['trial_id']} has no MLflow run of a named search"
    tags = {TRIAL_TAG: row["trial_id"], SEARCH_TAG: search, SEARCH_ID_TAG: search_id,
            CHOSEN_BY_TAG: "rank 1 of the search (one training seed); python -m pipelines.confirm tests it "
                                "over new seeds",
            **{k: _plain(row.get(k)) for k in ("fid", "fid_floor", "fid_floor_std", "fid_tail", "best_guidance")}}
    name = registered_name(search)
    try:
        client = MlflowClient(uri, registry_uri=uri)
        version = version_of_run(client, name, run_id, tags)
        if version is None:
            return None, f"no network registered: trial {row['trial_id']}'s run {run_id} has no logged model"
        client.set_registered_model_alias(name, BEST_ALIAS, version)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds; the search's results stand without it
        return None, f"the best network was not registered ({type(exc).__name__}: {redact_text(str(exc))[:300]})"
    return version, (f"the best trial's network: {best_uri(search)} (version {version} of {name}; evaluate it "
                     f"with python -m pipelines.evaluate --checkpoint {best_uri(search)})")


def promote(uri: str, search: str, run_id: str | None, result: Mapping[str, Any]) -> str:
    """Point ``best`` of ``pdcbdm-<search>`` at the version of the search trial run ``run_id`` (registered now if
    it is not yet) and tag that version with ``result`` (``pdcbdm.confirm.*``). Returns the line to print; never
    raises on MLflow's side (the confirmation's results stand without it)."""
    name = registered_name(search)
    if not run_id:
        return f"alias {BEST_ALIAS} of {name} not moved: the winner's search trial has no MLflow run"
    tags = {confirm_tag(k): _plain(v) for k, v in result.items()}
    try:
        client = MlflowClient(uri, registry_uri=uri)
        version = version_of_run(client, name, run_id, {CHOSEN_BY_TAG: "python -m pipelines.confirm"})
        if version is None:
            return f"alias {BEST_ALIAS} of {name} not moved: the winner's run {run_id} has no logged model"
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value))
        client.set_registered_model_alias(name, BEST_ALIAS, version)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds; the confirmation stands without it
        return f"alias {BEST_ALIAS} of {name} not moved ({type(exc).__name__}: {redact_text(str(exc))[:300]})"
    return f"{best_uri(search)} is now version {version} (the confirmed winner's network)"
