"""A grid of explicit configurations on the search's runner, for the ablation (pipelines/ablation.py: variant x
seed) and the confirmation of a search's winner (pipelines/confirm.py: top configurations x new seeds).

Everything but the choice of configurations is shared with the search (tune/search.py), the grid's sibling on the
runner (tune/runner.py): the trainable (tune/trainable.py: one TorchTrainer per trial, rank 0's evaluation and MLflow
logging), the Ray connection (--address, --storage-path), the MLflow records (a parent run, a child run per cell
opened by its trial when it starts, its status set when it ends), the progress lines, and --resume
(``Tuner.restore``: unfinished cells continue from their last checkpoint).
There is no searcher and no early stopping: Tune's grid over the cell names, FIFO, every cell trains its budget.

Reuse: every trial run carries its config key (``tracking.config_key`` of the resolved config, seed and evaluation
settings included). Before Ray starts, each cell's key is looked up in the MLflow experiment: a FINISHED run that
trained that config to the end (outcome "completed") by this code (``pdcbdm.version.code_version``) and scored with
this feature network (its identity) is reused, with no new run and no training, and the table lists its run id
(``reused`` True); a run passed over is printed with the reason. Re-running a grid's command with the same --out
therefore trains only what is missing, under the same parent run (found by the grid's name); --no-reuse trains every
cell again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from mlflow.tracking import MlflowClient

from pdcbdm.config import ALLOW_LARGE_FLAG, Config, ConfigError, apply_overrides, check_ceilings
from pdcbdm.evaluation import feature_extractor
from pdcbdm.io import write_json_atomic
from pdcbdm.version import code_version
from tune import arguments, runner, tracking
from tune.runner import SearchError, SearchInterrupted, SearchPlan
from tune.search_folder import driver_lock, warn_if_writable_by_others
from tune.tags import ERROR_TAG, OUTCOME_TAG, REUSED_TAG

# the KIND.json entries a --resume reads (``GridPlan.meta`` writes them all)
SAVED_KEYS = ("args", "name", "storage", "tracking_uri", "tune_name")


@dataclass(frozen=True)
class Cell:
    """One configuration of a grid.

    Args:
        name: unique in the grid; the MLflow run's name (``cbdm-s0``, ``rank1-s1000``).
        overrides: config fields (``section.field``) set over the grid's base config.
        labels: what the cell stands for in the tables (``variant``, ``seed``, ``config_rank``, ...).
    """

    name: str
    overrides: dict[str, Any]
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class GridPlan(SearchPlan):
    """A search plan whose trials are ``cells``; ``search_dir`` is the grid's folder (--out), holding
    ``KIND.json`` and, unless --storage-path says otherwise, Ray's trial folders."""

    cells: list[Cell] = field(default_factory=list)
    kind: str = "grid"
    tune_name: str = "tune"
    command: str = field(kw_only=True)  # the grid's own command (``python -m pipelines.ablation``), which resumes it
    reuse: bool = True

    @property
    def tune_path(self) -> str:
        return f"{self.storage}/{self.tune_name}"

    @property
    def meta_path(self) -> Path:
        return self.search_dir / f"{self.kind}.json"

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "kind": self.kind, "tune_name": self.tune_name,
                "cells": [asdict(c) for c in self.cells]}

    def resume_command(self) -> str:
        cmd = f"{self.command} --resume {shlex.quote(str(self.search_dir))}"
        return cmd if self.args.address == "local" else f"{cmd} --address {shlex.quote(self.args.address)}"

    def cell_config(self, cell: Cell) -> Config:
        """The cell's resolved config, as its trial resolves it (``tune.trainable.trial_config``)."""
        return apply_overrides(Config.from_dict(self.cfg.to_dict()), cell.overrides)


