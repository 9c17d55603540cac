"""The per-worker Ray Train loop: the library's Trainer, reports with checkpoints at each evaluation, and rank 0's
evaluation and its records (metric histories, sample grids, per-class tables, the final EMA network; written
through tune.run_logger)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, TypeVar

import pandas as pd
import pyarrow.fs
import ray
import ray.train
import ray.train.collective
import ray.train.torch
import torch

from pdcbdm.config import Config, parse_float_list
from pdcbdm.evaluation import Evaluator, Samples, SampleSource, best_by_fid, evaluation_split, headline
from pdcbdm.evaluation.samples import SHARE_WAIT_FLOOR_S, ShareExchange
from pdcbdm.io import write_json_atomic
from pdcbdm.noise_error import noise_error
from pdcbdm.train import load_data
from pdcbdm.training import NonFiniteLossError, Trainer
from pdcbdm.training.checkpoint import CheckpointError
from pdcbdm.viz import save_grid
from tune import faults, tracking
from tune.redact import redact_text
from tune.run_logger import RankZeroLogger
from tune.tags import DEVICE_TAG, ERROR_TAG, EVAL_PROTOCOL_TAG, EXTRACTOR_TAG, PRECISION_TAG, nodes_tag, scoring_tags

CKPT = "checkpoint.pt"
METRICS = "metrics.json"
T = TypeVar("T")
SAMPLES_KEY = "samples"  # the image series of the proxy grids, one per evaluation step
# reported to Tune (the scheduler's time_attr, the progress lines) but never logged at an evaluation step:
# ``step`` is MLflow's own x axis, loss and dm are logged as window means every train.log_every steps
REPORT_ONLY = ("step", "loss", "dm")


def _restore(trainer: Trainer) -> dict[str, Any] | None:
    """Continue from the run's latest readable checkpoint (after a worker restart or a resumed search); returns
    the metrics reported with it ({} for a checkpoint without them), or None without a checkpoint."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None

    def load(folder: Path) -> dict[str, Any]:
        trainer.load(folder / CKPT)
        return stored_metrics(folder)

    return first_readable(checkpoint, load)


def first_readable(checkpoint: ray.train.Checkpoint, load: Callable[[Path], T]) -> T:
    """``load`` of the newest readable of ``checkpoint`` and the older checkpoints beside it (Ray keeps
    ``num_to_keep`` of them): Ray writes its checkpoint index non-atomically, and a node that died while
    uploading can leave the newest one unreadable. Falling back says so on stderr; none readable raises the
    newest one's error."""
    candidates = [checkpoint, *_older_checkpoints(checkpoint)]
    first_error: CheckpointError | None = None
    for candidate in candidates:
        try:
            with candidate.as_directory() as folder:
                value = load(Path(folder))
        except (CheckpointError, OSError) as exc:
            first_error = first_error or (exc if isinstance(exc, CheckpointError) else CheckpointError(str(exc)))
            print(f"checkpoint {candidate.path} cannot be read ({exc}); trying the one before it", file=sys.stderr,
                  flush=True)
            continue
        if candidate is not checkpoint:
            print(f"continuing from the older checkpoint {candidate.path}", file=sys.stderr, flush=True)
        return value
    raise first_error or CheckpointError(f"no readable checkpoint beside {checkpoint.path}")


