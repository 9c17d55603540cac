"""Test-wide settings."""

import torch

# One thread: the suite's in-process work is small, and on a 2-core machine shared with Ray workers and
# subprocesses, two OpenMP threads per process oversubscribe the cores and run many times slower.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_search(tmp_path_factory):
    """One smoke search (2 trials, sqlite MLflow, local Ray) shared by the tests that inspect a search's output.

    The search runs with its own system temp folder (TMPDIR; Ray's session stays in /tmp/ray) so that the tests
    can check that no trial leaves files there. Returns (out folder, search name, completed process); the temp
    folder is ``out / "tmpdir"`` (a link: Ray's socket paths must stay short). While it runs, every port its
    processes listen on is sent one unauthenticated request; the answers are in ``out / "listeners.json"``."""
    import tempfile
    from pathlib import Path

    from tests.searchutil import TINY, run_search

    out = tmp_path_factory.mktemp("smoke-search")
    tmpdir = Path(tempfile.mkdtemp(prefix="pdt-", dir="/tmp"))
    (out / "tmpdir").symlink_to(tmpdir)
    # half a CPU per worker: both trials run at once (Ray's start-up and the evaluations' waits overlap)
    proc = run_search(out, "e2e", "--trials", "2", "--seed", "1", "--cpus-per-worker", "0.5", *TINY,
                      env={"TMPDIR": str(tmpdir), "RAY_TMPDIR": "/tmp"}, probe=out / "listeners.json")
    return out, "e2e", proc


@pytest.fixture(scope="session")
def digits_network(tmp_path_factory):
    """A cache folder holding only the digits CNN that ``DigitsExtractor.load_or_train`` trained into it, once for
    the session (about 9 s on one core). Tests copy it into their own cache folder (``searchutil.seed_cache``)
    instead of training it again; their reference statistics, judges and floors are still computed in their own
    folder. tests/test_features.py checks the training's result (accuracy, cache file, read back)."""
    from pdcbdm.metrics.digits_net import DigitsExtractor

    folder = tmp_path_factory.mktemp("digits-network")
    DigitsExtractor.load_or_train(cache_dir=folder)
    return folder


@pytest.fixture(scope="session")
def search_cache(smoke_search):
    """The feature cache the smoke search filled (digits network, reference statistics, judge, floors of the smoke
    preset at the TINY budget), for ``searchutil.run_search(cache=...)``: later searches copy it instead of
    computing it again. The smoke search's own tests still see a cold start."""
    out, _, proc = smoke_search
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cache = out / "cache"
    assert any(cache.glob("digits-cnn-*.pt")), "the smoke search left no digits network in its cache"
    return cache


@pytest.fixture(scope="session")
def tiny_ablation(tmp_path_factory, search_cache):
    """One tiny ablation (smoke preset, variants cbdm and pd-cbdm, 1 seed, 20 steps) shared by the ablation and
    notebook tests, on a copy of the smoke search's feature cache. Returns (out folder, completed process)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.searchutil import seed_cache

    out = tmp_path_factory.mktemp("tiny-ablation")
    seed_cache(out, search_cache)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_CACHE": str(out / "cache")}
    cmd = [sys.executable, "-m", "pipelines.ablation", "--preset", "smoke", "--seeds", "1", "--variants",
           "cbdm,pd-cbdm", "--steps", "20", "--out", str(out / "ablation")]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
                          env=env)
    return out / "ablation", proc