# -- the command line -------------------------------------------------------------------------------------------------
def add_runner_args(p: argparse.ArgumentParser, experiment: str | None) -> None:
    """The runner's flags, as tune/search.py has them; ``experiment`` None: the caller fills it in."""
    g = p.add_argument_group("runner (as tune/search.py)")
    g.add_argument("--out", default=None, help="the folder for everything this writes (default: see above); a "
                   "re-run with the same --out reuses its finished runs and its MLflow parent run")
    g.add_argument("--name", default=None, help="MLflow parent run name (default: see above)")
    g.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db); "
                   "http://host:port for a server")
    g.add_argument("--experiment", default=experiment,
                   help=f"MLflow experiment (default: {experiment or 'the search experiment'})")
    g.add_argument("--address", default="local", help="Ray cluster: 'local' (a private cluster on this machine), "
                   "'auto', HOST:PORT or ray://HOST:10001")
    g.add_argument("--storage-path", default=None, help="where Ray keeps trial folders and checkpoints: a shared "
                   "path or a URI (default: OUT); every node must reach it")
    g.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR (its --out) after a crash "
                   "or kill: finished cells are kept, unfinished ones continue from their last checkpoint; the other "
                   "flags are taken from DIR. It unpickles Ray Tune's saved state: resume only folders that only "
                   "you and people you trust can write")
    g.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per run (DDP when > 1)")
    g.add_argument("--placement", choices=runner.PLACEMENTS, default="pack", help=runner.PLACEMENT_HELP)
    g.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs (and torch threads) per worker "
                   "(default as tune/search.py: CPUs per GPU on this machine's GPUs, else 1)")
    g.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (default: 1 with CUDA)")
    g.add_argument("--concurrency", type=int, default=None, help="runs at once (default: as many as fit)")
    g.add_argument("--max-trial-failures", type=int, default=0, help="retries of a run that raises")
    g.add_argument("--max-worker-failures", type=int, default=1, help="restarts of a run's workers from their last "
                   "checkpoint after a worker dies")
    g.add_argument(ALLOW_LARGE_FLAG, dest="allow_large", action="store_true",
                   help="accept sizes above their ceilings (as tune/search.py --allow-large)")
    g.add_argument("--no-reuse", action="store_true", help="train every cell, even one with a finished run of the "
                   "same config in the MLflow experiment")


def read_saved(folder: Path, kind: str) -> dict[str, Any]:
    """``folder/KIND.json`` (written when the grid started), or SearchError naming the folder."""
    path = Path(folder) / f"{kind}.json"
    if not path.is_file():
        raise SearchError(f"--resume {folder}: not the folder of a {kind} (no {kind}.json)")
    try:
        saved = json.loads(path.read_text())
        missing = [key for key in SAVED_KEYS if key not in saved]
    except (ValueError, TypeError) as exc:
        raise SearchError(f"--resume {folder}: {kind}.json is unreadable ({exc})") from None
    if missing:
        raise SearchError(f"--resume {folder}: {kind}.json is unreadable (missing {', '.join(missing)})")
    warn_if_writable_by_others(folder, "--resume")
    return saved


def resumed_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 saved: dict[str, Any]) -> argparse.Namespace:
    """The grid's original command line (``KIND.json``) with this call's --resume, --address and --concurrency,
    and its --tracking-uri (None: KIND.json's store, whose masked secrets ``make_plan`` takes from the environment)."""
    restored = argparse.Namespace(**{**vars(parser.parse_args([])), **saved["args"]})
    restored.resume, restored.address = args.resume, args.address
    restored.tracking_uri = args.tracking_uri
    restored.concurrency = args.concurrency or restored.concurrency
    return restored


def existing_name(folder: Path, kind: str) -> str | None:
    """The name of the grid already in ``folder`` (a re-run continues it), or None."""
    return _saved_field(Path(folder) / f"{kind}.json", "name")