def _older_checkpoints(checkpoint: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The ``checkpoint_*`` folders beside ``checkpoint`` that are older than it (their names sort by time), newest
    first, on the same filesystem (local or remote storage)."""
    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    try:
        infos = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:
        return []
    older = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [ray.train.Checkpoint(f"{parent}/{n}", filesystem=checkpoint.filesystem) for n in older]


def stored_metrics(folder: Path) -> dict[str, Any]:
    """The metrics reported with the checkpoint in ``folder`` (``write_checkpoint``)."""
    path = Path(folder) / METRICS
    return json.loads(path.read_text()) if path.is_file() else {}


def write_checkpoint(trainer: Trainer, metrics: dict[str, Any], folder: Path,
                     rng_states: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """A checkpoint folder: the training state (with every rank's RNG state) and the metrics reported with it,
    so that a trial whose driver died after its last report can report them again when it is resumed (it has
    nothing left to train)."""
    trainer.save(Path(folder) / CKPT, rng_states)
    write_json_atomic(Path(folder) / METRICS, metrics)
    return Path(folder)


def _grid_png(images: torch.Tensor, num_classes: int, path: Path) -> Path:
    per_class = max(1, min(10, images.shape[0] // num_classes))
    order = torch.cat([torch.arange(k, images.shape[0], num_classes)[:per_class] for k in range(min(num_classes, 20))])
    return save_grid(images[order], path, nrow=per_class, scale=max(1, 64 // images.shape[-1]))


def _guidance_grid(cfg: Config) -> list[float]:
    return sorted(set(parse_float_list(cfg.eval.guidance_grid, "eval.guidance_grid")))


def _final_evaluation(trainer: Trainer, evaluator: Evaluator, sets: list[Samples], folder: Path,
                      log: RankZeroLogger) -> dict[str, Any]:
    """Score the EMA network's samples over ``eval.guidance_grid`` (``sets``, from ``_final_samples``: the same w
    for every trial); log the per-class table (an MLflow table for the UI, and Parquet for the notebooks), the
    grids and the sweep's metrics (JSON). The headline metrics are those of the best w (lowest FID), reported as
    ``best_guidance``."""
    cfg = trainer.cfg
    results = evaluator.score_grid(_guidance_grid(cfg), sets, seed=cfg.train.seed)
    best = best_by_fid(results, cfg.eval.min_consistency)
    rows = []
    for r in results:
        rows += [{"guidance": r.guidance, **row} for row in r.per_class]
        _grid_png(r.images, trainer.num_classes, folder / f"samples_w{r.guidance:g}.png")
    table = pd.DataFrame(rows)
    table.to_parquet(folder / "per_class.parquet")
    log.files([folder / "per_class.parquet"], "evaluation")
    log.table(table, "evaluation/per_class.json")
    log.json_file({"best_guidance": best.guidance, "results": [r.metrics for r in results]},
                  "evaluation/guidance_grid.json")
    for r in results:
        log.image_file(folder / f"samples_w{r.guidance:g}.png", f"samples/final/samples_w{r.guidance:g}.png")
    log.metrics({f"fid_w{r.guidance:g}": r.metrics["fid"] for r in results}, trainer.step)  # one batch, not one per w
    return {**headline(best), "best_guidance": best.guidance, **_noise_error(trainer)}


def _noise_error(trainer: Trainer) -> dict[str, float]:
    """Algorithm 2 on the first ``eval.noise_error_images`` training images (0 turns it off)."""
    cfg = trainer.cfg.eval
    if cfg.noise_error_images == 0:
        return {}
    idx = torch.arange(min(cfg.noise_error_images, len(trainer.dataset)))
    batches = [trainer.dataset.batch(chunk) for chunk in idx.split(cfg.batch_size)]
    value = noise_error(trainer.ema.module, trainer.diffusion, batches, stride=cfg.noise_error_stride,
                        seed=trainer.cfg.train.seed, device=trainer.device)
    return {"noise_error": value}


def _evaluate(trainer: Trainer, evaluator: Evaluator, log: RankZeroLogger, final: bool) -> dict[str, Any]:
    """Proxy FID (and the tail's) at ``eval.proxy_guidance`` with a sample grid at every evaluation; the full
    evaluation at the end, with the EMA network logged as the run's MLflow model (``tune.mlflow_model``: no
    optimiser state; the training checkpoint stays in Ray's storage, whose path the driver tags on the run).

    ``objective`` / ``objective_tail`` are what Optuna optimises: the proxy FIDs at intermediate evaluations (the
    values a pruned trial is judged by) and the final FIDs at the best w at the end, the value the trials table
    ranks completed trials by, so that the study's best trial is the table's first.

    With several workers, the final evaluation's samples are drawn by every rank at once and exchanged first
    (``_final_samples``; the other ranks in ``_final_share``): everything after that is rank 0's alone, while the
    other ranks wait at the report's Ray barrier (``_report``), never in a torch collective. ``eval_s`` is the
    time rank 0 spends alone here. Once the samples are in, the final evaluation cannot fail the trial
    (``_final_scores``).

    The files go through a temporary folder removed as soon as they are uploaded: a trial leaves nothing in the
    system temp folder (its checkpoints live in Ray's storage, its records in MLflow).
    """
    sets = _final_samples(trainer, evaluator.source, 0) if final else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pdcbdm-eval-") as tmp:
        if sets is None:
            out = _proxy_scores(trainer, evaluator, Path(tmp), log)
        else:
            out = _final_scores(trainer, evaluator, sets, Path(tmp), log)
    return {**out, "eval_s": time.perf_counter() - start}


def _proxy_scores(trainer: Trainer, evaluator: Evaluator, folder: Path, log: RankZeroLogger) -> dict[str, Any]:
    """The proxy scores of every evaluation (rank 0 alone), its sample grid logged; the proxies are the
    objectives until the final scores replace them."""
    cfg = trainer.cfg
    images, _, out = evaluator.proxy(trainer.ema.module, guidance=cfg.eval.proxy_guidance, seed=cfg.train.seed,
                                     autocast=trainer.autocast)
    grid = _grid_png(images, trainer.num_classes, folder / f"samples_step{trainer.step:07d}.png")
    log.image(grid, SAMPLES_KEY, trainer.step)
    return {**out, "objective": out["proxy_fid"], "objective_tail": out["proxy_fid_tail"]}


def _final_scores(trainer: Trainer, evaluator: Evaluator, sets: list[Samples], folder: Path,
                  log: RankZeroLogger) -> dict[str, Any]:
    """The last evaluation on rank 0, after training: the proxy, the final scores of ``sets`` (the objectives) and
    the EMA network as the run's model. An error here is recorded and reported with the final checkpoint
    (``_after_training_error``), never raised: raised, it would fail the trial after all its training, and Train
    would restart the workers from the last checkpoint before the end to train and fail again."""
    out: dict[str, Any] = {}
    try:
        out.update(_proxy_scores(trainer, evaluator, folder, log))
        out.update(_final_evaluation(trainer, evaluator, sets, folder, log))
    except Exception as exc:  # noqa: BLE001 - any error of the scores or their records: see the docstring
        unscored = {k: math.nan for k in ("proxy_fid", "proxy_fid_tail")}  # the scheduler's metric must be there
        return {**unscored, **out, "objective": math.nan, "objective_tail": math.nan,
                **_after_training_error(log, "the final evaluation", exc)}
    tail = out.get("fid_tail")
    out.update(objective=out["fid"], objective_tail=out["fid"] if tail is None else tail)
    try:
        log.model(trainer)
    except Exception as exc:  # noqa: BLE001 - the scores stand without the model: see the docstring
        out.update(_after_training_error(log, "logging the EMA network as the run's model", exc))
    return out


def _after_training_error(log: RankZeroLogger, what: str, exc: Exception) -> dict[str, Any]:
    """An error of the final evaluation, recorded where a user looks: its traceback on stderr, its text in the
    run's error tag and as ``eval_error`` in the trial's last report (with the final checkpoint, which a
    restarted worker reports again rather than train: ``train_loop``). Without final scores the caller reports
    NaN objectives: Optuna records the trial FAIL (``tune.searcher``), the trials table ranks it last."""
    print(redact_text("".join(traceback.format_exception(exc))), file=sys.stderr, flush=True)
    text = redact_text(f"{what} failed after training ({type(exc).__name__}: {exc}); the trial keeps its final "
                       f"checkpoint (the run's tag pdcbdm.ray_checkpoint; pipelines/evaluate.py scores it)")
    try:
        log.tags({ERROR_TAG: text[:5000]})
    except Exception as tag_exc:  # noqa: BLE001 - the tracking store may be what failed: the report still says it
        print(f"could not tag the run with the error: {redact_text(str(tag_exc))[:300]}", file=sys.stderr,
              flush=True)
    return {"eval_error": text[:2000]}


def _final_samples(trainer: Trainer, source: SampleSource, rank: int) -> list[Samples] | None:
    """Every rank's part of the final evaluation's sampling (every rank calls it at the last step, before any
    rank works alone: a collective): its rows of every guidance value's samples, their features sent to rank 0
    as soon as they are drawn (``SampleSource.grid_samples``). The sets on rank 0, None on the others."""
    cfg = trainer.cfg
    return source.grid_samples(trainer.ema.module, _guidance_grid(cfg), cfg.eval.num_samples, seed=cfg.train.seed,
                               autocast=trainer.autocast, rank=rank, world=trainer.world_size,
                               label=f"the final evaluation at step {trainer.step}")


def _final_share(trainer: Trainer, source: SampleSource, rank: int) -> None:
    """Rank > 0's part of the final evaluation (``_final_samples``, which rank 0 calls first thing in
    ``_evaluate``); its wait for rank 0's scores follows at the report (``_report``)."""
    _final_samples(trainer, source, rank)


def _evaluators(trainer: Trainer, rank: int, cache_dir: str | None) -> tuple[Evaluator | None, SampleSource]:
    """Rank 0's Evaluator (reference, judge, floors) and every rank's sampling side, both with the trial's share
    exchange (``_share_exchange``). Rank 0 builds first, so that the caches (the digits network) it creates on its
    node are read, not rebuilt, by the ranks beside it; the ranks meet in Ray barriers (``_meet``) after each
    build: a build may take minutes (reference features, a domain CNN trained), and no rank waits for another's
    in a torch collective (NCCL on GPUs: aborted at the process group's timeout)."""
    cfg, device = trainer.cfg, trainer.device
    exchange = _share_exchange(trainer.world_size)
    evaluator = None
    if rank == 0:
        split = evaluation_split(cfg, trainer.counts)  # eval.split_ratio, not the trial's loss.split_ratio
        evaluator = Evaluator.build(cfg, num_classes=trainer.num_classes, head=split.head, tail=split.tail,
                                    device=device, cache_dir=cache_dir, train_counts=trainer.counts)
        evaluator = dataclasses.replace(evaluator, exchange=exchange)
    _meet(trainer)
    if evaluator is not None:
        source = evaluator.source
    else:
        source = SampleSource.build(cfg, num_classes=trainer.num_classes, image_shape=trainer.dataset.image_shape,
                                    device=device, cache_dir=cache_dir)
        source = dataclasses.replace(source, exchange=exchange)
    _meet(trainer)  # rank 0 would otherwise wait for the others' builds in the first training step's all-reduce
    return evaluator, source


def _share_exchange(world: int) -> ShareExchange:
    """Where a trial's workers exchange their evaluation shares: with several workers a gloo process group of
    their own (``new_group`` is a collective: every rank calls it, at the same point), whatever the training's
    backend. Over gloo the shares (CPU tensors) never occupy an NCCL stream, each wait has its own limit sized to
    the work (``ShareExchange.wait_s``) and one that ends raises a Python error naming what it waited for;
    NCCL's timeout aborts the process. Created before training, so that a node pair gloo cannot connect fails the
    trial at its start (within the floor), not after its training."""
    if world == 1:
        return ShareExchange()
    group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=SHARE_WAIT_FLOOR_S))
    return ShareExchange(group)


