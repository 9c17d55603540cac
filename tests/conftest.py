"""Test-wide settings."""

import torch

# One thread: the suite's in-process work is small, and on a 2-core machine shared with Ray workers and
# subprocesses, two OpenMP threads per process oversubscribe the cores and run many times slower.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_search(tmp_path_factory):
    """One smoke search (3 trials, sqlite MLflow, local Ray) shared by the tests that inspect a search's output.

    Returns (out folder, search name, completed process)."""
    from tests.searchutil import TINY, run_search

    out = tmp_path_factory.mktemp("smoke-search")
    proc = run_search(out, "e2e", "--trials", "3", "--seed", "1", *TINY)
    return out, "e2e", proc
