"""The runner the search (tune/search.py) and the grids (tune/grid.py: the ablation, the confirmation) share: how
a set of trials runs on Ray, whatever chose their configurations. It imports neither of them; both import it.

- the plan (``SearchPlan``, which ``tune.grid.GridPlan`` extends) and the errors: ``SearchError`` (bad input, found
  before any trial starts) and ``SearchInterrupted`` (Ctrl-C or SIGUSR1; Tune saved its state);
- the checks made before Ray or MLflow is touched: the per-worker resources and GPUs, the data, the tracking store,
  storage locations made absolute;
- the Ray connection: a private cluster on this machine or an existing one (token authentication, and the tracking
  store, storage and assets every node must reach), and how many trials fit at once;
- the settings every trial shares (``trial_settings``, pickled into the trainable);
- the stop: a Ctrl-C seen through Tune (``SigintWatch``), and after an interruption or a driver error no MLflow run
  left RUNNING and the command that resumes printed (``stop_search``).
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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from pdcbdm.config import Config, apply_overrides
from pdcbdm.train import load_data
from pdcbdm.training.cuda import GPU_NETWORKS, cuda_diagnosis
from tune import budget as budget_mod
from tune import cluster, ray_access, tracking, working_dir
from tune.redact import OPTUNA_STORAGE_ENV, has_secret, redact_text, redact_url

REPO = Path(__file__).resolve().parents[1]
PLACEMENTS = ("pack", "spread")
PLACEMENT_HELP = ("where a trial's workers go on a cluster (Ray's placement strategy): pack (default: as few nodes as "
                  "possible, the fastest collectives) or spread (one per node where there is room: a node lost takes "
                  "one rank, and the group restarts on the others)")


class SearchError(RuntimeError):
    """Bad input found before any trial starts; the message names the problem."""


class SearchInterrupted(RuntimeError):
    """The search was stopped by Ctrl-C (SIGINT) or SIGUSR1 before every trial ended; its state is saved."""


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
    space: dict[str, dict] | None = None  # the resolved search space (None: a grid, whose cells are given)
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


def new_search_id() -> str:
    """A search's unique id (``tune.tags.SEARCH_ID_TAG``): two searches of one name never share MLflow runs."""
    return uuid.uuid4().hex


# -- checks before Ray or MLflow is touched ----------------------------------------------------------------------------
def check_resources(args: argparse.Namespace, cfg: Config) -> Config:
    """Validate the per-worker resources (--gpus-per-worker defaults to 1 with CUDA, else 0); a CPU-only run's
    ``train.device`` "auto" becomes "cpu"."""
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
    (``GPU_NETWORKS``), which --gpus-per-worker 0 trains on the CPU anyway. A remote cluster's workers have
    their own GPUs: nothing is checked here."""
    if address != "local" or torch.cuda.is_available():
        return
    if asked is not None and asked > 0:
        raise SearchError(f"--gpus-per-worker {asked:g}: torch sees no GPU ({cuda_diagnosis()})")
    if asked is None and cfg.model.network in GPU_NETWORKS:
        raise SearchError(f"model.network {cfg.model.network} is sized for GPUs and torch sees none "
                          f"({cuda_diagnosis()}); pass --gpus-per-worker 0 to train it on the CPU anyway")


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


def check_data(cfg: Config) -> None:
    """Load the training set once in the driver so that missing data fails before any trial starts."""
    try:
        load_data(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise SearchError(f"data set {cfg.data.dataset!r}: {exc}") from None


def absolute_location(path: str) -> str:
    """A storage location as every later command sees it: URIs as given, local paths absolute."""
    path = path.rstrip("/") or "/"
    return path if "://" in path else str(Path(path).resolve())


def check_tracking(uri: str, create: Path | None = None) -> None:
    """The tracking store at ``uri`` usable (``tracking.check_tracking_uri``), else SearchError; ``create``, the
    folder of a default sqlite store, is made first."""
    if create is not None:
        create.mkdir(parents=True, exist_ok=True)
    try:
        tracking.check_tracking_uri(uri)
    except tracking.TrackingError as exc:
        raise SearchError(str(exc)) from None


# -- Ray ---------------------------------------------------------------------------------------------------------------
def connect_ray(p: SearchPlan) -> int:
    """Start a private local cluster or join an existing one; returns the number of trials that fit at once."""
    import ray  # deferred: Ray, which --help and the checks of bad input never load

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
    """A loopback port free now, for the private cluster's dashboard."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


# -- the trials --------------------------------------------------------------------------------------------------------
def trial_settings(p: SearchPlan, experiment_id: str, parent: str,
                   optuna_verdicts: Mapping[str, Any] | None = None) -> Any:
    """What every trial shares, pickled into the trainable (``ray.tune.with_parameters``: Ray's object store). The
    tracking credentials of this environment travel here, never in a runtime env, which the dashboard shows.
    ``optuna_verdicts``: a search resume's Optuna verdicts by Tune trial id (``tune.study.study_verdicts``); none
    for a new search or a grid (no study)."""
    from tune.trainable import TrialSettings  # deferred: imports Ray, which --help and the checks never load

    a = p.args
    return TrialSettings(base=p.cfg.to_dict(), search=p.name, storage=f"{p.storage}/train", tracking_uri=p.uri,
                         experiment_id=experiment_id, parent_run_id=parent, workers=a.workers_per_trial,
                         cpus_per_worker=a.cpus_per_worker, gpus_per_worker=a.gpus_per_worker,
                         worker_failures=a.max_worker_failures, placement=getattr(a, "placement", "pack"),
                         env=tracking.env_for_workers(), search_id=p.search_id,
                         optuna_verdicts=dict(optuna_verdicts or {}))


# -- stopping ----------------------------------------------------------------------------------------------------------
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