def _meet(trainer: Trainer) -> None:
    """With several workers, every rank waits here for the others in Ray Train's barrier, which has no timeout
    (Ray logs the ranks it waits for every minute) and ends in an error when a worker fails: the place to wait
    for another rank's work alone (an evaluation, MLflow records, a checkpoint upload), which the waiting rank
    cannot size."""
    if trainer.world_size > 1:
        ray.train.collective.barrier()


def _report(trainer: Trainer, metrics: dict[str, Any], rank: int) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint, with every rank's RNG state (gathered).

    Rank 0 comes from its evaluation, the others straight from training: they wait for it at a Ray barrier first
    (``_meet``), so that the RNG states' gather (a torch collective: NCCL on GPUs) starts with every rank there.
    Ray's report returns on rank 0 only once its checkpoint is uploaded: the others wait for that at a second
    barrier, not in the next training step's all-reduce."""
    _meet(trainer)
    rng_states = trainer.rng_states()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            checkpoint = ray.train.Checkpoint.from_directory(write_checkpoint(trainer, metrics, Path(folder),
                                                                              rng_states))
        ray.train.report(metrics, checkpoint=checkpoint)
    _meet(trainer)


def _inject_fault(trainer: Trainer, rank: int) -> None:
    """The reliability tests' worker faults (``tune.faults``: ``nan@N``, ``kill@N``, ``hold@N``), on rank 0."""
    if rank != 0:
        return
    faults.hold_at(trainer.step)
    for kind in ("kill", "nan"):
        if str(trainer.step) not in faults.armed(kind) or not faults.take(kind, str(trainer.step)):
            continue
        if kind == "kill":
            os._exit(1)
        with torch.no_grad():
            next(trainer.net.parameters()).fill_(float("nan"))


