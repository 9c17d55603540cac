"""PD-CBDM hyperparameter search: Ray Train per trial, Ray Tune + Optuna (TPE) with ASHA, MLflow for every trial.

    python tune/search.py                          # the embedded default: Digits-LT, small U-Net, CPU, 8 trials
    python tune/search.py --preset smoke           # 3 tiny trials, a few minutes
    python tune/search.py --preset cifar100-lt --set data.root=/data/cifar --gpus-per-worker 1 --trials 32

Everything the search writes goes under --out (default: the current folder): the MLflow store (mlflow.db and
mlartifacts/, unless --tracking-uri points elsewhere), and searches/NAME/ with Ray's trial folders, the Optuna
study (optuna.db), search.json and trials.parquet (one row per trial, for the notebooks).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: import the repository's packages, not tune/'s siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from pdcbdm.config import PRESETS, Config, ConfigError, apply_overrides, preset, write_json_atomic  # noqa: E402
from pdcbdm.models import PRESETS as MODEL_PRESETS  # noqa: E402
from tune import results as results_mod  # noqa: E402
from tune import tracking  # noqa: E402
from tune.space import SEARCHED, config_point, search_space, tsa_choices  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRIALS = {"smoke": 3, "digits": 8, "cifar10-lt": 32, "cifar100-lt": 32}


class SearchError(RuntimeError):
    """Bad input found before any trial starts; the message names the problem."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tune/search.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits", choices=list(PRESETS),
                   help="base configuration: smoke (tiny, for tests), digits (default: Digits-LT on CPU), "
                        "cifar10-lt / cifar100-lt (the paper's U-Net and schedule; GPUs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field for every trial (repeatable); a searched field set here is "
                        "pinned and no longer searched")
    p.add_argument("--trials", type=int, default=None, help="number of trials (default: 3 smoke, 8 digits, 32 cifar)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (DDP when > 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per worker")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker (default: 1 if this machine has CUDA, else 0 = CPU with gloo)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="trials at once (default: what the cluster's CPUs or GPUs hold)")
    p.add_argument("--out", default=".", help="folder for everything the search writes (default: .)")
    p.add_argument("--name", default=None, help="search name: MLflow parent run, Optuna study, folder "
                   "(default: PRESET-YYYYmmdd-HHMMSS)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db); http://host:port for a server")
    p.add_argument("--experiment", default="pdcbdm", help="MLflow experiment name (default: pdcbdm)")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (same seed, same configs)")
    p.add_argument("--no-asha", action="store_true", help="run every trial to the end (no early stopping)")
    p.add_argument("--multi-objective", action="store_true",
                   help="Optuna optimises proxy FID and tail-class proxy FID together (Pareto front)")
    p.add_argument("--max-trial-failures", type=int, default=0, help="retries of a trial that raises")
    p.add_argument("--max-worker-failures", type=int, default=1,
                   help="restarts of a trial's worker group from its last checkpoint after a worker dies")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    try:
        return apply_overrides(preset(args.preset), args.overrides)
    except ConfigError as exc:
        raise SearchError(str(exc)) from None