def _saved_field(path: Path, key: str) -> Any:
    """One entry of a grid's KIND.json, or None when there is none."""
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def make_plan(args: argparse.Namespace, cfg: Config, cells: Sequence[Cell], *, kind: str, command: str,
              out: Path, name: str, saved: dict[str, Any] | None = None, reuse: bool = True) -> GridPlan:
    """Validate resources, cells, data and the tracking store before Ray or MLflow is touched (``out`` is created
    for the default sqlite store). ``saved``: the KIND.json of a --resume. ``reuse`` False (--no-reuse): take no
    run from MLflow (with --resume: continue from Tune's state alone)."""
    try:
        arguments.check_runner_args(args)
        check_ceilings(cfg, getattr(args, "allow_large", False))
    except (arguments.ArgumentError, ConfigError) as exc:
        raise SearchError(str(exc)) from None
    cfg = runner.check_resources(args, cfg)
    names = [c.name for c in cells]
    if not cells or len(set(names)) != len(names):
        raise SearchError(f"the grid's cells must be named uniquely and at least one: {names}")
    flat = cfg.flat()
    keys = sorted({k for c in cells for k in c.overrides})
    # every cell sets every key, so that Tune's per-key lookup (``_cell_value``) always finds a value
    cells = [Cell(c.name, {k: c.overrides.get(k, flat.get(k)) for k in keys}, dict(c.labels)) for c in cells]
    try:
        for c in cells:
            apply_overrides(cfg, c.overrides)
    except ConfigError as exc:
        raise SearchError(str(exc)) from None
    runner.check_data(cfg)
    out = Path(out).resolve()
    if saved:
        storage, tune_name = saved["storage"], saved["tune_name"]
        uri = saved_tracking_uri(saved["tracking_uri"], args.tracking_uri, f"the {kind} in {out}")
        args.tracking_uri = uri  # KIND.json, written again, keeps it masked
    else:
        storage = f"{runner.absolute_location(args.storage_path)}/{name}" if args.storage_path else str(out)
        uri = tracking.absolute_uri(args.tracking_uri) if args.tracking_uri else tracking.default_tracking_uri(out)
        tune_name = f"tune-{time.strftime('%Y%m%d-%H%M%S')}"  # a re-run's new Tuner beside the earlier ones
    runner.check_tracking(uri, create=out)
    # a re-run with the same --out continues the grid there (its KIND.json): same id, same parent run
    search_id = ((saved or {}).get("search_id") or _saved_field(out / f"{kind}.json", "search_id")
                 or runner.new_search_id())
    return GridPlan(args, cfg, name, len(cells), out, storage, tracking.use_uri(uri), resume=bool(saved), out=out,
                    optuna_storage="", cells=list(cells), kind=kind, tune_name=tune_name, command=command,
                    reuse=reuse, uri_given=uri, search_id=search_id)


def saved_tracking_uri(saved: str, given: str | None, record: str) -> str:
    """The real tracking URI of a grid's --resume (``tracking.recorded_uri``: KIND.json keeps it masked; this
    call's --tracking-uri or MLFLOW_TRACKING_URI gives it again), its warnings printed; SearchError when missing."""
    try:
        uri, warnings = tracking.recorded_uri(saved, given, record)
    except tracking.TrackingError as exc:
        raise SearchError(str(exc)) from None
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr, flush=True)
    return uri


# -- running ----------------------------------------------------------------------------------------------------------
@dataclass
class GridRun:
    """A finished grid: one row per cell (``rows``), the MLflow experiment and the open parent run."""

    rows: pd.DataFrame
    experiment_id: str
    parent: str