def _diverged(trainer: Trainer, exc: NonFiniteLossError, log: "RankZeroLogger", rank: int) -> None:
    """Report the divergence (every rank finds it at the same window read; the error names the first non-finite
    step); the trial function turns it into a failed trial, without Train restarting the workers into the same
    divergence. The checkpoint carries the report for a resumed search, not weights to train on."""
    log.metrics({"diverged": 1.0}, trainer.step)
    log.tags({ERROR_TAG: str(exc)})  # the run says why even if the driver dies before it records the end
    # the searcher and scheduler read their metrics from every result: report the worst value
    worst = {k: float("inf") for k in ("proxy_fid", "proxy_fid_tail", "objective", "objective_tail")}
    _report(trainer, {"step": trainer.step, "diverged": 1.0, "error": str(exc), **worst}, rank)


def receive_credentials(config: dict[str, Any]) -> None:
    """Worker side of ``tune.trainable.share_credentials``: the tracking credentials behind the object reference
    ``config["secrets"]`` (kept out of the runtime env, which the dashboard shows) set in this process."""
    if config.get("secrets") is not None:
        os.environ.update(ray.get(config["secrets"]))


def _start_records(log: RankZeroLogger, trainer: Trainer, resumed: bool) -> None:
    """Rank 0's records at the start: tags (train.precision may be "auto": what this hardware resolved it to; how
    final scores sample), the training data as the run's input (a new run only) and the system-metrics thread."""
    cfg = trainer.cfg
    log.tags({PRECISION_TAG: trainer.precision, DEVICE_TAG: str(trainer.device), EVAL_PROTOCOL_TAG: cfg.eval.protocol})
    if not resumed:
        log.training_data(cfg, trainer.dataset)
    log.start_system_metrics()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry: ``config`` holds the resolved config dict and the trial's MLflow run (uri, run_id)."""
    receive_credentials(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = Config.from_dict(config["cfg"])
    device = ray.train.torch.get_device()
    if device.type == "cuda":  # a one-worker trial has no TorchTrainer to select its GPU
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.train.seed + rank)
    wrap = ray.train.torch.prepare_model if world > 1 else None
    trainer = Trainer(cfg, load_data(cfg), device=device, rank=rank, world_size=world, wrap_model=wrap)
    log = RankZeroLogger(config.get("mlflow_uri"), config.get("run_id")) if rank == 0 else RankZeroLogger(None, None)
    stored = _restore(trainer)
    if stored is not None and stored.get("diverged"):
        # it diverged before the driver died and Tune's saved state missed the failure: fail it again from its
        # report, rather than train on as if it had not failed
        ray.train.report(stored)
        return
    if stored is not None:
        log.metrics({"resumed_from_step": trainer.step}, trainer.step)
        if trainer.step >= cfg.train.steps:  # killed after its last report: report it again (every rank: a barrier)
            ray.train.report(stored or {"step": trainer.step})
            return
    _start_records(log, trainer, resumed=stored is not None)
    _record_placement(log, trainer.step, world)
    try:
        _train(trainer, log, rank, config.get("cache_dir"))
    finally:
        log.close()




