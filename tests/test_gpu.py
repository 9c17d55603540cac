"""CUDA-only checks (skipped where torch sees no CUDA device; the machines the `device` tool lends run them)."""

from __future__ import annotations

import pytest
import torch

from pdcbdm.config import preset
from pdcbdm.data import build_dataset
from pdcbdm.training import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_each_rank_keeps_the_cuda_rng_its_worker_seeded():
    """The worker seeds train.seed + rank; building the Trainer (whose weights are seeded with train.seed alone)
    must leave that CUDA RNG alone, or every DDP rank would draw the same dropout masks."""
    cfg = preset("smoke")
    data = build_dataset(cfg.data.dataset)
    states = []
    for rank in (0, 1):
        torch.manual_seed(cfg.train.seed + rank)
        before = torch.cuda.get_rng_state()
        Trainer(cfg, data, device="cuda", rank=rank, world_size=2)
        assert torch.equal(torch.cuda.get_rng_state(), before)
        states.append(before)
    assert not torch.equal(states[0], states[1])
