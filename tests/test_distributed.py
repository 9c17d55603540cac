"""Two Ray Train workers (DDP over gloo on CPU) follow the same loss trajectory as one worker with the same
global batch and seed: every random draw is made for the global batch and sliced per rank (pdcbdm Shard). A
two-worker trial's evaluations never hold a rank in a torch collective while rank 0 works alone, and a rank that
waits in vain for the others' shares says what it waited for."""

from __future__ import annotations

import dataclasses
import json
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


@pytest.fixture(scope="module")
def ray_two_cpus():
    """One local Ray for this module's Ray Train runs (a start costs 3 to 10 s here)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    try:
        yield
    finally:
        ray.shutdown()


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


def _one_worker(cfg) -> list[float]:
    """The one-worker trajectory: ``_loop``'s steps with world size 1 (no process group, no wrapped model, as a
    one-worker trial runs them), here in the test's process rather than in a Ray Train run of its own."""
    from pdcbdm.train import load_data
    from pdcbdm.training import Trainer

    data = load_data(cfg)
    data.hflip = True
    trainer = Trainer(cfg, data, device="cpu")
    return [trainer.train_step()["loss"] for _ in range(STEPS)]


def test_two_workers_match_one_worker_with_flips(tmp_path, ray_two_cpus):
    from pdcbdm.config import apply_overrides
    from pdcbdm.presets import preset

    cfg = apply_overrides(preset("smoke"), ["model.dropout=0", "train.batch_size=16", "loss.p_uncond=0",
                                            "train.lr=1e-3", "train.warmup=1"])
    one = _one_worker(cfg)
    two = _run(2, tmp_path / "two.json", cfg)
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (one, two)
    assert one[0] != one[-1]  # it trained


def _rng_rank(rank: int, world: int, folder: str) -> None:
    import torch
    import torch.distributed as dist

    from pdcbdm.config import apply_overrides
    from pdcbdm.presets import preset
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


# -- the final evaluation's sampling split over the ranks, features gathered on rank 0 ------------------------------

EVAL_N, EVAL_GRID, EVAL_SEED = 29, (0.0, 1.0), 3
# batches of 7: 7, 7, 7, 7, 1; with 2 ranks the shares are 3 and 4 rows, and rank 0's share of the last is empty
EVAL_SET = ["eval.batch_size=7", "sample.steps=4"]


def _eval_setup(cache: str):
    """The config, a seeded (untrained) network and the one-worker Evaluator without floors (not under test)."""
    import torch

    from pdcbdm.config import apply_overrides
    from pdcbdm.evaluation import Evaluator
    from pdcbdm.presets import preset
    from pdcbdm.training.trainer import build_network

    torch.set_num_threads(1)
    cfg = apply_overrides(preset("smoke"), EVAL_SET)
    torch.manual_seed(0)
    net = build_network(cfg, 10, (1, 16, 16)).eval()
    evaluator = Evaluator.build(cfg, num_classes=10, head=range(7), tail=(7, 8, 9), cache_dir=cache)
    return cfg, net, dataclasses.replace(evaluator, floor_pool=None, floor_note="off")


def _eval_rank(rank: int, world: int, folder: str) -> None:
    """A rank of a split final evaluation, its shares exchanged on a gloo group of their own as in a trial; then
    rank 1 is stuck before its share of another one (``_stuck``), and rank 0 gives up on it after its limit."""
    import torch
    import torch.distributed as dist

    from pdcbdm.evaluation.samples import SampleSource, ShareExchange, ShareWaitError

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        group = dist.new_group(backend="gloo")
        cfg, net, evaluator = _eval_setup(f"{folder}/cache")
        if rank == 0:
            evaluator = dataclasses.replace(evaluator, exchange=ShareExchange(group))
            results = evaluator.evaluate_grid(net, EVAL_GRID, n=EVAL_N, seed=EVAL_SEED, world=world)
            torch.save({"metrics": json.dumps([r.metrics for r in results]),
                        "images": torch.stack([r.images for r in results])}, f"{folder}/split.pt")
            source = dataclasses.replace(evaluator.source, exchange=ShareExchange(group, floor_s=1.0, factor=0.0))
            try:
                source.grid_samples(net, EVAL_GRID, EVAL_N, seed=EVAL_SEED, world=world,
                                    label="the final evaluation at step 7")
            except ShareWaitError as exc:
                Path(folder, "stuck.txt").write_text(str(exc))
            else:
                Path(folder, "stuck.txt").write_text("no error")
        else:
            source = SampleSource.build(cfg, num_classes=10, image_shape=(1, 16, 16), cache_dir=f"{folder}/cache")
            source = dataclasses.replace(source, exchange=ShareExchange(group))
            assert source.grid_samples(net, EVAL_GRID, EVAL_N, seed=EVAL_SEED, rank=rank, world=world) is None
            _stuck(Path(folder, "stuck.txt"))
    finally:
        dist.destroy_process_group()