def exit_status(run: Callable[[], pd.DataFrame], bad_input: tuple[type[Exception], ...] = ()) -> int:
    """A grid command's exit status: 0 when every run of the table ``run()`` returns finished, 1 when some failed,
    2 on bad input (``bad_input`` or SearchError, printed), 130 when interrupted."""
    try:
        table = run()
    except (*bad_input, SearchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (SearchInterrupted, KeyboardInterrupt):
        return 130
    return 0 if (table["status"] == "finished").all() else 1


def run_grid(p: GridPlan, params: Mapping[str, Any]) -> GridRun:
    """Reuse what is finished, train the rest on Ray (or continue it, with --resume), collect every cell's row.
    The parent run stays open for the caller's tables (``close``); an interruption or a driver error leaves no run
    RUNNING (``tune.runner.stop_search``) and prints the command that resumes the grid. One driver per grid
    folder (``driver_lock``)."""
    with driver_lock(p.search_dir, f"{p.kind} {p.name!r}", SearchError):
        tracking.prepare_store(p.uri)
        return _run_grid(p, params)


def _run_grid(p: GridPlan, params: Mapping[str, Any]) -> GridRun:
    experiment_id = tracking.ensure_experiment(p.uri, p.args.experiment, p.out / "mlartifacts")
    reused = reusable_runs(p, experiment_id)
    todo = [c for c in p.cells if c.name not in reused]
    parent = tracking.parent_run(p.uri, experiment_id, p.name, params, kind=p.kind, search_id=p.search_id)
    if not todo:  # no new Tuner: a later --resume restores the last one that ran
        p.tune_name = _saved_field(p.meta_path, "tune_name") or p.tune_name
    write_json_atomic(p.meta_path, {**p.meta(), "experiment_id": experiment_id, "parent_run_id": parent})
    print(f"{p.kind} {p.name}: {len(p.cells)} runs, {len(reused)} reused, {len(todo)} to train "
          f"({p.cfg.train.steps} steps each); folder {p.search_dir}; MLflow {p.uri_shown}", flush=True)
    try:
        results = _train(p, todo, experiment_id, parent) if todo else {}
        rows = collect(p, experiment_id, reused, results)
    except BaseException as exc:
        runner.stop_search(p, experiment_id, parent, exc)
        raise
    return GridRun(rows, experiment_id, parent)


def reusable_runs(p: GridPlan, experiment_id: str) -> dict[str, Any]:
    """Cell name -> a finished run of the same config in the experiment, trained by this code and scored by this
    feature network (none with --no-reuse); each finished run passed over is printed with the reason."""
    if not p.reuse:
        return {}
    found = {c.name: tracking.finished_run(p.uri, experiment_id, tracking.config_key(p.cell_config(c).to_dict()))
             for c in p.cells}
    found = {name: run for name, run in found.items() if run is not None}
    if not found:
        return {}
    code, extractor = code_version(), feature_extractor(p.cfg).identity
    reused = {}
    for name, run in found.items():
        why = tracking.reuse_mismatch(run, code, extractor)
        if why:
            print(f"{name}: not reusing run {run.info.run_id} of the same config: {why}", flush=True)
        else:
            reused[name] = run
    return reused


def _train(p: GridPlan, todo: list[Cell], experiment_id: str, parent: str) -> dict[str, Any]:
    """Run (or restore) the Tuner over ``todo``; returns Tune's result per cell name."""
    # deferred: Ray, which --help and the checks of bad input never load
    import ray

    concurrency = runner.connect_ray(p)
    try:
        tuner, restored = build_tuner(p, todo, concurrency, experiment_id, parent)
        with runner.SigintWatch() as watch:
            results = tuner.fit()
        # a restored Tuner holds the cells of the invocation that made it; a cell it lacks is found in MLflow
        if watch.fired or (not restored and len(results) < len(todo)):
            raise SearchInterrupted("interrupted")
        return {str((r.config or {}).get("cell")): r for r in results}
    finally:
        ray.shutdown()


def _cell_value(table: dict[str, dict[str, Any]], key: str, spec: Any) -> Any:
    """Tune's ``sample_from``: the value of config field ``key`` for the trial's cell."""
    return table[spec.config["cell"]][key]


def param_space(cells: Sequence[Cell]) -> dict[str, Any]:
    """Tune's grid over the cell names, each config field looked up from the trial's cell (flat keys, as the
    search's trials have them, so that ``tune.trainable.trial_config`` applies them)."""
    # deferred: Ray, which --help and the checks of bad input never load
    from ray import tune as ray_tune

    table = {c.name: c.overrides for c in cells}
    keys = sorted({k for c in cells for k in c.overrides})
    return {"cell": ray_tune.grid_search([c.name for c in cells]),
            **{k: ray_tune.sample_from(partial(_cell_value, table, k)) for k in keys}}


def build_tuner(p: GridPlan, cells: Sequence[Cell], concurrency: int, experiment_id: str,
                parent: str) -> tuple[Any, bool]:
    """A new Tuner over ``cells`` (FIFO: no early stopping), or with --resume the grid's last Tuner restored
    (unfinished cells continue from their last checkpoint; errored ones stay failed: a re-run without --resume
    trains them again); and whether it was restored."""
    # deferred: Ray, which --help and the checks of bad input never load
    from ray import tune as ray_tune
    from ray.tune.schedulers import FIFOScheduler
    from tune.trainable import MlflowStatusCallback, ProgressPrinter, run_trial

    settings = runner.trial_settings(p, experiment_id, parent)
    trainable = ray_tune.with_resources(ray_tune.with_parameters(run_trial, settings=settings),
                                        {"cpu": 0, "train_driver": 1})
    if p.resume and ray_tune.Tuner.can_restore(p.tune_path):
        return ray_tune.Tuner.restore(p.tune_path, trainable=trainable, resume_unfinished=True,
                                      resume_errored=False), True
    steps = p.cfg.train.steps
    return ray_tune.Tuner(
        trainable, param_space=param_space(cells),
        tune_config=ray_tune.TuneConfig(num_samples=1, scheduler=FIFOScheduler(),
                                        max_concurrent_trials=concurrency),
        run_config=ray_tune.RunConfig(name=p.tune_name, storage_path=p.storage, verbose=0,
                                      failure_config=ray_tune.FailureConfig(max_failures=p.args.max_trial_failures),
                                      callbacks=[MlflowStatusCallback(p.uri, experiment_id, steps, p.search_id),
                                                 ProgressPrinter(steps)])
    ), False


# -- the table --------------------------------------------------------------------------------------------------------
def collect(p: GridPlan, experiment_id: str, reused: dict[str, Any], results: dict[str, Any]) -> pd.DataFrame:
    """One row per cell, in the grid's order, read from its MLflow run: labels, status ("finished" when the run
    trained its budget, else "failed" with the error), the run id, whether it was reused, its wall time and every
    metric's last value."""
    rows = []
    for cell in p.cells:
        run = reused.get(cell.name) or tracking.cell_run(p.uri, experiment_id, p.search_id, cell.name)
        result = results.get(cell.name)
        if run is not None and result is not None:
            run = _settle(p, run, result)
        rows.append({"cell": cell.name, **cell.labels, **run_row(run, result), "reused": cell.name in reused})
    return pd.DataFrame(rows)


def _settle(p: GridPlan, run: Any, result: Any) -> Any:
    """A run its trial ended but whose status the driver did not set (it died in between, then resumed)."""
    if run.info.status not in ("RUNNING", "SCHEDULED", "KILLED"):
        return run
    done = not result.error and (result.metrics or {}).get("step", 0) >= p.cfg.train.steps
    error = None if done else str(result.error or "did not finish")
    tracking.finish_run(p.uri, run.info.run_id, "FINISHED" if done else "FAILED", error,
                        "completed" if done else f"failed: {error.strip().splitlines()[-1][:300]}")
    return MlflowClient(p.uri).get_run(run.info.run_id)


def run_row(run: Any, result: Any = None) -> dict[str, Any]:
    """A cell's status, error, run id, seconds and metrics from its MLflow run (and Tune's result, for an error
    raised before the run existed)."""
    if run is None:
        error = str(getattr(result, "error", None) or "no run (interrupted before it started)")
        return {"status": "failed", "error": error.strip().splitlines()[-1][:300], "mlflow_run_id": None}
    tags = run.data.tags
    ok = run.info.status == "FINISHED" and tags.get(OUTCOME_TAG) == "completed"
    error = None if ok else (tags.get(ERROR_TAG) or tags.get(OUTCOME_TAG) or run.info.status)
    seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else math.nan
    return {"status": "finished" if ok else "failed", "error": error and error.strip().splitlines()[-1][:300],
            "mlflow_run_id": run.info.run_id, "seconds": seconds,
            **{k: v for k, v in run.data.metrics.items() if "/" not in k}}  # not the system/... series


def guidance_metrics(uri: str, run_id: str | None, w: float) -> dict[str, Any]:
    """The run's final metrics at guidance ``w`` (its ``evaluation/guidance_grid.json``; the headline metrics
    are at the best w); {} when the run has none at that w."""
    if not run_id:
        return {}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in the table's output
    with tempfile.TemporaryDirectory(prefix="pdcbdm-grid-") as tmp:
        try:
            path = MlflowClient(uri).download_artifacts(run_id, "evaluation/guidance_grid.json", tmp)
            results = json.loads(Path(path).read_text())["results"]
        except Exception:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            return {}
    return next((r for r in results if math.isclose(float(r["guidance"]), w)), {})


def close(p: GridPlan, run: GridRun, files: Sequence[Path], metrics: Mapping[str, Any]) -> None:
    """The parent run's summary: metrics, files, the reused runs' ids; FINISHED when some cell finished."""
    reused = run.rows.loc[run.rows["reused"] & run.rows["mlflow_run_id"].notna(), "mlflow_run_id"]
    if len(reused):
        tracking.set_tags(p.uri, run.parent, {REUSED_TAG: ",".join(reused)[:5000]})
    tracking.log_metrics(p.uri, run.parent, {k: v for k, v in metrics.items()
                                             if isinstance(v, (int, float)) and math.isfinite(v)}, 0)
    tracking.log_artifacts(p.uri, run.parent, [f for f in files if Path(f).exists()])
    ok = bool((run.rows["status"] == "finished").any())
    tracking.finish_run(p.uri, run.parent, "FINISHED" if ok else "FAILED")
