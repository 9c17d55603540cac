"""Two Ray Train workers (DDP over gloo on CPU) follow the same loss trajectory as one worker with the same
global batch and seed: every random draw is made for the global batch and sliced per rank (pdcbdm Shard)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS = 8


def _loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from pdcbdm.config import Config
    from pdcbdm.train import load_data
    from pdcbdm.training import Trainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = Config.from_dict(config["cfg"])
    wrap = ray.train.torch.prepare_model if world > 1 else None
    data = load_data(cfg)
    data.hflip = config["hflip"]  # flips drawn for the global batch and sliced, as every other draw
    trainer = Trainer(cfg, data, device="cpu", rank=rank, world_size=world, wrap_model=wrap)
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    # the loss of a rank is the mean over its slice; the global loss is the mean over ranks
    mean = torch.tensor(losses)
    if world > 1:
        torch.distributed.all_reduce(mean)
        mean /= world
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(mean.tolist()))


def _run(workers: int, out: Path, cfg) -> list[float]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _loop, train_loop_config={"cfg": cfg.to_dict(), "out": str(out), "hflip": True},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"dist-{workers}", storage_path=str(out.parent / "ray")),
    )
    trainer.fit()
    return json.loads(out.read_text())


def test_two_workers_match_one_worker_with_flips(tmp_path):
    import ray

    from pdcbdm.config import apply_overrides, preset

    cfg = apply_overrides(preset("smoke"), ["model.dropout=0", "train.batch_size=16", "loss.p_uncond=0",
                                            "train.lr=1e-3", "train.warmup=1"])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    try:
        one = _run(1, tmp_path / "one.json", cfg)
        two = _run(2, tmp_path / "two.json", cfg)
    finally:
        ray.shutdown()
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (one, two)
    assert one[0] != one[-1]  # it trained


def _rng_rank(rank: int, world: int, folder: str) -> None:
    import torch
    import torch.distributed as dist

    from pdcbdm.config import apply_overrides, preset
    from pdcbdm.train import load_data
    from pdcbdm.training import Trainer

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        cfg = apply_overrides(preset("smoke"), ["train.batch_size=4"])
        trainer = Trainer(cfg, load_data(cfg), rank=rank, world_size=world)
        torch.manual_seed(100 + rank)  # each rank's dropout stream, as the worker seeds it
        torch.rand(3)
        states = trainer.rng_states()  # a collective: every rank calls it
        own = torch.get_rng_state()
        if rank == 0:
            trainer.save(f"{folder}/checkpoint.pt", states)
        dist.barrier()
        torch.manual_seed(999)  # the restarted worker's state
        trainer.load(f"{folder}/checkpoint.pt")
        torch.save({"own": own, "loaded": torch.get_rng_state()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_its_own_rng_state_back(tmp_path):
    """Dropout draws from each rank's global RNG; a restore gives each rank its own state, not rank 0's."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_rng_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(ranks[0]["own"], ranks[1]["own"])
    for r in ranks:
        assert torch.equal(r["loaded"], r["own"])