def _stuck(until: Path) -> None:
    """A worker stuck before its share, until rank 0 has given up on it (``until`` written), at most 2 minutes."""
    import time

    deadline = time.monotonic() + 120
    while not until.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_shares_of_a_sampling_are_the_one_worker_samples():
    """Each rank's rows, put back in place, are the one-worker images: the noise is drawn whole and sliced."""
    import torch

    from pdcbdm.config import apply_overrides
    from pdcbdm.diffusion import GaussianDiffusion
    from pdcbdm.presets import preset
    from pdcbdm.sampling import generate, share_indices, uniform_labels
    from pdcbdm.training.trainer import build_network

    cfg = apply_overrides(preset("smoke"), EVAL_SET)
    torch.manual_seed(0)
    net = build_network(cfg, 10, (1, 16, 16)).eval()
    labels = uniform_labels(EVAL_N, 10)
    kw = dict(sampler="ddim", steps=4, eta=1.0, guidance=1.0, null_label=10, batch_size=7, seed=EVAL_SEED)
    whole = generate(net, GaussianDiffusion(cfg.diffusion), labels, (1, 16, 16), **kw)
    for world in (2, 3):
        parts = [generate(net, GaussianDiffusion(cfg.diffusion), labels, (1, 16, 16), rank=r, world=world, **kw)
                 for r in range(world)]
        index = torch.cat([share_indices(EVAL_N, 7, r, world) for r in range(world)])
        assert sorted(index.tolist()) == list(range(EVAL_N))
        together = torch.zeros_like(whole)
        together[index] = torch.cat(parts)
        # the same images up to a rounding step where batch size changes the float sums
        assert (together.int() - whole.int()).abs().max() <= 1, world


