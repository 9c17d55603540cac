"""The Tune side of a trial: a function trainable that builds one TorchTrainer per trial, and the driver-side
callbacks that print progress and set each trial's MLflow run status (ASHA-stopped trials end FINISHED), and the
stopper that ends trials at the time budget (tune/budget.py)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune as ray_tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from pdcbdm.config import Config, apply_overrides
from pdcbdm.training import NonFiniteLossError
from pdcbdm.version import code_version
from tune import budget, tracking, verdicts
from tune.entry import train_loop
from tune.redact import redact_text, redact_url, reveal
from tune.results import completion_outcome, failure_outcome
from tune.tags import CELL_TAG, CHECKPOINTS_TAG, CHECKPOINT_TAG, CODE_VERSION_TAG, CONFIG_KEY_TAG, ERROR_TAG


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a search shares (pickled into the trainable with ``ray.tune.with_parameters``).

    It goes through Ray's object store only, never into a file of Tune's state (tests/test_secrets.py greps the
    search folder), so it carries the real tracking URI and the credentials (``env``) to the trials."""

    base: dict[str, Any]
    search: str
    storage: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    worker_failures: int = 1
    placement: str = "pack"  # Ray's placement strategy for the trial's workers: pack or spread
    cache_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    search_id: str = ""  # the search's unique id (``tune.tags.SEARCH_ID_TAG``); "" in hand-made settings: the name
    # a resume's Optuna verdicts by Tune trial id (``tune.verdicts``): such a trial reports its recorded end
    optuna_verdicts: dict[str, verdicts.Verdict] = field(default_factory=dict)


class FailedBeforeResume(RuntimeError):
    """A resumed trial whose failure Optuna recorded before the driver was killed (``tune.verdicts``)."""


def trial_config(settings: TrialSettings, suggested: dict[str, Any]) -> Config:
    """The resolved config of a trial: the search's base config plus the searched values."""
    return apply_overrides(Config.from_dict(settings.base), {k: v for k, v in suggested.items() if "." in k})


def _log_config(settings: TrialSettings, run_id: str, cfg: Config) -> None:
    """The trial's resolved config as the run's config.json (``Config.load_json`` reads it back)."""
    tracking.log_dict(settings.tracking_uri, run_id, cfg.to_dict(), "config.json")


def share_credentials(env: dict[str, str]) -> Any:
    """Trial side: the tracking credentials came in the pickled settings (object store), never in a runtime env
    (the dashboard shows those). Set them in this process and return an object reference that hands them to the
    workers (``tune.worker.receive_credentials``), or None without credentials."""
    os.environ.update(env)
    return ray.put(dict(env)) if env else None


def run_trial(config: dict[str, Any], settings: TrialSettings) -> None:
    """Tune function trainable: one TorchTrainer (gloo on CPU, nccl on GPU) per trial; results flow back to Tune
    through ``TuneReportCallback``; a restored trial resumes from its Train run's latest checkpoint."""
    cfg = trial_config(settings, config)
    secrets = share_credentials(settings.env)
    ctx = ray_tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    verdict = settings.optuna_verdicts.get(trial_id)
    if verdict is not None:
        honour(settings, trial_id, verdict)
        return
    cell = config.get("cell")  # a grid's cell (tune/grid.py) names its run; a search trial has none
    run_id = tracking.trial_run(settings.tracking_uri, settings.experiment_id, settings.parent_run_id,
                                settings.search, trial_id, cell or trial_name, cfg.flat(),
                                search_id=settings.search_id or None)
    _log_config(settings, run_id, cfg)
    train_dir = f"{settings.storage}/train-{trial_id}"
    tags = {CHECKPOINTS_TAG: train_dir, CONFIG_KEY_TAG: tracking.config_key(cfg.to_dict()),
            CODE_VERSION_TAG: code_version(),
            **({CELL_TAG: cell} if cell else {})}
    tracking.set_tags(settings.tracking_uri, run_id, tags)
    use_gpu = settings.gpus_per_worker > 0
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": settings.gpus_per_worker} if use_gpu else {})}
    # one worker needs no process group: without one, no torch rendezvous store listens on every interface (torch
    # gives it no bind address) while the trial runs
    trainer_cls, backend = ((TorchTrainer, {"torch_config": TorchConfig(backend="nccl" if use_gpu else "gloo")})
                            if settings.workers > 1 else (DataParallelTrainer, {}))
    trainer = trainer_cls(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "mlflow_uri": settings.tracking_uri, "run_id": run_id,
                           "cache_dir": settings.cache_dir, "secrets": secrets},
        **backend,
        scaling_config=ray.train.ScalingConfig(num_workers=settings.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=settings.placement.upper()),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}", storage_path=settings.storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=settings.worker_failures),
            callbacks=[TuneReportCallback()],
        ),
    )
    result = trainer.fit()
    if (result.metrics or {}).get("diverged"):
        raise NonFiniteLossError(result.metrics.get("error", "training diverged"))


