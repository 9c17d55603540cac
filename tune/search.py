"""PD-CBDM hyperparameter search: Ray Train per trial, Ray Tune + Optuna (TPE) with ASHA, MLflow for every trial.

    python tune/search.py                          # the embedded default: Digits-LT, CPU, 3 trials, ~13 min
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

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: import the repository's packages, not tune/'s siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from pdcbdm.config import (ALLOW_LARGE_FLAG, CEILINGS, PRESETS, Config, ConfigError, apply_overrides,  # noqa: E402
                           check_ceilings, preset, write_json_atomic)
from tune import arguments  # noqa: E402
from tune import budget as budget_mod  # noqa: E402
from tune import cluster  # noqa: E402
from tune import ray_access  # noqa: E402
from tune import space_file  # noqa: E402
from tune import warm_start as warm_mod  # noqa: E402
from tune import results as results_mod  # noqa: E402
from tune import tracking  # noqa: E402
from tune import working_dir  # noqa: E402
from tune.redact import (OPTUNA_STORAGE_ENV, has_secret, is_redacted, redact_text, redact_url, remember,  # noqa: E402
                         reveal)
from tune.report import record_search  # noqa: E402
from tune.search_folder import (create_json, driver_lock, read_search_json,  # noqa: E402
                                warn_if_writable_by_others)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRIALS = {"smoke": 3, "digits": 3, "cifar10-lt": 32, "cifar100-lt": 32, "own32": 16, "own64": 16,
                  "own128": 16}
# ASHA's first rung as a fraction of the budget, where the EMA rule alone would cut too early: on digits a proxy FID
# at step 300 of 1,800 did not predict the end (the only trial it kept lost its tail classes after step 1,200)
GRACE_FRACTION = {"digits": 0.5}
PLACEMENTS = ("pack", "spread")
PLACEMENT_HELP = ("where a trial's workers go on a cluster (Ray's placement strategy): pack (default: as few nodes as "
                  "possible, the fastest collectives) or spread (one per node where there is room: a node lost takes "
                  "one rank, and the group restarts on the others)")


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
    p.add_argument("--trials", type=int, default=None, help="number of trials (default: 3 smoke, 3 digits, 32 cifar, 16 own)")
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


def check_data(cfg: Config) -> None:
    """Load the training set once in the driver so that missing data fails before any trial starts."""
    from pdcbdm.train import load_data

    try:
        load_data(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise SearchError(f"data set {cfg.data.dataset!r}: {exc}") from None


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
    import optuna

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


def optuna_storage(spec: str | Path) -> Any:
    """Optuna's storage for a location: an RDB URL (``sqlite:///``, ``postgresql://``, ...), or a journal file
    (any other path; Optuna's file journal, safe on shared storage; a ``.db`` path is a sqlite file). An RDB
    storage pickles with its URL masked (``tune.searcher.MaskedRDBStorage``); a masked ``spec`` (an earlier
    search's search.json, a --warm-start) is taken back from what this process was given or
    PDCBDM_OPTUNA_STORAGE."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from tune.searcher import MaskedRDBStorage

    spec = reveal(str(spec), (OPTUNA_STORAGE_ENV,))
    if is_redacted(spec):
        raise SearchError(f"the Optuna storage {spec} is recorded without its password; give the URL in the "
                          f"{OPTUNA_STORAGE_ENV} environment variable")
    if "://" in spec:
        return MaskedRDBStorage(spec)
    if spec.endswith(".db"):
        return MaskedRDBStorage(f"sqlite:///{Path(spec).resolve()}")
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(spec))


def grace_period(cfg: Config, preset_name: str = "", asked: int | None = None) -> int:
    """ASHA's first rung, on an evaluation step: ``asked`` (--asha-grace) when given; else the first evaluation at
    which the EMA network is meaningful (``ema_ready_step``), so that no trial is stopped on an average still
    dominated by its first networks, or the preset's ``GRACE_FRACTION`` of the budget when that is later."""
    from pdcbdm.training import ema_ready_step

    every = cfg.train.eval_every
    first = asked if asked is not None else max(every, ema_ready_step(cfg.train.ema_decay),
                                                int(GRACE_FRACTION.get(preset_name, 0.0) * cfg.train.steps))
    return max(every, -(-first // every) * every)


def build_scheduler(args: argparse.Namespace, cfg: Config) -> Any:
    """ASHA on the proxy FID from ``grace_period`` on; FIFO (no early stopping) with --no-asha or when the grace
    period reaches the budget."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    grace = grace_period(cfg, args.preset, args.asha_grace)
    if args.no_asha or grace >= cfg.train.steps:
        return FIFOScheduler()
    # time_attr is the training step: after a restore Tune's training_iteration restarts while Train resumes
    return ASHAScheduler(time_attr="step", metric="proxy_fid", mode="min", max_t=cfg.train.steps,
                         grace_period=grace, reduction_factor=2)


@dataclass
class SearchPlan:
    """Everything a search needs, resolved and validated before Ray or MLflow is touched. ``name``, ``out``,
    ``storage``, ``uri`` and ``optuna_storage`` are resolved (absolute) and saved in search.json, so that
    ``--resume`` finds the same search from any working directory; the URLs there with their secrets masked
    (``tune.redact``), which a --resume takes again from the flag or environment variable the user gives.

    ``uri`` is the tracking URI this process uses (``tracking.use_uri``: an http(s) URI without its user info,
    which went into the environment), ``uri_given`` the URI as the user gave it ("": the same)."""

    args: argparse.Namespace
    cfg: Config
    name: str
    trials: int
    search_dir: Path
    storage: str
    uri: str
    resume: bool = False
    out: Path = Path(".")
    optuna_storage: str = ""
    space: dict[str, dict] | None = None  # the resolved search space (None: a search from before space files)
    space_file: str = ""
    warm: list[Any] = field(default_factory=list)  # tune.warm_start.WarmStart per --warm-start folder
    starts: list[dict] = field(default_factory=list)  # the space file's start points
    uri_given: str = ""
    search_id: str = ""  # unique per search (search.json): the MLflow runs are found by it, never by the name
    restart: bool = False  # a --resume of a search that never started a trial: it starts from its search.json

    @property
    def tune_path(self) -> str:
        return f"{self.storage}/tune"

    @property
    def budget_file(self) -> str:
        return str(self.search_dir / budget_mod.BUDGET_FILE)

    def space_record(self) -> dict[str, Any]:
        """The search space as recorded (search.json, the parent run's space.json): the file and its knobs
        resolved against the preset, the pinned ones left out."""
        return {"file": self.space_file, "knobs": self.space, "start_points": self.starts}

    @property
    def uri_shown(self) -> str:
        """The tracking URI as messages and files show it: as given, its secrets masked."""
        return redact_url(self.uri_given or self.uri)

    def meta(self) -> dict[str, Any]:
        """search.json: the command line and everything resolved from it, every URL with its secrets masked;
        ``redacted`` names the entries that lost a secret (a --resume needs them given again)."""
        real = {"tracking_uri": self.uri_given or self.uri, "optuna_storage": self.optuna_storage}
        args = {**vars(self.args), **{k: redact_url(v) for k, v in vars(self.args).items()
                                      if k in real and isinstance(v, str)}}
        return {"args": args, "config": self.cfg.to_dict(), "trials": self.trials, "name": self.name,
                "search_id": self.search_id,
                "out": str(self.out), "search_dir": str(self.search_dir), "storage": self.storage,
                "tracking_uri": redact_url(real["tracking_uri"]), "optuna_storage": redact_url(self.optuna_storage),
                "redacted": sorted(k for k, v in real.items() if has_secret(v)), "space": self.space_record(),
                "warm_start": {str(w.source): len(w.trials) for w in self.warm}}

    def resume_command(self) -> str:
        """The exact command that continues this search."""
        cmd = f"python tune/search.py --resume {shlex.quote(str(self.search_dir))}"
        return cmd if self.args.address == "local" else f"{cmd} --address {shlex.quote(self.args.address)}"


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
    anything (MLflow included) is touched. search.json of older versions (name null, out relative) is read with
    the folder's own name and location."""
    folder = Path(args.resume).resolve()
    saved = read_meta(folder)
    warn_if_writable_by_others(folder, "--resume")
    given_uri, given_storage = args.tracking_uri, args.optuna_storage  # this command's: search.json masks secrets
    args = resumed_args(args, folder, saved["args"])
    cfg, trials = check_args(args)
    name = saved.get("name") or folder.name
    out = Path(saved["out"]) if saved.get("out") else (
        folder.parents[1] if folder.parent.name == "searches" else Path(args.out).resolve())
    storage = saved.get("storage") or (f"{absolute_location(args.storage_path)}/{name}" if args.storage_path
                                       else str(folder))
    if storage == saved.get("search_dir"):  # the default storage is the search folder, wherever it is now
        storage = str(folder)
    try:
        uri, warnings = tracking.recorded_uri(saved.get("tracking_uri") or tracking.default_tracking_uri(out),
                                              given_uri, f"the search in {folder}")
    except tracking.TrackingError as exc:
        raise SearchError(str(exc)) from None
    for line in warnings:
        print(f"warning: --resume {folder}: {line}", file=sys.stderr, flush=True)
    optuna_storage = resumed_study_location(saved.get("optuna_storage") or study_location(None, folder),
                                            given_storage, folder)
    space = saved.get("space") or {}  # the saved space: Tune restores the searcher (and its space) pickled
    p = SearchPlan(args, cfg, name, trials, folder, storage, uri, True, out, optuna_storage, space.get("knobs"),
                   space.get("file", ""), starts=space.get("start_points") or [], uri_given=uri,
                   search_id=saved.get("search_id") or name)
    if not check_restorable(p):
        print(f"--resume {folder}: no trial had started (the search stopped before Ray ran one): starting it from "
              f"its search.json", flush=True)
        p.resume, p.restart, p.warm = False, True, load_warm_starts(args, cfg, p.space or {})
    check_tracking(uri)
    p.uri = tracking.use_uri(uri)
    return p


def check_study_name_free(location: str, name: str, shared: bool) -> None:
    """A new search's Optuna study must not exist yet: in a storage shared between searches (--optuna-storage,
    PDCBDM_OPTUNA_STORAGE) a second search of the same name would otherwise continue the first one's study. The
    default storage lives in the search's own folder, which search.json already guards."""
    import optuna

    if not shared:
        return
    try:
        names = optuna.study.get_all_study_names(storage=optuna_storage(location))
    except SearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - a driver's or a file's error: the storage is unusable
        raise SearchError(f"--optuna-storage {redact_url(location)}: cannot be opened ({redact_text(str(exc))[:200]})"
                          ) from None
    if name in names:
        raise SearchError(f"the Optuna storage {redact_url(location)} already holds a study named {name!r} (another "
                          f"search's); choose another --name, or --resume that search")


def new_search_id() -> str:
    """A search's unique id (``tracking.SEARCH_ID_TAG``): two searches of one name never share MLflow runs."""
    return uuid.uuid4().hex


def resumed_study_location(saved: str, given: str | None, folder: Path) -> str:
    """The Optuna storage of a --resume: search.json's (``saved``); where search.json keeps the URL masked, the
    real one from this command's --optuna-storage or PDCBDM_OPTUNA_STORAGE, whichever masks to it (same scheme,
    host and database), remembered for the searcher Tune unpickles (``tune.searcher.MaskedRDBStorage``). A
    --optuna-storage naming another storage, or a masked URL given neither way, is a SearchError."""
    given = study_location(given, folder) if given else None
    if given and redact_url(given) != saved:
        raise SearchError(f"--optuna-storage {redact_url(given)} is not the Optuna storage of the search in {folder} "
                          f"({saved}); give that one, or leave the flag out")
    if not is_redacted(saved):
        return saved
    env = os.environ.get(OPTUNA_STORAGE_ENV)
    for candidate in (given, study_location(env, folder) if env else None):
        if candidate and redact_url(candidate) == saved:
            return remember(candidate)
    raise SearchError(f"--resume {folder}: search.json keeps the Optuna storage URL without its password ({saved}); "
                      f"give it again with --optuna-storage URL or the {OPTUNA_STORAGE_ENV} environment variable")


def check_args(args: argparse.Namespace) -> tuple[Config, int]:
    """The trial config and the number of trials; resources and data checked."""
    cfg = check_resources(args, resolve_config(args))
    trials = DEFAULT_TRIALS[args.preset] if args.trials is None else args.trials
    if trials < 1:
        raise SearchError(f"--trials must be >= 1, got {trials}")
    minutes = getattr(args, "time_budget", None)  # getattr: search.json of older versions has no such flag
    if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
        raise SearchError(f"--time-budget must be a positive number of minutes, got {args.time_budget:g}")
    check_data(cfg)
    return cfg, trials


def check_resources(args: argparse.Namespace, cfg: Config) -> Config:
    """Validate the per-worker resources (--gpus-per-worker defaults to 1 with CUDA, else 0); a CPU-only run's
    ``train.device`` "auto" becomes "cpu". Shared with the grid runner (tune/grid.py)."""
    asked = args.gpus_per_worker
    if args.gpus_per_worker is None:
        args.gpus_per_worker = 1.0 if torch.cuda.is_available() else 0.0
    if args.cpus_per_worker is None:
        args.cpus_per_worker = default_cpus_per_worker(args.address, args.gpus_per_worker, usable_cpus(),
                                                       torch.cuda.device_count())
    if args.gpus_per_worker < 0 or args.cpus_per_worker <= 0 or args.workers_per_trial < 1:
        raise SearchError("--workers-per-trial must be >= 1, --cpus-per-worker > 0 and --gpus-per-worker >= 0")
    if args.workers_per_trial > 1 and 0 < args.gpus_per_worker < 1:
        raise SearchError(f"--gpus-per-worker {args.gpus_per_worker} with --workers-per-trial "
                          f"{args.workers_per_trial}: a fractional GPU would put two NCCL ranks of one trial on one "
                          f"GPU; use whole GPUs per worker, or one worker per trial")
    check_gpus(args.address, asked, cfg)
    if cfg.train.device == "auto" and args.gpus_per_worker == 0:
        cfg = apply_overrides(cfg, {"train.device": "cpu"})
    return cfg


def default_cpus_per_worker(address: str, gpus_per_worker: float, cpus: int, gpus: int) -> float:
    """A GPU worker on this machine gets its share of the CPUs (CPUs per GPU, times its GPUs): its evaluation's
    metrics run on the CPU threads it is given, and one thread would leave the rest idle. A CPU worker, or one on
    a remote cluster (whose nodes this driver cannot count before it joins), gets 1."""
    if address != "local" or gpus_per_worker <= 0 or gpus < 1:
        return 1.0
    return float(max(1, math.floor(cpus / gpus * gpus_per_worker)))


def check_gpus(address: str, asked: float | None, cfg: Config) -> None:
    """On a local cluster, refuse to train on the CPU what asks for GPUs when torch sees none, naming why
    (``cuda_diagnosis``): an explicit --gpus-per-worker > 0 (``asked``), or by default a network sized for GPUs
    (``GPU_MODEL_PRESETS``), which --gpus-per-worker 0 trains on the CPU anyway. A remote cluster's workers have
    their own GPUs: nothing is checked here."""
    from pdcbdm.training.cuda import GPU_MODEL_PRESETS, cuda_diagnosis

    if address != "local" or torch.cuda.is_available():
        return
    if asked is not None and asked > 0:
        raise SearchError(f"--gpus-per-worker {asked:g}: torch sees no GPU ({cuda_diagnosis()})")
    if asked is None and cfg.model.preset in GPU_MODEL_PRESETS:
        raise SearchError(f"model.preset {cfg.model.preset} is sized for GPUs and torch sees none "
                          f"({cuda_diagnosis()}); pass --gpus-per-worker 0 to train it on the CPU anyway")


def absolute_location(path: str) -> str:
    """A storage location as every later command sees it: URIs as given, local paths absolute."""
    path = path.rstrip("/") or "/"
    return path if "://" in path else str(Path(path).resolve())


def study_location(spec: str | None, search_dir: Path) -> str:
    """The Optuna storage: an RDB URL (a relative sqlite path made absolute), a journal file path (absolute), or
    by default sqlite in the search folder."""
    if not spec:
        return f"sqlite:///{search_dir / 'optuna.db'}"
    if "://" in spec:
        return tracking.absolute_uri(spec)
    return str(Path(spec).resolve())


def check_tracking(uri: str, create: Path | None = None) -> None:
    if create is not None:
        create.mkdir(parents=True, exist_ok=True)
    try:
        tracking.check_tracking_uri(uri)
    except tracking.TrackingError as exc:
        raise SearchError(str(exc)) from None


def check_restorable(p: SearchPlan) -> bool:
    """Whether the Tune state of a --resume can be restored; False when the search never started Tune (no Tune
    folder in a local storage: it can start from its search.json); a SearchError, before MLflow or Ray is
    touched, when Tune's state is missing from a folder or storage that should hold it."""
    from ray import tune

    if tune.Tuner.can_restore(p.tune_path):
        return True
    if "://" not in p.tune_path and not Path(p.tune_path).exists():
        return False
    raise SearchError(f"--resume {p.search_dir}: no restorable Tune state at {p.tune_path} (the search was "
                      f"killed before its first trial started, or its storage moved)")


def read_meta(folder: Path) -> dict[str, Any]:
    """The search.json of the search a --resume names."""
    return read_search_json(folder, "--resume", SearchError, ("args",))


def resumed_args(args: argparse.Namespace, folder: Path, saved: dict[str, Any]) -> argparse.Namespace:
    """The original command line of the search (search.json), with --address, --concurrency and --time-budget
    taken from this command."""
    restored = argparse.Namespace(**{**vars(parse_args([])), **saved})
    restored.resume, restored.address = str(folder), args.address
    restored.time_budget = args.time_budget  # a resume runs with its own budget (or none), never the spent one
    if args.concurrency:
        restored.concurrency = args.concurrency
    return restored


def connect_ray(p: SearchPlan) -> int:
    """Start a private local cluster or join an existing one; returns the number of trials that fit at once."""
    import ray

    a = p.args
    # no credentials here: a runtime env is shown on the dashboard; they reach the trials in TrialSettings
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # a diverged trial's last report has no FID
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables; ProgressPrinter says what matters
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        ray_access.require_token_auth(a.address)
    except ray_access.AccessError as exc:
        raise SearchError(str(exc)) from None
    if a.address == "local":
        ray_access.bind_loopback()
        # Ray Train's preemption watcher (an actor per trial) polls for nodes being drained: one machine has no
        # node to lose to a drain, and each watcher is one more process to start on every trial
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        cpus, gpus = usable_cpus(), torch.cuda.device_count()
        fit = fits(a, cpus, gpus)
        # Train's placement-group cleaner finds the cluster through the state API, which refuses to guess when
        # several Ray instances run on one machine (two searches, a notebook): point it at this one's dashboard.
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, resources={"train_driver": fit},
                 include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 runtime_env={"env_vars": env}, **quiet)
        return fit
    check_address(a.address)
    try:
        cluster.check_tracking_for_cluster(p.uri, a.address)
    except cluster.ClusterError as exc:
        raise SearchError(str(exc)) from None
    upload = working_dir.plan_upload(REPO)
    print(upload.summary(), flush=True)
    runtime_env = {"env_vars": env, "working_dir": str(REPO), "excludes": upload.excludes}
    try:
        ray.init(address=a.address, runtime_env=runtime_env, **quiet)
    except Exception as exc:  # ConnectionError, RuntimeError, grpc errors depending on the address kind
        raise SearchError(f"cannot join the Ray cluster at --address {a.address} ({exc}). {ray_access.JOIN_HINT}") \
            from None
    res = ray.cluster_resources()
    drivers = int(res.get("train_driver", 0))
    if drivers < 1:
        ray.shutdown()
        raise SearchError(f"the Ray cluster at {a.address} has no 'train_driver' resource; start its head with "
                          f"`RAY_AUTH_MODE=token ray start --head --resources='{{\"train_driver\": 8}}'` (the "
                          f"number of trials that may run at once)")
    try:
        cluster.check_storage_for_cluster(p.storage, a.address)
        cluster.check_assets_for_cluster(p.cfg, a.address)
    except cluster.ClusterError as exc:
        ray.shutdown()
        raise SearchError(str(exc)) from None
    return min(drivers, fits(a, res.get("CPU", 0), res.get("GPU", 0)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (a container's or taskset's share), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def fits(a: argparse.Namespace, cpus: float, gpus: float) -> int:
    """Trials that fit at once: the fewest of what the CPUs hold (every worker takes --cpus-per-worker, on GPUs
    too) and what the GPUs hold, capped by --concurrency."""
    per_trial_cpu = a.workers_per_trial * a.cpus_per_worker
    fit = math.floor(cpus / per_trial_cpu + 1e-9)
    if fit < 1:
        raise SearchError(f"one trial needs {a.workers_per_trial} worker(s) x {a.cpus_per_worker} CPU but the "
                          f"cluster has {cpus:g} CPUs")
    if a.gpus_per_worker > 0:
        per_trial_gpu = a.workers_per_trial * a.gpus_per_worker
        by_gpu = math.floor(gpus / per_trial_gpu + 1e-9)
        if by_gpu < 1:
            raise SearchError(f"one trial needs {a.workers_per_trial} x {a.gpus_per_worker} GPU but the cluster "
                              f"has {gpus:g} GPU(s)")
        fit = min(fit, by_gpu)
    return max(1, min(a.concurrency or fit, fit))


def check_address(address: str) -> None:
    """A quick TCP probe so that a wrong HOST:PORT fails in seconds, not after Ray's long retries."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SearchError(f"--address {address!r} must be 'local', 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise SearchError(f"Ray address {address} is unreachable ({exc.strerror or exc})") from None


def run_search(args: argparse.Namespace) -> Any:
    """Validate, connect, then run (or resume) the Tuner; returns the ranked results DataFrame."""
    p = plan(args)
    concurrency = connect_ray(p)
    import ray

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


class SearchInterrupted(RuntimeError):
    """The search was stopped by Ctrl-C (SIGINT) or SIGUSR1 before every trial ended; its state is saved."""


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
        budget_mod.start(p.search_dir, getattr(a, "time_budget", None))
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
    param. A search from before space files (a resume) has none to record."""
    if p.space is None:
        return
    tracking.log_dict(p.uri, parent, p.space_record(), "space.json")
    params = {"space_file": p.space_file}
    if p.warm:
        params["warm_start"] = ", ".join(f"{w.source} ({len(w.trials)})" for w in p.warm)[:6000]
    tracking.log_params(p.uri, parent, params)


def report_budget(p: SearchPlan, parent: str, table: Any) -> None:
    """Print and tag (``pdcbdm.time_budget``) what the time budget cut, when it cut anything."""
    line = budget_mod.summary(p.search_dir, table, p.trials)
    if line:
        print(line, flush=True)
        tracking.set_tags(p.uri, parent, {"pdcbdm.time_budget": line})


def trial_settings(p: SearchPlan, experiment_id: str, parent: str) -> Any:
    """What every trial shares, pickled into the trainable (``tune.with_parameters``: Ray's object store). The
    tracking credentials of this environment travel here, never in a runtime env, which the dashboard shows."""
    from tune.trainable import TrialSettings

    a = p.args
    return TrialSettings(base=p.cfg.to_dict(), search=p.name, storage=f"{p.storage}/train", tracking_uri=p.uri,
                         experiment_id=experiment_id, parent_run_id=parent, workers=a.workers_per_trial,
                         cpus_per_worker=a.cpus_per_worker, gpus_per_worker=a.gpus_per_worker,
                         worker_failures=a.max_worker_failures, placement=getattr(a, "placement", "pack"), env=tracking.env_for_workers(),
                         search_id=p.search_id, optuna_verdicts=study_verdicts(p) if p.resume else {})


def study_verdicts(p: SearchPlan) -> dict[str, Any]:
    """A resume's Optuna verdicts (``tune.verdicts``) by Tune trial id; none for a grid (no study) or when the
    study was never created (a search killed before its first trial)."""
    from tune import verdicts

    if not p.optuna_storage:
        return {}
    try:
        study = load_study(p)
    except KeyError:
        return {}
    return verdicts.from_study(study)


def build_tuner(p: SearchPlan, concurrency: int, experiment_id: str, parent: str) -> Any:
    """A new Tuner, or the restored one of a --resume (errored trials stay errored: Tune, Optuna and MLflow all
    hold them as failed; unfinished ones continue from their last checkpoint)."""
    from ray import tune

    from tune.trainable import BudgetStopper, MlflowStatusCallback, ProgressPrinter, run_trial

    a, cfg = p.args, p.cfg
    settings = trial_settings(p, experiment_id, parent)
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings), {"cpu": 0, "train_driver": 1})
    if p.resume:
        return tune.Tuner.restore(p.tune_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=build_searcher(a, cfg, p.name, p.optuna_storage, p.trials, p.space,
                                                              p.warm, p.budget_file, p.starts),
                                    scheduler=build_scheduler(a, cfg), num_samples=p.trials,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name="tune", storage_path=p.storage, verbose=0,
                                  stop=BudgetStopper(p.budget_file, cfg.train.steps),
                                  failure_config=tune.FailureConfig(max_failures=a.max_trial_failures),
                                  callbacks=[MlflowStatusCallback(p.uri, experiment_id, cfg.train.steps,
                                                                  p.search_id),
                                             ProgressPrinter(cfg.train.steps)]),
    )


class SigintWatch:
    """Tells whether ``Tuner.fit`` was stopped by Ctrl-C (or SIGUSR1), after which Tune returns normally.

    Tune installs its own SIGINT handler for the run and, when the signal comes, puts back the handler it
    found and ends the run. The handler installed here is the one it finds: if it is in place after ``fit``, the
    signal came. It raises KeyboardInterrupt itself (a second Ctrl-C while Tune saves its state)."""

    def __init__(self) -> None:
        self.fired = False
        self._previous: Any = None
        self._active = threading.current_thread() is threading.main_thread()

    @staticmethod
    def _handler(sig: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __enter__(self) -> "SigintWatch":
        if self._active:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._active:
            tune_handler_gone = signal.getsignal(signal.SIGINT) is self._handler
            self.fired = tune_handler_gone and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
            signal.signal(signal.SIGINT, self._previous)


def stop_search(p: SearchPlan, experiment_id: str, parent: str, exc: BaseException) -> None:
    """After an interruption or a driver error: every unfinished run of the search (trials and parent) KILLED,
    and the command that resumes it printed. Never masks ``exc``."""
    why = "was interrupted" if isinstance(exc, (SearchInterrupted, KeyboardInterrupt)) else \
        f"stopped on an error in the driver ({type(exc).__name__}: {redact_text(str(exc))})"
    try:
        killed = tracking.kill_unfinished(p.uri, experiment_id, p.search_id, parent)
    except Exception as err:  # noqa: BLE001 - the store may be what failed
        killed = f"could not mark its MLflow runs KILLED ({type(err).__name__}: {redact_text(str(err))})"
    else:
        killed = f"{killed} unfinished trial run(s) and the parent run marked KILLED in MLflow"
    print(f"\nsearch {p.name} {why}; {killed}. Tune saved its state: continue it with\n  {p.resume_command()}"
          f"{resume_needs(p)}", file=sys.stderr, flush=True)


def resume_needs(p: SearchPlan) -> str:
    """What a --resume must be given again because search.json keeps it masked (nothing: "")."""
    needs = [f"the {what} with its secret ({flag} URL or {env})" for what, url, flag, env in (
        ("MLflow tracking URI", p.uri_given or p.uri, "--tracking-uri", tracking.TRACKING_ENV),
        ("Optuna storage URL", p.optuna_storage, "--optuna-storage", OPTUNA_STORAGE_ENV)) if has_secret(url)]
    return f"\n  given {' and '.join(needs)}" if needs else ""


def summarise(grid: Any, p: SearchPlan, experiment_id: str, parent: str) -> Any:
    """Ranked table (printed and saved as trials.parquet), Optuna and MLflow brought in line with it, parent run
    closed with the best trial's metrics."""
    cfg, uri = p.cfg, p.uri
    found = tracking.runs_of_search(uri, experiment_id, p.search_id)
    runs = {r.data.tags.get(tracking.TRIAL_TAG): r.info.run_id for r in found}
    table = results_mod.trial_rows(grid, cfg.train.steps, runs)
    reconcile_records(p, table, {r.info.run_id: r.info.status for r in found})
    close_lost_runs(uri, found, set(table["trial_id"]) if not table.empty else set())
    path = results_mod.write_parquet(table, p.search_dir / "trials.parquet")
    tracking.log_artifacts(uri, parent, [path])
    command = record_search(uri, parent, table, load_study(p), p.args.preset, p.args.overrides)
    done = table[table["status"] == "completed"] if not table.empty else table
    if not done.empty:
        best = done.iloc[0]
        tracking.log_metrics(uri, parent, {f"best_{k}": best[k] for k in ("fid", "fid_tail", "recall", "proxy_fid")
                                           if best[k] is not None}, 0)
    tracking.finish_run(uri, parent, "FINISHED")
    print("\n" + results_mod.format_table(table))
    print(f"\ntrials table: {path}")
    if command:
        print(f"train the best trial's configuration again: {command}")
    print(f"open the MLflow UI: {tracking.ui_command(uri)}")
    print(confirm_hint(p.search_dir, len(done)))
    return table


def confirm_hint(search_dir: Path, completed: int) -> str:
    """The closing line: the command that re-trains the top trials over new seeds (``pipelines.confirm``), or,
    with fewer than two completed trials, why there is none (confirm compares rank 1 with rank 2)."""
    if completed < 2:
        return (f"no confirm command: {completed} completed trial(s), and confirming a winner needs 2 (ASHA stopped "
                f"the others; run more --trials, or --no-asha)")
    return (f"confirm the winner over new seeds: python -m pipelines.confirm --search {shlex.quote(str(search_dir))} "
            f"--top {min(3, completed)} --seeds 3")


def load_study(p: SearchPlan) -> Any:
    """The search's Optuna study."""
    import optuna

    return optuna.load_study(study_name=p.name, storage=optuna_storage(p.optuna_storage))


def reconcile_records(p: SearchPlan, table: Any, run_status: dict[str, str]) -> None:
    """Every trial ends in the same state in Tune (the table), Optuna and MLflow, also after a resume whose
    driver died between a trial's end and the bookkeeping of it: an Optuna trial still RUNNING is told its end,
    an MLflow run not yet ended is set FINISHED (completed or stopped) or FAILED."""
    from tune.searcher import finite, reconcile

    study = load_study(p)
    multi = len(study.directions) > 1
    outcomes = {}
    for row in table.itertuples():
        fid, tail = finite(getattr(row, "fid", None)), finite(getattr(row, "fid_tail", None))
        values = None if fid is None else ([fid, fid if tail is None else tail] if multi else [fid])
        outcomes[row.trial_id] = (row.status, values)
        run_id = row.mlflow_run_id
        fill_lost_metrics(p.uri, row)
        if run_id and run_status.get(run_id) in ("RUNNING", "SCHEDULED", "KILLED"):
            error = row.error if row.status == "failed" and isinstance(row.error, str) else None
            tracking.finish_run(p.uri, run_id, "FAILED" if row.status == "failed" else "FINISHED", error,
                                row_outcome(row))
    reconcile(study, outcomes)


def fill_lost_metrics(uri: str, row: Any) -> None:
    """The metrics Tune holds for the trial's last step (its proxy FID when stopped, its scores when completed),
    logged to its run where the run has none at that step: a trial stopped by ASHA or the budget while its
    records waited out a tracking outage, or killed with them, never sent them."""
    from tune.searcher import finite

    step = finite(getattr(row, "step", None))
    if not row.mlflow_run_id or step is None or row.status == "failed":
        return
    keys = ("proxy_fid", "proxy_fid_tail") if row.status == "stopped" else results_mod.SCORE_COLUMNS
    values = {k: finite(getattr(row, k, None)) for k in keys}
    try:
        tracking.log_missing(uri, row.mlflow_run_id, {k: v for k, v in values.items() if v is not None}, int(step))
    except Exception as err:  # noqa: BLE001 - a repair: the table and Optuna hold the values regardless
        print(f"could not add trial {row.trial_id}'s last metrics to its MLflow run "
              f"({type(err).__name__}: {redact_text(str(err))[:200]})", file=sys.stderr)


def close_lost_runs(uri: str, runs: Sequence[Any], trial_ids: set[str]) -> list[str]:
    """Mark KILLED the search's runs still RUNNING whose trial Tune does not hold: a trial started in the last
    seconds before the driver was killed has its MLflow run, but Tune's saved state never had it and a resume
    never runs it. Returns their run ids."""
    lost = [r.info.run_id for r in runs if r.info.status in ("RUNNING", "SCHEDULED")
            and r.data.tags.get(tracking.TRIAL_TAG) not in trial_ids]
    for run_id in lost:
        tracking.finish_run(uri, run_id, "KILLED", None, "lost: started just before the driver was killed, never "
                                                         "run by Tune")
    return lost


def row_outcome(row: Any) -> str:
    """The run's outcome tag (``tracking.OUTCOME_TAG``) from its trials-table row."""
    from tune.searcher import finite
    from tune.trainable import failure_outcome

    if row.status == "failed":
        return failure_outcome(row.error if isinstance(row.error, str) else None)
    if row.status == "stopped":
        step = finite(getattr(row, "step", None))
        what = ("stopped by the time budget" if getattr(row, "stopped_by", None) == "time budget"
                else "early-stopped by ASHA")
        return f"{what} at step {int(step)}" if step is not None else what
    return "completed"


def main(argv: Sequence[str] | None = None) -> int:
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
