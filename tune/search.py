"""PD-CBDM hyperparameter search: Ray Train per trial, Ray Tune + Optuna (TPE) with ASHA, MLflow for every trial.

    python tune/search.py                          # the embedded default: Digits-LT, CPU, 3 trials
    python tune/search.py --preset smoke           # 3 tiny trials, a few minutes
    python tune/search.py --preset cifar100-lt --set data.root=/data/cifar --gpus-per-worker 1 --trials 32
    python tune/search.py --space my-space.yaml    # another search space (default: tune/spaces/default.yaml)
    python tune/search.py --warm-start searches/digits-20261130-101500   # TPE starts from an earlier search
    python tune/search.py --time-budget 60         # no new trial after an hour; running ones stop at their next report

Everything the search writes goes under --out (default: the current folder): the MLflow store (mlflow.db and
mlartifacts/, unless --tracking-uri points elsewhere), and searches/NAME/ with Ray's trial folders, the Optuna
study (optuna.db), search.json (the command line, the resolved config and search space), budget.json (the time
budget and whether it cut the search) and trials.parquet (one row per trial, for the notebooks).
"""

# This module is the search's command line and what only a search has (the searcher, ASHA, the space, the warm
# starts, search.json); the runner it shares with the grids is tune/runner.py, its Optuna study tune/study.py, its
# end (the ranked table, the three records reconciled) tune/summary.py.

from __future__ import annotations

import argparse
import math
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: import the repository's packages, not tune/'s siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import optuna  # noqa: E402

from pdcbdm.config import (ALLOW_LARGE_FLAG, CEILINGS, Config, ConfigError, apply_overrides,  # noqa: E402
                           check_ceilings)
from pdcbdm.io import write_json_atomic  # noqa: E402
from pdcbdm.presets import PRESETS, preset  # noqa: E402
from pdcbdm.training import ema_ready_step  # noqa: E402
from tune import arguments, space_file, tracking  # noqa: E402
from tune import budget as budget_mod  # noqa: E402
from tune import warm_start as warm_mod  # noqa: E402
from tune.redact import OPTUNA_STORAGE_ENV, remember  # noqa: E402
from tune.runner import (PLACEMENT_HELP, PLACEMENTS, REPO, SearchError, SearchInterrupted, SearchPlan,  # noqa: E402
                         SigintWatch, absolute_location, check_data, check_resources, check_tracking, connect_ray,
                         new_search_id, stop_search, trial_settings)
from tune.search_folder import create_json, driver_lock, read_search_json, warn_if_writable_by_others  # noqa: E402
from tune.study import (check_study_name_free, optuna_storage, resumed_study_location, study_location,  # noqa: E402
                        study_verdicts)
from tune.summary import report_budget, summarise  # noqa: E402

DEFAULT_TRIALS = {"smoke": 3, "digits": 3, "cifar10-lt": 32, "cifar100-lt": 32, "own32": 16, "own64": 16,
                  "own128": 16}
