"""Checks for a search on a multi-node Ray cluster (--address other than local): what every node must share.

A trial's rank 0 runs on any node: it must reach the same MLflow store (a server, not a sqlite file or a folder
of the driver's disk), and Ray's trial folders and checkpoints must be on storage every node reads and writes
(a URI such as s3://, or a folder mounted on every node, checked by a marker written and read on each node).
Every node must resolve the same data and feature network (checked by a task on each node that returns their
content hashes; the digits network is shipped from the driver), so that every trial scores in one feature space.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from pdcbdm.assets import cache_payload, evaluation_assets, install_cache_files
from pdcbdm.config import Config
from tune.redact import redact_url


# MLflow's basic-auth app: the admin's password from the environment at the first start, never in a file
MLFLOW_RECIPE = ("`MLFLOW_AUTH_CONFIG_PATH=auth.ini MLFLOW_AUTH_ADMIN_PASSWORD=... MLFLOW_FLASK_SERVER_SECRET_KEY=... "
                 "mlflow server --app-name basic-auth --backend-store-uri sqlite:////shared/mlflow.db "
                 "--artifacts-destination /shared/mlartifacts --host HEAD --port 5000 --allowed-hosts HEAD:5000`, "
                 "auth.ini as docs/cluster-and-gpu.md's recipe gives it")


class ClusterError(RuntimeError):
    """The search cannot run as asked on this cluster; the message names the fix."""


def is_local(address: str) -> bool:
    return address == "local"


def check_tracking_for_cluster(uri: str, address: str) -> None:
    """Refuse a tracking store that is a file on the driver's disk when trials may run on other nodes: rank 0
    on another node would open (and create) a different database there."""
    if is_local(address):
        return
    scheme = urlparse(uri).scheme
    if scheme in ("sqlite", "file", ""):
        raise ClusterError(
            f"--tracking-uri {redact_url(uri)} with --address {address}: a trial's rank 0 on another node would open a "
            f"different database there. Run an MLflow server every node reaches, with authentication "
            f"({MLFLOW_RECIPE}), and pass --tracking-uri http://HEAD:5000 with MLFLOW_TRACKING_USERNAME and "
            f"MLFLOW_TRACKING_PASSWORD set")


def check_storage_for_cluster(storage: str, address: str, timeout: float = 120.0) -> None:
    """With a non-local cluster, ``storage`` (Ray's trial folders and checkpoints) must be a URI (s3://, gs://,
    ...) or a folder every node shares: a task on each alive node reads a marker the driver wrote and writes its
    own, which the driver reads back. Needs ``ray.init`` done."""
    if is_local(address) or "://" in storage:
        return
    # deferred: Ray, which --help and the checks of bad input never load
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = Path(storage)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClusterError(f"--storage-path {storage}: cannot create it on the driver's node ({exc})") from None
    token = uuid.uuid4().hex
    (folder / f".pdcbdm-shared-{token}").write_text(token)
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    probe = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    try:
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(str(folder), token, node) for node in nodes]
        replies = dict(zip(nodes, ray.get(refs, timeout=timeout)))
        problems = unshared(folder, token, replies)
    finally:
        for path in folder.glob(f".pdcbdm-shared-{token}*"):
            path.unlink(missing_ok=True)
    if problems:
        detail = "; ".join(f"node {nodes[node]} ({node[:8]}): {why}" for node, why in problems.items())
        raise ClusterError(f"--storage-path {storage} is not shared by every node of the cluster at {address} "
                           f"({detail}); mount one folder on every node at the same path, or pass a URI such as "
                           f"s3://bucket/prefix")


def unshared(folder: Path, token: str, replies: dict[str, str]) -> dict[str, str]:
    """The nodes whose probe failed, or whose marker the driver cannot see in ``folder``, with the reason."""
    problems = {}
    for node, reply in replies.items():
        if reply != "ok":
            problems[node] = reply
        elif not (folder / f".pdcbdm-shared-{token}-{node}").is_file():
            problems[node] = "the marker it wrote is not visible on the driver's node"
    return problems


def probe_node(folder: str, token: str, node: str) -> str:
    """Run on one node: read the driver's marker, write this node's own; "ok" or what went wrong."""
    path = Path(folder) / f".pdcbdm-shared-{token}"
    try:
        if path.read_text() != token:
            return "the driver's marker has other contents there"
        (Path(folder) / f".pdcbdm-shared-{token}-{node}").write_text(token)
    except OSError as exc:
        return f"cannot read the driver's marker or write its own there ({exc.strerror or exc})"
    return "ok"


def check_assets_for_cluster(cfg: Any, address: str, cache_dir: str | None = None, timeout: float = 600.0) -> None:
    """With a non-local cluster, every node must train and score trials on the same data and in the same feature
    space: a task on each alive node resolves the data sets and the feature network as the trials will
    (``pdcbdm.assets.evaluation_assets``) and returns their identities, which must agree across the nodes. The
    digits network is built once here and shipped through Ray's object store to the nodes whose cache lacks it
    (each node training its own need not give the same network). Needs ``ray.init`` done."""
    if is_local(address):
        return
    # deferred: Ray, which --help and the checks of bad input never load
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        shipped = ray.put(cache_payload(cfg, cache_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ClusterError(f"cannot build the feature network {cfg.eval.extractor!r} on the driver ({exc})") from None
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    probe = ray.remote(num_cpus=0, max_retries=0)(node_assets)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(cfg.to_dict(), cache_dir, shipped) for node in nodes]
    problems = asset_differences(dict(zip(nodes, ray.get(refs, timeout=timeout))))
    if problems:
        detail = "; ".join(f"node {nodes[node]} ({node[:8]}): {why}" for node, why in problems.items())
        raise ClusterError(f"the nodes of the cluster at {address} would not train or score trials alike ({detail}). "
                           f"Give every node the same data.root and eval.inception_weights (shared storage) and "
                           f"the same feature cache ($PDCBDM_CACHE)")


def node_assets(cfg: dict[str, Any], cache_dir: str | None, shipped: dict[str, bytes]) -> dict[str, str]:
    """Run on one node: install the driver's cache files where missing, then the identities of the data sets and
    the feature network as this node resolves them, or {"error": why} when it cannot load them."""
    torch.set_num_threads(1)  # a zero-CPU task beside running trials
    try:
        install_cache_files(shipped, cache_dir)
        return evaluation_assets(Config.from_dict(cfg), cache_dir)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the node's answer, reported by name
        return {"error": f"{type(exc).__name__}: {exc}"}


def asset_differences(replies: dict[str, dict[str, str]]) -> dict[str, str]:
    """The nodes that cannot load the assets, or resolve one differently from most nodes, with the reason."""
    problems = {node: f"cannot load the data or the feature network ({r['error']})"
                for node, r in replies.items() if "error" in r}
    answered = {node: r for node, r in replies.items() if "error" not in r}
    for name in sorted({k for r in answered.values() for k in r}):
        values = [r.get(name) for r in answered.values()]
        common = max(set(values), key=lambda v: (values.count(v), str(v)))
        for node, r in answered.items():
            if r.get(name) != common:
                problems[node] = "; ".join(filter(None, [problems.get(node), f"its {name} is {r.get(name)}, not "
                                                         f"{common} as on {values.count(common)} other node(s)"]))
    return problems