def honour(settings: TrialSettings, trial_id: str, verdict: verdicts.Verdict) -> None:
    """A resumed trial whose end Optuna recorded before the driver was killed (``tune.verdicts``) ends the same way
    in Tune without training: FAIL raises ``FailedBeforeResume`` (naming the error its MLflow run recorded); PRUNED
    and COMPLETE report once, its MLflow run's latest metrics with Optuna's step and objective, and return."""
    uri, sid = settings.tracking_uri, settings.search_id or settings.search
    run_id = tracking.trial_run_id(uri, settings.experiment_id, trial_id, sid)
    if verdict.state == "FAIL":
        earlier = None
        try:
            earlier = tracking.run_tags(uri, run_id).get(ERROR_TAG) if run_id else None
        except Exception:  # noqa: BLE001 - the earlier error is a courtesy; the verdict stands without it
            pass
        raise FailedBeforeResume(verdicts.failure_message(trial_id, earlier))
    metrics = tracking.run_metrics(uri, run_id) if run_id else {}
    result: dict[str, Any] = {**metrics, verdicts.RESULT_KEY: True}
    if verdict.state == "PRUNED":
        result["step"] = verdict.step if verdict.step is not None else int(metrics.get("step", 0))
        if verdict.value is not None:
            result.update(objective=verdict.value, proxy_fid=verdict.value)
        if verdict.stopped_by == "time budget":
            result[budget.STOPPED_KEY] = True
    else:
        result.update(step=Config.from_dict(settings.base).train.steps, objective=verdict.values[0],
                      fid=verdict.values[0], **({"objective_tail": verdict.values[1]} if len(verdict.values) > 1
                                                 else {}))
    ray_tune.report(result)