def test_two_rank_final_evaluation_scores_as_one_worker(tmp_path, digits_network):
    """Two ranks' shares, exchanged and scored on rank 0, score as one worker's samples; a rank that waits in vain
    for a stuck worker's share ends its wait with an error naming it."""
    import torch
    import torch.multiprocessing as mp

    from tests.searchutil import seed_cache

    seed_cache(tmp_path, digits_network)  # the session's digits network: its training is not under test here
    cfg, net, evaluator = _eval_setup(str(tmp_path / "cache"))  # builds the caches (reference features) once
    one = evaluator.evaluate_grid(net, EVAL_GRID, n=EVAL_N, seed=EVAL_SEED)
    mp.spawn(_eval_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    split = torch.load(tmp_path / "split.pt", weights_only=True)
    two = json.loads(split["metrics"])
    assert (split["images"].int() - torch.stack([r.images for r in one]).int()).abs().max() <= 1
    for a, b in zip([r.metrics for r in one], two):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
            else:
                assert b[key] == value, key
    # the stuck worker: rank 0 says what it waited for, how long, and gloo's reason (its limit, not a lost peer)
    message = (tmp_path / "stuck.txt").read_text()
    assert message.startswith("rank 0 waited "), message
    assert "(its limit: 1 s) for the other workers' shares of the samples at w=0 of the final evaluation at " \
           "step 7 and stopped without them: " in message, message
    assert "Timed out" in message, message


# -- a two-worker trial whose evaluation outlasts its default process group's timeout --------------------------------

GROUP_TIMEOUT_S = 3  # the trial's default process group (TorchConfig.timeout_s; Ray's default, in a search: 1,800 s)
# one evaluation, the final one, at step 2; its samples and proxy are drawn at 20 steps (rank 0's proxy is the work
# it does alone, sized in the test to take about 3 x GROUP_TIMEOUT_S)
TRIAL_SET = ["train.steps=2", "train.eval_every=2", "train.log_every=2", "sample.steps=20", "eval.num_samples=20",
             "eval.noise_error_images=0"]


def _proxy_samples_for(seconds: float, cfg, cache: Path) -> int:
    """How many proxy samples one thread draws (and extracts) in about ``seconds`` here, timed on 20 of them:
    the test's premise, rank 0 evaluating alone for longer than the group's timeout, on a fast or a busy machine."""
    import time

    import torch

    from pdcbdm.evaluation.samples import SampleSource
    from pdcbdm.training.trainer import build_network

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray worker with 1 CPU
    try:
        net = build_network(cfg, 10, (1, 16, 16)).eval()
        source = SampleSource.build(cfg, num_classes=10, image_shape=(1, 16, 16), cache_dir=cache)
        start = time.perf_counter()
        images, labels = source.sample(net, cfg.eval.proxy_guidance, 20)
        source.features(images, labels)
        per_sample = (time.perf_counter() - start) / 20
    finally:
        torch.set_num_threads(threads)
    return min(4000, max(100, round(seconds / per_sample)))


def test_two_worker_trial_outlasts_its_process_group_timeout(tmp_path, digits_network, ray_two_cpus):
    """Rank 0's final evaluation takes longer than the default group's timeout; the other rank waits it out at
    Ray's barrier, and the trial finishes with its final scores. (It used to wait in a torch collective, the
    final samples' gather_object or the RNG states' all_gather_object: the trial failed at the group's timeout,
    on GPUs an NCCL watchdog abort after 1,800 s, after all its training.)"""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pdcbdm.config import apply_overrides
    from pdcbdm.presets import preset
    from tests.searchutil import seed_cache
    from tune.worker import train_loop

    seed_cache(tmp_path, digits_network)
    cfg = apply_overrides(preset("smoke"), TRIAL_SET)
    proxy_samples = _proxy_samples_for(3 * GROUP_TIMEOUT_S, cfg, tmp_path / "cache")
    cfg = apply_overrides(cfg, [f"eval.proxy_samples={proxy_samples}"])
    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg.to_dict(), "cache_dir": str(tmp_path / "cache")},
        torch_config=TorchConfig(backend="gloo", timeout_s=GROUP_TIMEOUT_S),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="slow-evaluation", storage_path=str(tmp_path / "ray")),
    )
    result = trainer.fit()
    assert result.metrics["step"] == 2 and result.metrics["eval_s"] > GROUP_TIMEOUT_S, result.metrics  # the premise
    assert "eval_error" not in result.metrics, result.metrics["eval_error"]
    assert result.metrics["fid"] > 0 and result.metrics["objective"] == result.metrics["fid"]


def test_an_error_of_the_final_evaluation_is_reported_not_raised(tmp_path, digits_network):
    """After training, an error of the final scores is the trial's record (the run's error tag, ``eval_error``,
    NaN objectives: Optuna records FAIL) reported with the final checkpoint, not a failure that Train would
    answer by training the end again. One worker, in this process: the same functions as rank 0 of a trial."""
    import math

    import torch

    from pdcbdm.config import apply_overrides
    from pdcbdm.presets import preset
    from pdcbdm.train import load_data
    from pdcbdm.training import Trainer
    from tests.searchutil import seed_cache
    from tune.run_logger import RankZeroLogger
    from tune.worker import _evaluate, _evaluators

    seed_cache(tmp_path, digits_network)
    torch.set_num_threads(1)
    cfg = apply_overrides(preset("smoke"), ["eval.noise_error_images=0", "eval.num_samples=20"])
    trainer = Trainer(cfg, load_data(cfg))
    evaluator, _ = _evaluators(trainer, 0, str(tmp_path / "cache"))
    broken = dataclasses.replace(evaluator, head=(98,), tail=(99,))  # a split of classes the data lack
    out = _evaluate(trainer, broken, RankZeroLogger(None, None), final=True)
    assert out["eval_error"].startswith("the final evaluation failed after training (ValueError: "), out
    assert math.isnan(out["objective"]) and math.isnan(out["objective_tail"]) and "fid" not in out
    assert out["proxy_fid"] > 0  # what was scored before the error is kept
