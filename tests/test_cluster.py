"""Scale-out, the search's own local Ray session: what reaches its workers, and how (the search on a two-node
`ray start` cluster with a basic-auth `mlflow server`: tests/test_cluster_nodes.py)."""

from __future__ import annotations

import os
import urllib.request

import pytest

from tests.searchutil import http_status, seed_cache

pytestmark = pytest.mark.slow


# -- the search's own local Ray session: what reaches the nodes, and how -------------------------------------------

NODE_SECRET, SEARCH_SECRET = "pw-in-the-raylet-env-7f3a", "pw-the-search-ships-91c2"
PASSWORD = "MLFLOW_TRACKING_PASSWORD"


@pytest.fixture(scope="module")
def search_ray(tmp_path_factory):
    """The search's Ray session (``connect_ray``, local, with its dashboard), started with a tracking password and
    a feature cache in the environment, which its worker processes inherit as a node's would. Yields (plan,
    the node's cache folder, the dashboard's address)."""
    import ray

    from tune import runner, search

    tmp = tmp_path_factory.mktemp("search-ray")
    saved = dict(os.environ)
    os.environ.update({PASSWORD: NODE_SECRET, "PDCBDM_CACHE": str(tmp / "node-cache")})
    try:
        p = search.plan(search.parse_args(["--preset", "smoke", "--out", str(tmp / "out"), "--name", "nodes"]))
        runner.connect_ray(p)
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
    task argument, through the object store, as ``ray.tune.with_parameters`` sends them."""
    import json

    import ray

    from tune.trainable import share_credentials

    ref = share_credentials(settings.env)
    worker = ray.get(ray.remote(num_cpus=0)(_worker_side).remote({"secrets": ref}))
    return {"worker": worker, "runtime_env": json.dumps(ray.get_runtime_context().runtime_env)}


def test_credentials_reach_the_workers_through_the_object_store_not_the_runtime_env(search_ray, monkeypatch):
    import ray

    from tune import runner

    p, _, dashboard = search_ray
    # the credential the search ships differs from the one its local workers inherited: only the object store
    # path can bring this one
    monkeypatch.setenv(PASSWORD, SEARCH_SECRET)
    settings = runner.trial_settings(p, "0", "parent")
    assert settings.env[PASSWORD] == SEARCH_SECRET
    got = ray.get(ray.remote(num_cpus=0)(_trial_side).remote(settings))
    assert got["worker"]["password"] == SEARCH_SECRET
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    assert http_status(f"{dashboard}/api/jobs/") == 401  # the search's own cluster wants its token too
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