class MlflowStatusCallback(ray_tune.Callback):
    """Driver side: sets each trial's run FINISHED (completed or stopped early) or FAILED (with the error), tags
    how it ended (``tune.tags.OUTCOME_TAG``: completed, early-stopped by ASHA at step N, failed: reason) and its
    last training checkpoint in Ray's storage (``tune.tags.CHECKPOINT_TAG``; MLflow holds only the EMA network as a
    model)."""

    def __init__(self, uri: str, experiment_id: str, max_steps: int | None = None, search_id: str = "") -> None:
        self.uri, self.experiment_id, self.max_steps, self.search_id = uri, experiment_id, max_steps, search_id

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the callbacks into tuner.pkl under the search folder: the URI goes there masked
        return {**self.__dict__, "uri": redact_url(self.uri)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a --resume restores it in the driver, which was given the real URI again (``tracking.use_uri``)
        self.__dict__.update(state, uri=reveal(state["uri"], (tracking.TRACKING_ENV,)))

    def _finish(self, trial: Any, status: str, error: str | None = None, outcome: str | None = None) -> None:
        """Record the trial's end; an unreachable tracking store is said, never raised: a callback that raises
        kills the driver before Tune saves the trial's end, and the three records would then disagree."""
        try:
            run_id = tracking.trial_run_id(self.uri, self.experiment_id, trial.trial_id, self.search_id)
            if run_id:
                path = (trial.last_result or {}).get(CHECKPOINT_PATH_KEY)
                if path:
                    tracking.set_tags(self.uri, run_id, {CHECKPOINT_TAG: path})
                tracking.finish_run(self.uri, run_id, status, error, outcome)
        except Exception as exc:  # noqa: BLE001 - MLflow's and requests' errors alike: the store is unreachable
            print(f"could not record the end of trial {trial.trial_id} in MLflow ({redact_text(str(exc))[:300]}); "
                  f"the search goes on, and its summary (or `--resume` of the search after it ends) sets the run's "
                  f"status from Tune's record", file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        self._finish(trial, "FINISHED", outcome=completion_outcome(int(last.get("step", 0)), self.max_steps,
                                                                   bool(last.get(budget.STOPPED_KEY))))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = error_text(trial)
        self._finish(trial, "FAILED", text, outcome=failure_outcome(text))


class BudgetStopper(ray_tune.Stopper):
    """Stops each trial at its first report after the search's deadline (``tune.budget``; read from
    ``budget_file`` on every result, so that a resumed search uses its own budget), and marks that result with
    ``budget.STOPPED_KEY``: Tune keeps the result it stopped on as the trial's last, so the table, the MLflow
    callback and the progress lines see why it ended. A trial's final report (the end of its training) is left
    alone. ``stop_all`` stays False: running trials end at their next report, not at the deadline."""

    def __init__(self, budget_file: str, max_steps: int) -> None:
        self.budget_file, self.max_steps = budget_file, int(max_steps)

    def __call__(self, trial_id: str, result: dict) -> bool:
        if int(result.get("step", 0)) >= self.max_steps or result.get("diverged"):
            return False
        if not budget.passed(self.budget_file):
            return False
        result[budget.STOPPED_KEY] = True
        budget.mark_reached(self.budget_file)
        return True

    def stop_all(self) -> bool:
        return False


def error_text(trial: Any) -> str:
    """The trial's error file contents (Tune writes the traceback there), or its repr."""
    path = getattr(trial, "error_file", None) or getattr(getattr(trial, "run_metadata", None), "error_filename", None)
    try:
        if path and Path(path).is_file():
            return Path(path).read_text()[-20000:]
    except OSError:
        pass
    return str(getattr(trial, "error_msg", "") or "trial failed (no error text recorded)")


class ProgressPrinter(ray_tune.Callback):
    """One line per trial event instead of Ray's tables: start, each evaluation, end (and why)."""

    def __init__(self, max_steps: int) -> None:
        # no stream attribute: the callback is pickled with the Tuner's state for --resume
        self.max_steps, self.t0 = max_steps, time.monotonic()

    def setup(self, **info: Any) -> None:
        self.t0 = time.monotonic()

    def _say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.0f}s] {text}", file=sys.stdout, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in trial.config.items())
        self._say(f"{trial.trial_id} started: {params}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        extra = f", FID {result['fid']:.2f} (best w={result.get('best_guidance')})" if "fid" in result else ""
        self._say(f"{trial.trial_id} step {result.get('step')}/{self.max_steps}: proxy FID "
                  f"{result.get('proxy_fid', float('nan')):.2f}, loss {result.get('loss', float('nan')):.4f}{extra}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        step = (trial.last_result or {}).get("step", 0)
        why = "time budget" if (trial.last_result or {}).get(budget.STOPPED_KEY) else "ASHA"
        how = "finished" if step >= self.max_steps else f"stopped early at step {step} ({why})"
        self._say(f"{trial.trial_id} {how}; {_counts(trials, trial, 'TERMINATED')}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = redact_text(error_text(trial)).strip().splitlines()
        why = last[-1] if last else "unknown error"
        self._say(f"{trial.trial_id} FAILED: {why}; {_counts(trials, trial, 'ERROR')}")


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)


def _counts(trials: list, ending: Any = None, end_state: str = "") -> str:
    """Trials per state; Tune calls the completion callbacks before it sets the ending trial's new state."""
    states: dict[str, int] = {}
    for t in trials:
        status = end_state if t is ending else t.status
        states[status] = states.get(status, 0) + 1
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