def _record_placement(log: RankZeroLogger, step: int, world: int) -> None:
    """Tag the run with where this attempt's ranks run (``tune.tags.NODES_TAG``.step N, N the step it starts from: a
    restart after a lost worker or node adds a tag, so the run shows every placement). A collective: every rank
    calls it."""
    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if world > 1:
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, node)
    log.tags({nodes_tag(step): ",".join(str(n) for n in nodes)})


def _train(trainer: Trainer, log: RankZeroLogger, rank: int, cache_dir: str | None) -> None:
    """Train to ``train.steps``: window means of the step values every ``train.log_every`` steps and before each
    evaluation (asynchronous), an evaluation (rank 0) and a report with a checkpoint (every rank) every
    ``train.eval_every`` and at the end."""
    cfg = trainer.cfg
    evaluator, source = _evaluators(trainer, rank, cache_dir)
    scoring = scoring_tags(evaluator.scoring()) if evaluator is not None else {}
    log.tags({EXTRACTOR_TAG: source.extractor.identity, **scoring})
    while trainer.step < cfg.train.steps:
        _inject_fault(trainer, rank)
        trainer.advance()
        final = trainer.step == cfg.train.steps
        evaluating = trainer.step % cfg.train.eval_every == 0 or final
        if trainer.step % cfg.train.log_every and not evaluating:
            continue
        try:  # the window's one read: a divergence since the last read stops the trial before anything is saved
            values = trainer.take_window()
        except NonFiniteLossError as exc:
            return _diverged(trainer, exc, log, rank)
        log.metrics(values, trainer.step, wait=False)
        if evaluating:
            metrics: dict[str, Any] = {"step": trainer.step, "loss": values["loss"], "dm": values["dm"]}
            if rank == 0:
                metrics.update(_evaluate(trainer, evaluator, log, final))
                log.metrics({k: v for k, v in metrics.items() if k not in REPORT_ONLY}, trainer.step)
                log.flush(final)  # the driver may read the run as soon as this report ends the trial
            elif final:
                _final_share(trainer, source, rank)
            _report(trainer, metrics, rank)
    return None