def check_data(cfg: Config) -> None:
    """Load the training set once in the driver so that missing data fails before any trial starts."""
    from pdcbdm.train import load_data

    try:
        load_data(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise SearchError(f"data set {cfg.data.dataset!r}: {exc}") from None


def resources(args: argparse.Namespace) -> tuple[int, float, int]:
    """(CPUs, GPUs, concurrency) of the local cluster this search starts."""
    cpus = os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    per_trial_gpus = args.workers_per_trial * args.gpus_per_worker
    if args.gpus_per_worker > gpus:
        raise SearchError(f"--gpus-per-worker {args.gpus_per_worker} but this machine has {gpus} GPU(s)")
    if per_trial_gpus > 0:
        fit = int(gpus // per_trial_gpus)
    else:
        fit = int(cpus // (args.workers_per_trial * args.cpus_per_worker))
    if fit < 1:
        raise SearchError(f"one trial needs {args.workers_per_trial} worker(s) x {args.cpus_per_worker} CPU "
                          f"(+{args.gpus_per_worker} GPU) but this machine has {cpus} CPUs and {gpus} GPUs")
    return cpus, gpus, max(1, min(args.concurrency or fit, fit))


def build_searcher(args: argparse.Namespace, cfg: Config, name: str, study_db: Path) -> Any:
    """Seeded TPE through Ray's OptunaSearch, the study persisted in sqlite; the first trial is the preset."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    fixed = tuple(k for k in SEARCHED if any(o.split("=", 1)[0].strip() == k for o in args.overrides))
    levels = MODEL_PRESETS[cfg.model.preset].resolutions
    space = partial(search_space, fixed=fixed, tsa=tsa_choices(levels))
    point = config_point(cfg.flat(), fixed)
    if "model.tsa_resolutions" in point and point["model.tsa_resolutions"] not in tsa_choices(levels):
        point.pop("model.tsa_resolutions")
    metric, mode = (["proxy_fid", "proxy_fid_tail"], ["min", "min"]) if args.multi_objective else ("proxy_fid", "min")
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_db}")
    sampler = optuna.samplers.TPESampler(seed=args.seed) if not args.multi_objective else \
        optuna.samplers.NSGAIISampler(seed=args.seed)
    return OptunaSearch(space=space, metric=metric, mode=mode, points_to_evaluate=[point] if point else None,
                        sampler=sampler, study_name=name, storage=storage)


def build_scheduler(args: argparse.Namespace, cfg: Config) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if args.no_asha or cfg.train.eval_every >= cfg.train.steps:
        return FIFOScheduler()
    # time_attr is the training step: after a restore Tune's training_iteration restarts while Train resumes
    return ASHAScheduler(time_attr="step", metric="proxy_fid", mode="min", max_t=cfg.train.steps,
                         grace_period=cfg.train.eval_every, reduction_factor=2)


def start_ray(cpus: int, gpus: int, concurrency: int) -> None:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, resources={"train_driver": concurrency},
             logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})


def run_search(args: argparse.Namespace) -> Any:
    """Validate everything, then run the Tuner; returns the ranked results DataFrame."""
    cfg = resolve_config(args)
    if args.gpus_per_worker is None:
        args.gpus_per_worker = 1.0 if torch.cuda.is_available() else 0.0
    if cfg.train.device == "auto" and args.gpus_per_worker == 0:
        cfg = apply_overrides(cfg, {"train.device": "cpu"})
    trials = args.trials or DEFAULT_TRIALS[args.preset]
    if trials < 1:
        raise SearchError(f"--trials must be >= 1, got {trials}")
    check_data(cfg)
    cpus, gpus, concurrency = resources(args)
    out = Path(args.out).resolve()
    name = args.name or f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    search_dir = out / "searches" / name
    uri = args.tracking_uri or tracking.default_tracking_uri(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        tracking.check_tracking_uri(uri)
    except tracking.TrackingError as exc:
        raise SearchError(str(exc)) from None
    search_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(search_dir / "search.json", {"args": vars(args), "config": cfg.to_dict(), "trials": trials,
                                                   "tracking_uri": uri, "name": name})
    experiment_id = tracking.ensure_experiment(uri, args.experiment, out / "mlartifacts")
    parent = tracking.parent_run(uri, experiment_id, name, {"preset": args.preset, "trials": trials,
                                                            "overrides": " ".join(args.overrides), **cfg.flat()})
    print(f"search {name}: {trials} trials, {concurrency} at a time, {args.workers_per_trial} worker(s) per trial "
          f"({'GPU' if args.gpus_per_worker else 'CPU'}); MLflow {uri}", flush=True)
    return execute(args, cfg, name, search_dir, uri, experiment_id, parent, trials, cpus, gpus, concurrency)


def execute(args: argparse.Namespace, cfg: Config, name: str, search_dir: Path, uri: str, experiment_id: str,
            parent: str, trials: int, cpus: int, gpus: int, concurrency: int) -> Any:
    import ray
    from ray import tune

    from tune.trainable import MlflowStatusCallback, ProgressPrinter, TrialSettings, run_trial

    settings = TrialSettings(base=cfg.to_dict(), search=name, storage=str(search_dir / "train"), tracking_uri=uri,
                             experiment_id=experiment_id, parent_run_id=parent, workers=args.workers_per_trial,
                             cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                             worker_failures=args.max_worker_failures, env=tracking.env_for_workers())
    start_ray(cpus, gpus, concurrency)
    try:
        trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings),
                                        {"cpu": 0, "train_driver": 1})
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=build_searcher(args, cfg, name, search_dir / "optuna.db"),
                                        scheduler=build_scheduler(args, cfg), num_samples=trials,
                                        max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name="tune", storage_path=str(search_dir), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=args.max_trial_failures),
                                      callbacks=[MlflowStatusCallback(uri, experiment_id),
                                                 ProgressPrinter(cfg.train.steps)]),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    return summarise(grid, cfg, name, search_dir, uri, experiment_id, parent)


def summarise(grid: Any, cfg: Config, name: str, search_dir: Path, uri: str, experiment_id: str, parent: str) -> Any:
    """Ranked table (printed and saved as trials.parquet), parent run closed with the best trial's metrics."""
    runs = {r.data.tags.get(tracking.TRIAL_TAG): r.info.run_id for r in tracking.runs_of_search(uri, experiment_id, name)}
    table = results_mod.trial_rows(grid, cfg.train.steps, runs)
    path = results_mod.write_parquet(table, search_dir / "trials.parquet")
    tracking.log_artifacts(uri, parent, [path])
    done = table[table["status"] == "completed"] if not table.empty else table
    if not done.empty:
        best = done.iloc[0]
        tracking.log_metrics(uri, parent, {f"best_{k}": best[k] for k in ("fid", "fid_tail", "recall", "proxy_fid")
                                           if best[k] is not None}, 0)
    tracking.finish_run(uri, parent, "FINISHED")
    print("\n" + results_mod.format_table(table))
    print(f"\ntrials table: {path}")
    print(f"open the MLflow UI: {tracking.ui_command(uri)}")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        table = run_search(args)
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if not table.empty and (table["status"] != "failed").any() else 1


if __name__ == "__main__":
    sys.exit(main())