# ASHA's first rung as a fraction of the budget, where the EMA rule alone would cut too early: on digits a proxy FID
# at step 300 of 1,800 did not predict the end (the only trial it kept lost its tail classes after step 1,200)
GRACE_FRACTION = {"digits": 0.5}
# the search.json entries a --resume reads (``SearchPlan.meta`` writes them all)
SAVED_KEYS = ("args", "name", "search_id", "out", "search_dir", "storage", "tracking_uri", "optuna_storage", "space")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tune/search.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits", choices=list(PRESETS),
                   help="base configuration: smoke (tiny, for tests), digits (default: Digits-LT on CPU), "
                        "cifar10-lt / cifar100-lt (the paper's U-Net and schedule; GPUs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field for every trial (repeatable); a searched field set here is "
                        "pinned and no longer searched")
    p.add_argument("--trials", type=int, default=None,
                   help="number of trials (default: 3 smoke, 3 digits, 32 cifar, 16 own)")
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (DDP when > 1)")
    p.add_argument("--placement", choices=PLACEMENTS, default="pack", help=PLACEMENT_HELP)
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs (and torch threads) per worker (default: on this machine's GPUs, its CPUs per GPU, so "
                        "that evaluation gets the cores; else 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker (default: 1 if this machine has CUDA, else 0 = CPU with gloo)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="trials at once (default: the fewest of what the CPUs (--cpus-per-worker per worker, counted "
                        "from this process's CPU affinity on a local cluster) and the GPUs hold)")
    p.add_argument("--out", default=".", help="folder for everything the search writes (default: .)")
    p.add_argument("--name", default=None, help="search name: MLflow parent run, Optuna study, folder; letters, "
                   "digits, '.', '_', '-' (default: PRESET-YYYYmmdd-HHMMSS-xxxx, xxxx random hex)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db); http://host:port for a server "
                        "(credentials: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or "
                        "http://USER:PW@host:port). search.json keeps it with its credentials masked: a --resume of a "
                        "search whose URI held them needs it again, here or in MLFLOW_TRACKING_URI")
    p.add_argument("--experiment", default="pdcbdm", help="MLflow experiment name (default: pdcbdm)")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (same seed, same configs); its "
                   "random start-up is a quarter of --trials, at least 2")
    p.add_argument("--no-asha", action="store_true", help="run every trial to the end (no early stopping)")
    p.add_argument("--asha-grace", type=int, default=None, metavar="STEPS",
                   help="ASHA's first rung in training steps (default: the first evaluation after the EMA is "
                        "meaningful, and for digits half the budget)")
    p.add_argument("--multi-objective", action="store_true",
                   help="Optuna (multi-objective TPE) optimises the final FID and tail-class FID together (a "
                        "Pareto front of the completed trials; ASHA still stops trials on the proxy FID)")
    p.add_argument("--max-trial-failures", type=int, default=0, help="retries of a trial that raises")
    p.add_argument("--address", default="local",
                   help="Ray cluster: 'local' (default: a private cluster on this machine), 'auto' (the running "
                        "cluster), HOST:PORT (a head node's GCS) or ray://HOST:10001 (Ray client)")
    p.add_argument("--storage-path", default=None,
                   help="where Ray keeps trial folders and checkpoints: a shared path or a URI such as "
                        "s3://bucket/prefix (default: OUT/searches/NAME); every node must reach it")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="resume the search in DIR (OUT/searches/NAME) after a crash or kill: finished trials are "
                        "kept, unfinished ones continue from their last checkpoint, the Optuna study and the "
                        "MLflow runs continue; the other flags are taken from DIR/search.json. It unpickles Ray "
                        "Tune's saved state: resume only folders that only you and people you trust can write")
    p.add_argument("--max-worker-failures", type=int, default=1,
                   help="restarts of a trial's worker group from its last checkpoint after a worker dies")
    p.add_argument("--space", default=None, metavar="FILE",
                   help="the search space, a YAML or JSON file: each searched knob's range, scale and step, or its "
                        f"choices (default: {space_file.DEFAULT_SPACE.relative_to(REPO)}, whose comments describe "
                        "the format); a knob pinned with --set is not searched")
    p.add_argument("--warm-start", dest="warm_start", action="append", default=[], metavar="SEARCH_DIR",
                   help="put the finished trials (COMPLETE and PRUNED) of an earlier search (OUT/searches/NAME) "
                        "whose params fit this search's space into its Optuna study before the first trial "
                        "(repeatable); they do not count towards --trials")
    p.add_argument("--time-budget", dest="time_budget", type=float, default=None, metavar="MINUTES",
                   help="no new trial starts after MINUTES; running trials stop at their next report, recorded as "
                        "stopped early (exit status 0). A --resume runs with the --time-budget given to it, "
                        "counted from the resume, or none")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="where the Optuna study lives (default: sqlite OUT/searches/NAME/optuna.db): an RDB URL "
                        "(postgresql://..., mysql://..., sqlite:////abs/path.db) or a journal file path "
                        "(*.log / *.journal, e.g. on shared storage), for studies that must outlive this disk; "
                        "default from the PDCBDM_OPTUNA_STORAGE environment variable, which keeps a password off "
                        "the command line. search.json keeps the URL with its password masked: a --resume needs it "
                        "again, here or in PDCBDM_OPTUNA_STORAGE")
    p.add_argument(ALLOW_LARGE_FLAG, dest="allow_large", action="store_true",
                   help=f"accept sizes above their ceilings: --trials {arguments.MAX_TRIALS:,}, "
                        + ", ".join(f"{k} {v:,}" for k, v in CEILINGS.items())
                        + " (in --set and in the space file)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    """The preset with the --set overrides, within the ceilings of ``pdcbdm.config.CEILINGS`` unless
    --allow-large."""
    try:
        cfg = apply_overrides(preset(args.preset), args.overrides)
        check_ceilings(cfg, getattr(args, "allow_large", False))
        return cfg
    except ConfigError as exc:
        raise SearchError(str(exc)) from None


def build_searcher(args: argparse.Namespace, cfg: Config, name: str, study_storage: str | Path, trials: int,
                   space: dict[str, dict] | None = None, warm: Sequence[Any] = (),
                   budget_file: str | None = None, starts: Sequence[dict] = ()) -> Any:
    """Seeded TPE (multi-objective TPE with --multi-objective), its random start-up sized to the budget, through
    ``StepOptunaSearch``; the study persisted in sqlite; the first trial is the preset, the next ones the space
    file's start points (``starts``, ``tune.space_file.start_points``; the default file's: the CBDM baseline).

    ``space`` is the resolved space (``tune.space_file``; default: the default file against ``cfg``), ``warm``
    the warm-start trials (``tune.warm_start.WarmStart``) added before the first proposal, ``budget_file`` the
    search's budget.json (``tune.budget``) after whose deadline no trial is proposed. TPE's start-up counts the
    warm-start trials (Optuna counts every COMPLETE and PRUNED trial of the study).

    Optuna optimises ``objective`` (and ``objective_tail``): the worker's proxy FID at intermediate evaluations
    (intermediate values, keyed by step; an ASHA-stopped trial is PRUNED) and the final FID at the best w at the
    end (a COMPLETE trial's value), the order trials.parquet ranks completed trials by.
    """
    # deferred: imports Ray, which --help and the checks of bad input never load
    from tune.searcher import MAX_STARTUP_TRIALS, StepOptunaSearch, startup_trials

    if space is None:
        space, starts = space_file.load_with_starts(space_file.DEFAULT_SPACE, cfg, pinned_knobs(args.overrides))
    points, outside = space_file.first_points(space, cfg.flat(), starts)
    # a point beyond the budget would stay WAITING in the study for good (and be asked first by a --resume)
    points = points[:max(trials, 1)]
    if outside:
        print(f"first trial: the preset's configuration, except {', '.join(outside)} (its value lies outside the "
              f"search space: sampled)", flush=True)
    for i, start in enumerate(points[1:], start=2):
        print(f"trial {i}: a start point of the space file: {start}", flush=True)
    metric, mode = (["objective", "objective_tail"], ["min", "min"]) if args.multi_objective else ("objective", "min")
    storage = optuna_storage(study_storage)
    # one sampler for one or several objectives: Optuna's TPE is multi-objective (MOTPE) when the study is
    startup = startup_trials(trials)
    print(f"TPE: {startup} random start-up trial(s) (a quarter of --trials, 2 to {MAX_STARTUP_TRIALS}), then "
          f"guided by the finished ones", flush=True)
    sampler = optuna.samplers.TPESampler(n_startup_trials=startup, seed=args.seed)
    searcher = StepOptunaSearch(space=partial(space_file.suggest, spec=space), metric=metric, mode=mode,
                                points_to_evaluate=points or None, sampler=sampler, study_name=name,
                                storage=storage, max_steps=cfg.train.steps, budget_file=budget_file)
    for source in warm:
        searcher.add_trials(source.trials)
        print(source.summary(), flush=True)
    return searcher


def pinned_knobs(overrides: Sequence[str]) -> tuple[str, ...]:
    """The fields set with --set (not searched)."""
    return tuple(o.split("=", 1)[0].strip() for o in overrides)


def load_space(args: argparse.Namespace, cfg: Config) -> tuple[dict[str, dict], str, list[dict]]:
    """The resolved search space of --space (default: tune/spaces/default.yaml), the file's absolute path and its
    start points (``tune.space_file.start_points``)."""
    path = Path(args.space).resolve() if args.space else space_file.DEFAULT_SPACE
    try:
        spec, starts = space_file.load_with_starts(path, cfg, pinned_knobs(args.overrides),
                                                   getattr(args, "allow_large", False))
        return spec, str(path), starts
    except space_file.SpaceError as exc:
        raise SearchError(str(exc)) from None


def load_warm_starts(args: argparse.Namespace, cfg: Config, space: dict[str, dict]) -> list[Any]:
    """The trials of each --warm-start folder that fit this search (``tune.warm_start``), read before Ray or
    MLflow is touched."""
    dists = space_file.distributions(space)
    directions = ["minimize"] * (2 if args.multi_objective else 1)
    out, seen = [], set()
    for folder in args.warm_start:
        folder = Path(folder).resolve()
        if folder in seen:
            continue
        seen.add(folder)
        try:
            out.append(warm_mod.load(folder, dists, directions, cfg.flat(), optuna_storage))
        except warm_mod.WarmStartError as exc:
            raise SearchError(str(exc)) from None
    return out


def grace_period(cfg: Config, preset_name: str = "", asked: int | None = None) -> int:
    """ASHA's first rung, on an evaluation step: ``asked`` (--asha-grace) when given; else the first evaluation at
    which the EMA network is meaningful (``ema_ready_step``), so that no trial is stopped on an average still
    dominated by its first networks, or the preset's ``GRACE_FRACTION`` of the budget when that is later."""
    every = cfg.train.eval_every
    first = asked if asked is not None else max(every, ema_ready_step(cfg.train.ema_decay),
                                                int(GRACE_FRACTION.get(preset_name, 0.0) * cfg.train.steps))
    return max(every, -(-first // every) * every)


def build_scheduler(args: argparse.Namespace, cfg: Config) -> Any:
    """ASHA on the proxy FID from ``grace_period`` on; FIFO (no early stopping) with --no-asha or when the grace
    period reaches the budget."""
    # deferred: Ray, which --help and the checks of bad input never load
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    grace = grace_period(cfg, args.preset, args.asha_grace)
    if args.no_asha or grace >= cfg.train.steps:
        return FIFOScheduler()
    # time_attr is the training step: after a restore Tune's training_iteration restarts while Train resumes
    return ASHAScheduler(time_attr="step", metric="proxy_fid", mode="min", max_t=cfg.train.steps,
                         grace_period=grace, reduction_factor=2)


def plan(args: argparse.Namespace) -> SearchPlan:
    """Validate the command line (config overrides, data, tracking store, resume folder) without side effects
    (the only ones: OUT is created for a new search's default sqlite store; an http(s) tracking URI's user info
    goes into this process's MLFLOW_TRACKING_USERNAME / PASSWORD, ``tracking.use_uri``). The Optuna storage is
    --optuna-storage, else PDCBDM_OPTUNA_STORAGE, else sqlite in the search folder."""
    if args.resume is not None:
        return plan_resume(args)
    try:
        arguments.check_search_args(args)
    except arguments.ArgumentError as exc:
        raise SearchError(str(exc)) from None
    cfg, trials = check_args(args)
    space, space_path, starts = load_space(args, cfg)
    out = Path(args.out).resolve()
    name = args.name or arguments.default_name(args.preset)
    search_dir = out / "searches" / name
    if (search_dir / "search.json").exists():
        raise SearchError(f"search {name!r} already exists in {search_dir}; resume it with --resume {search_dir} "
                          f"or choose another --name")
    storage = f"{absolute_location(args.storage_path)}/{name}" if args.storage_path else str(search_dir)
    given = tracking.absolute_uri(args.tracking_uri) if args.tracking_uri else tracking.default_tracking_uri(out)
    # remembered before the warm starts open their studies: one may live in the same database
    optuna_storage = remember(study_location(args.optuna_storage or os.environ.get(OPTUNA_STORAGE_ENV), search_dir))
    check_study_name_free(optuna_storage, name, shared=bool(args.optuna_storage or os.environ.get(OPTUNA_STORAGE_ENV)))
    warm = load_warm_starts(args, cfg, space)
    check_tracking(given, create=out if args.tracking_uri is None else None)
    return SearchPlan(args, cfg, name, trials, search_dir, storage, tracking.use_uri(given), False, out,
                      optuna_storage, space, space_path, warm, starts, uri_given=given, search_id=new_search_id())


def plan_resume(args: argparse.Namespace) -> SearchPlan:
    """The search in ``args.resume`` as it was started (its search.json), checked to be restorable before
    anything (MLflow included) is touched."""
    folder = Path(args.resume).resolve()
    saved = read_meta(folder)
    warn_if_writable_by_others(folder, "--resume")
    given_uri, given_storage = args.tracking_uri, args.optuna_storage  # this command's: search.json masks secrets
    args = resumed_args(args, folder, saved["args"])
    cfg, trials = check_args(args)
    name, out, storage = saved["name"], Path(saved["out"]), saved["storage"]
    if storage == saved["search_dir"]:  # the default storage is the search folder, wherever it is now
        storage = str(folder)
    try:
        uri, warnings = tracking.recorded_uri(saved["tracking_uri"], given_uri, f"the search in {folder}")
    except tracking.TrackingError as exc:
        raise SearchError(str(exc)) from None
    for line in warnings:
        print(f"warning: --resume {folder}: {line}", file=sys.stderr, flush=True)
    optuna_storage = resumed_study_location(saved["optuna_storage"], given_storage, folder)
    space = saved["space"]  # the saved space: Tune restores the searcher (and its space) pickled
    p = SearchPlan(args, cfg, name, trials, folder, storage, uri, True, out, optuna_storage, space["knobs"],
                   space["file"], starts=space["start_points"], uri_given=uri, search_id=saved["search_id"])
    if not check_restorable(p):
        print(f"--resume {folder}: no trial had started (the search stopped before Ray ran one): starting it from "
              f"its search.json", flush=True)
        p.resume, p.restart, p.warm = False, True, load_warm_starts(args, cfg, p.space)
    check_tracking(uri)
    p.uri = tracking.use_uri(uri)
    return p


def check_args(args: argparse.Namespace) -> tuple[Config, int]:
    """The trial config and the number of trials; resources and data checked."""
    cfg = check_resources(args, resolve_config(args))
    trials = DEFAULT_TRIALS[args.preset] if args.trials is None else args.trials
    if trials < 1:
        raise SearchError(f"--trials must be >= 1, got {trials}")
    minutes = args.time_budget
    if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
        raise SearchError(f"--time-budget must be a positive number of minutes, got {args.time_budget:g}")
    check_data(cfg)
    return cfg, trials


def check_restorable(p: SearchPlan) -> bool:
    """Whether the Tune state of a --resume can be restored; False when the search never started Tune (no Tune
    folder in a local storage: it can start from its search.json); a SearchError, before MLflow or Ray is
    touched, when Tune's state is missing from a folder or storage that should hold it."""
    from ray import tune as ray_tune  # deferred: Ray, which --help and a new search's checks never load

    if ray_tune.Tuner.can_restore(p.tune_path):
        return True
    if "://" not in p.tune_path and not Path(p.tune_path).exists():
        return False
    raise SearchError(f"--resume {p.search_dir}: no restorable Tune state at {p.tune_path} (the search was "
                      f"killed before its first trial started, or its storage moved)")


def read_meta(folder: Path) -> dict[str, Any]:
    """The search.json of the search a --resume names, holding everything ``plan_resume`` reads."""
    return read_search_json(folder, "--resume", SearchError, SAVED_KEYS)


def resumed_args(args: argparse.Namespace, folder: Path, saved: dict[str, Any]) -> argparse.Namespace:
    """The original command line of the search (search.json), with --address, --concurrency and --time-budget
    taken from this command."""
    restored = argparse.Namespace(**{**vars(parse_args([])), **saved})
    restored.resume, restored.address = str(folder), args.address
    restored.time_budget = args.time_budget  # a resume runs with its own budget (or none), never the spent one
    if args.concurrency:
        restored.concurrency = args.concurrency
    return restored


def run_search(args: argparse.Namespace) -> Any:
    """Validate, connect, then run (or resume) the Tuner; returns the ranked results DataFrame."""
    p = plan(args)
    concurrency = connect_ray(p)
    import ray  # deferred: Ray, which --help and the checks of bad input never load

    try:
        with driver_lock(p.search_dir, f"search {p.name!r}", SearchError):
            tracking.prepare_store(p.uri)
            if not p.resume:
                write_meta(p)
            return execute(p, concurrency)
    finally:
        ray.shutdown()


def write_meta(p: SearchPlan) -> None:
    """search.json of a new search, created exclusively (two drivers that planned the same name: one wins); a
    search restarted from its search.json (``SearchPlan.restart``) writes it again."""
    if p.restart:
        write_json_atomic(p.search_dir / "search.json", p.meta())
    else:
        create_json(p.search_dir / "search.json", p.meta(), f"search {p.name!r}", SearchError)


def execute(p: SearchPlan, concurrency: int) -> Any:
    """Create (or find again) the MLflow runs, run or restore the Tuner, and summarise. Whatever stops the
    driver before the end (Ctrl-C, an exception) leaves no run RUNNING: the unfinished trial runs and the parent
    are marked KILLED and the command that resumes the search is printed."""
    a = p.args
    experiment_id = tracking.ensure_experiment(p.uri, a.experiment, p.out / "mlartifacts")
    parent = tracking.parent_run(p.uri, experiment_id, p.name, {"preset": a.preset, "trials": p.trials,
                                                                "overrides": " ".join(a.overrides), **p.cfg.flat()},
                                 search_id=p.search_id)
    record_space(p, parent)
    print(f"search {p.name}: {p.trials} trials, {concurrency} at a time, {a.workers_per_trial} worker(s) per trial "
          f"({'GPU' if a.gpus_per_worker else 'CPU'}); MLflow {p.uri_shown}; folder {p.search_dir}", flush=True)
    try:
        tuner = build_tuner(p, concurrency, experiment_id, parent)
        budget_mod.start(p.search_dir, a.time_budget)
        with SigintWatch() as watch:
            grid = tuner.fit()
        # fewer trials than asked is an interruption, unless the time budget ended the proposals
        if watch.fired or (len(grid) < p.trials and not budget_mod.reached(p.search_dir)):
            raise SearchInterrupted("interrupted")
        table = summarise(grid, p, experiment_id, parent)
        report_budget(p, parent, table)
        return table
    except BaseException as exc:
        stop_search(p, experiment_id, parent, exc)
        raise


def record_space(p: SearchPlan, parent: str) -> None:
    """The search space (resolved) and the warm-start sources on the parent run: space.json, and the file as a
    param."""
    tracking.log_dict(p.uri, parent, p.space_record(), "space.json")
    params = {"space_file": p.space_file}
    if p.warm:
        params["warm_start"] = ", ".join(f"{w.source} ({len(w.trials)})" for w in p.warm)[:6000]
    tracking.log_params(p.uri, parent, params)


def build_tuner(p: SearchPlan, concurrency: int, experiment_id: str, parent: str) -> Any:
    """A new Tuner, or the restored one of a --resume (errored trials stay errored: Tune, Optuna and MLflow all
    hold them as failed; unfinished ones continue from their last checkpoint)."""
    # deferred: Ray, which --help and the checks of bad input never load
    from ray import tune as ray_tune
    from tune.trainable import BudgetStopper, MlflowStatusCallback, ProgressPrinter, run_trial

    a, cfg = p.args, p.cfg
    settings = trial_settings(p, experiment_id, parent, study_verdicts(p) if p.resume else None)
    trainable = ray_tune.with_resources(ray_tune.with_parameters(run_trial, settings=settings),
                                        {"cpu": 0, "train_driver": 1})
    if p.resume:
        return ray_tune.Tuner.restore(p.tune_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    searcher = build_searcher(a, cfg, p.name, p.optuna_storage, p.trials, p.space, p.warm, p.budget_file, p.starts)
    return ray_tune.Tuner(
        trainable,
        tune_config=ray_tune.TuneConfig(search_alg=searcher, scheduler=build_scheduler(a, cfg), num_samples=p.trials,
                                        max_concurrent_trials=concurrency),
        run_config=ray_tune.RunConfig(name="tune", storage_path=p.storage, verbose=0,
                                      stop=BudgetStopper(p.budget_file, cfg.train.steps),
                                      failure_config=ray_tune.FailureConfig(max_failures=a.max_trial_failures),
                                      callbacks=[MlflowStatusCallback(p.uri, experiment_id, cfg.train.steps,
                                                                      p.search_id),
                                                 ProgressPrinter(cfg.train.steps)]),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The search's exit status: 0 when some trial did not fail, 1 when none ran or every one failed, 2 on bad
    input (printed), 130 when interrupted."""
    args = parse_args(argv)
    try:
        table = run_search(args)
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (SearchInterrupted, KeyboardInterrupt):
        return 130
    return 0 if not table.empty and (table["status"] != "failed").any() else 1


if __name__ == "__main__":
    sys.exit(main())
