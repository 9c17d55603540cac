"""The paper's ablation (Table 1) on any preset: DDPM, CBDM, CBDM + each PD-CBDM component, and PD-CBDM, over seeds.

    python -m pipelines.ablation --preset digits --seeds 3                  # Digits-LT, 6 variants x 3 seeds, ~16 min on 2 cores
    python -m pipelines.ablation --preset smoke --seeds 1 --variants cbdm,pd-cbdm --steps 20 --out D
    python -m pipelines.ablation --preset cifar100-lt --seeds 3 --steps 100000 --jobs 4 --set data.root=/data/cifar

Variants (config overrides over the preset; every other field is the preset's, so each variant has the same
budget, data, sampler and evaluation):
  ddpm      plain conditional DDPM with classifier-free guidance: no L_DA (cbdm_tau=0), no PD loss, no TSA
  cbdm      the baseline, CBDM (Eq. 9): cbdm_tau = the preset's (1 if the preset's is 0), q = label frequency
  pd        CBDM + the perceptual-distinguish loss (Eq. 10-11) with the preset's loss.pd_weight
  reweight  CBDM + the re-weighted target-label distribution q' (Eq. 12): label_dist=inverted
  tsa       CBDM + timestep-dependent self-attention (Eq. 13-14) at the preset's model.tsa_resolutions
  pd-cbdm   all three components
("+pd", "+reweight" and "+tsa" are accepted for pd, reweight and tsa.)

Each run trains with ``pdcbdm.training.Trainer`` (train.seed = the seed) for the budget, then scores the EMA network
with ``pdcbdm.evaluation.Evaluator`` at one fixed guidance scale, eval.proxy_guidance (with --grid also at every
eval.guidance_grid value, and the grid's best w is recorded as best_guidance; the table stays at the fixed w), on
eval.num_samples samples whose sampling seed is the run's seed, so that every variant is judged on the same noise
and the same head/tail classes (eval.split_ratio). The data set (data.seed) is the same for every run.

Writes into --out:
  ablation.parquet       one row per variant x seed: status, timings, every headline metric at the fixed w
                         (guidance), with --grid also fid_w{w} and best_guidance
  summary.csv            mean and standard deviation (over seeds) of FID, recall, F_8, tail FID, tail-to-head
                         confusion and tail consistency per variant (also printed)
  paired.csv             each variant against CBDM on the tail metrics (tail FID and KID, tail consistency,
                         tail-to-head confusion): per-seed differences, their mean and spread, a paired t-test and
                         the metric's real-vs-real floor spread, with a verdict (pipelines/paired.py; also printed)
  ablation.png           bar chart of the same with error bars (one standard deviation)
  ablation.json          the command line, the base config, the MLflow parent run
  runs/VARIANT-sSEED/    config.json, result.json (metrics, loss history), per_class.parquet, samples_w{w}.png
                         (and checkpoint.pt with --checkpoints)
  mlflow.db, mlartifacts/  the MLflow store (unless --tracking-uri points elsewhere): one parent run
                         "ablation-PRESET-TIME" with the summary metrics, a child run per variant x seed
A run whose runs/VARIANT-sSEED/result.json already holds a finished result for the same config is reused, so an
interrupted ablation continues where it stopped when re-run with the same --out (--no-reuse retrains).
Exit status: 0 when every run finished, 1 when some failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from pdcbdm.config import PRESETS, Config, ConfigError, apply_overrides, preset
from pdcbdm.io import atomic_write, atomic_write_bytes, write_json_atomic
from pipelines.paired import TAIL_METRICS, compare_to_baseline, format_comparison

__all__ = ["VARIANTS", "SUMMARY_METRICS", "Variant", "RunSpec", "parse_variants", "variant_config", "run_one",
           "summarise", "format_summary", "plot_summary", "main"]


@dataclass(frozen=True)
class Variant:
    """One row of Table 1: which PD-CBDM components are on over the shared preset.

    Args:
        name: the --variants name (also used in file names and MLflow metric keys).
        label: the row's caption in tables and plots.
        cbdm: CBDM's L_DA regulariser (Eq. 9) on.
        pd: the perceptual-distinguish loss (Eq. 10-11) on.
        reweight: the inverted target-label distribution q' (Eq. 12) instead of the label frequency q.
        tsa: timestep-dependent self-attention (Eq. 13-14) at the preset's placement instead of none.
    """

    name: str
    label: str
    cbdm: bool = True
    pd: bool = False
    reweight: bool = False
    tsa: bool = False


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("ddpm", "DDPM", cbdm=False),
    Variant("cbdm", "CBDM"),
    Variant("pd", "CBDM + PD loss", pd=True),
    Variant("reweight", "CBDM + re-weighting", reweight=True),
    Variant("tsa", "CBDM + TSA", tsa=True),
    Variant("pd-cbdm", "PD-CBDM (all three)", pd=True, reweight=True, tsa=True),
)}

# (metric key, caption, True when higher is better): the columns of the paper's Table 1 plus the tail diagnostics
SUMMARY_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("fid", "FID", False), ("recall", "recall", True), ("f8", "F_8", True), ("fid_tail", "tail FID", False),
    ("tail_to_head_confusion", "tail->head confusion", False), ("consistency_tail", "tail consistency", True),
)
ROW_METRICS = ("fid", "is_mean", "precision", "recall", "f8", "f1_8", "fid_head", "fid_tail", "kid_tail",
               "consistency_mean", "consistency_head", "consistency_tail", "tail_to_head_confusion", "reject_rate",
               *(f"{k}_floor{s}" for k, _, _ in TAIL_METRICS for s in ("", "_std")))


class AblationError(ValueError):
    """Bad input found before any run starts; the message names the option or config field."""


# -- variants -------------------------------------------------------------------------------------------------------
def parse_variants(spec: str) -> list[str]:
    """Comma-separated variant names (``+pd`` style accepted) in Table 1's order, duplicates dropped."""
    names = [s.strip().lstrip("+") for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise AblationError(f"--variants {spec!r}: unknown or missing variant(s) {bad}; valid: {', '.join(VARIANTS)}")
    return [n for n in VARIANTS if n in names]


def variant_config(base: Config, name: str, seed: int) -> Config:
    """The config of one run: ``base`` with the variant's components switched on or off and train.seed = seed.

    The PD weight (lambda, Eq. 10), CBDM's tau (Eq. 9) and the TSA placement (Eq. 13-14) of an enabled component
    come from ``base``; a component that ``base`` leaves at zero or empty cannot be ablated and raises
    AblationError naming the field (except tau, which falls back to CBDM's default 1.0).
    """
    v = VARIANTS[name]
    if v.pd and base.loss.pd_weight <= 0:
        raise AblationError(f"variant {name!r} needs the PD loss but loss.pd_weight is {base.loss.pd_weight}; "
                            f"set --set loss.pd_weight=LAMBDA")
    if v.tsa and not base.model.tsa_resolutions.strip():
        raise AblationError(f"variant {name!r} needs a TSA placement but model.tsa_resolutions is empty; "
                            f"set --set model.tsa_resolutions=R")
    tau = base.loss.cbdm_tau if base.loss.cbdm_tau > 0 else 1.0
    return apply_overrides(base, {
        "loss.cbdm_tau": tau if v.cbdm else 0.0,
        "loss.pd_weight": base.loss.pd_weight if v.pd else 0.0,
        "loss.label_dist": "inverted" if v.reweight else "cbdm",
        "model.tsa_resolutions": base.model.tsa_resolutions if v.tsa else "",
        "train.seed": seed,
    })


# -- one run (executed in a worker process) ------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs for one variant x seed (picklable).

    Args:
        variant: the variant's name.
        seed: training seed and sampling seed of the evaluation.
        cfg: the resolved config (``Config.to_dict()``).
        run_dir: folder for the run's files.
        grid: also score every eval.guidance_grid value.
        threads: torch threads of the worker (train.threads wins when set).
        cache_dir: the metrics cache (digits network, reference features); None = $PDCBDM_CACHE or the default.
        checkpoint: keep the final checkpoint.
    """

    variant: str
    seed: int
    cfg: dict[str, Any]
    run_dir: str
    grid: bool = False
    threads: int = 1
    cache_dir: str | None = None
    checkpoint: bool = False

    @property
    def key(self) -> str:
        return f"{self.variant}-s{self.seed}"


def _train(cfg: Config, seed: int) -> tuple[Any, list[dict[str, float]], float]:
    """Train one variant for cfg.train.steps with the objective its config selects (L_DM of Eq. 8, plus L_DA of
    Eq. 9 when loss.cbdm_tau > 0, minus lambda * KL of Eq. 10-11 when loss.pd_weight > 0).

    Args:
        cfg: the run's resolved config.
        seed: seeds the global generator (dropout); the Trainer seeds the initialisation and its batch and noise
            generator from train.seed, which variant_config set to the same seed.

    Returns:
        (trainer, loss history averaged over each log_every window, training seconds).
    """
    import torch

    from pdcbdm.train import load_data
    from pdcbdm.training import Trainer, resolve_device

    torch.manual_seed(seed)  # dropout draws from the global generator (the Trainer seeds init and its batches)
    trainer = Trainer(cfg, load_data(cfg), device=resolve_device(cfg.train.device))
    history: list[dict[str, float]] = []
    window: list[dict[str, float]] = []
    start = time.perf_counter()
    while trainer.step < cfg.train.steps:
        window.append(trainer.train_step())
        if trainer.step % cfg.train.log_every == 0 or trainer.step == cfg.train.steps:
            history.append({"step": trainer.step, **{k: sum(w[k] for w in window) / len(window) for k in window[0]}})
            window = []
    return trainer, history, time.perf_counter() - start


def _evaluate(trainer: Any, spec: RunSpec, folder: Path) -> tuple[dict[str, Any], float]:
    """Score the EMA network with classifier-free guidance at the fixed eval.proxy_guidance (and at the grid's
    values), on the evaluation's head/tail split (eval.split_ratio).

    Args:
        trainer: the trained run (its EMA network, class counts and autocast are used).
        spec: the run (its seed is the sampling seed, so every variant is scored on the same noise and labels).
        folder: where per_class.parquet and samples_w{w}.png go.

    Returns:
        (headline metrics at eval.proxy_guidance plus fid_w{w} and best_guidance with the grid, evaluation seconds).
    """
    from pdcbdm.config import parse_float_list
    from pdcbdm.evaluation import Evaluator, best_by_fid, evaluation_split
    from pdcbdm.viz import save_grid

    cfg = trainer.cfg
    start = time.perf_counter()
    split = evaluation_split(cfg, trainer.counts)
    evaluator = Evaluator.build(cfg, num_classes=trainer.num_classes, head=split.head, tail=split.tail,
                                device=trainer.device, cache_dir=spec.cache_dir)
    w = cfg.eval.proxy_guidance
    grid = [w]
    if spec.grid:
        grid = sorted({w, *parse_float_list(cfg.eval.guidance_grid, "eval.guidance_grid")})
    results = evaluator.evaluate_grid(trainer.ema.module, grid, seed=spec.seed, autocast=trainer.autocast)
    rows = []
    for r in results:
        rows += [{"guidance": r.guidance, **row} for row in r.per_class]
        save_grid(_grid_order(r.images, trainer.num_classes), folder / f"samples_w{r.guidance:g}.png",
                  nrow=_per_class(r.images, trainer.num_classes), scale=max(1, 64 // r.images.shape[-1]))
    _write_parquet(pd.DataFrame(rows), folder / "per_class.parquet")
    main_result = next(r for r in results if r.guidance == w)
    metrics = {k: main_result.metrics.get(k) for k in ROW_METRICS}
    if spec.grid:
        metrics.update({f"fid_w{r.guidance:g}": r.metrics["fid"] for r in results})
        metrics["best_guidance"] = best_by_fid(results, cfg.eval.min_consistency).guidance
    metrics["guidance"] = w
    return metrics, time.perf_counter() - start


def _per_class(images: Any, num_classes: int) -> int:
    return max(1, min(10, images.shape[0] // num_classes))


def _grid_order(images: Any, num_classes: int) -> Any:
    """Samples re-ordered into one row per class (labels are uniform: sample i has class i mod K), 20 rows at most."""
    import torch

    n = _per_class(images, num_classes)
    idx = [torch.arange(k, images.shape[0], num_classes)[:n] for k in range(min(num_classes, 20))]
    return images[torch.cat(idx)]


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train and evaluate one variant x seed; writes its folder and returns result.json's content.

    A divergence (NonFiniteLossError) gives status "failed" with the error; any other exception propagates.
    """
    import torch

    from pdcbdm.evaluation import evaluation_split
    from pdcbdm.training import NonFiniteLossError

    cfg = Config.from_dict(spec.cfg)
    torch.set_num_threads(cfg.train.threads or spec.threads)
    folder = Path(spec.run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_json(folder / "config.json")
    result: dict[str, Any] = {"variant": spec.variant, "seed": spec.seed, "config": spec.cfg, "status": "failed"}
    try:
        trainer, history, train_s = _train(cfg, spec.seed)
    except NonFiniteLossError as exc:
        result["error"] = str(exc)
        write_json_atomic(folder / "result.json", result)
        return result
    metrics, eval_s = _evaluate(trainer, spec, folder)
    if spec.checkpoint:
        trainer.save(folder / "checkpoint.pt")
    split = evaluation_split(cfg, trainer.counts)  # the classes the head/tail metrics measure
    result.update(status="finished", error=None, metrics=metrics, history=history, train_seconds=train_s,
                  eval_seconds=eval_s, steps=trainer.step, head_classes=list(split.head),
                  tail_classes=list(split.tail))
    write_json_atomic(folder / "result.json", result)
    return result


def reusable(spec: RunSpec) -> dict[str, Any] | None:
    """A finished result.json of the same config in the run's folder (an earlier, interrupted ablation), or None."""
    path = Path(spec.run_dir) / "result.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return old if old.get("status") == "finished" and old.get("config") == spec.cfg else None


# -- tables and plots -------------------------------------------------------------------------------------------------
def result_row(result: dict[str, Any], run_id: str | None = None) -> dict[str, Any]:
    """One ablation.parquet row (metrics as floats, NaN when missing or failed)."""
    v = VARIANTS[result["variant"]]
    row: dict[str, Any] = {"variant": v.name, "label": v.label, "seed": result["seed"], "status": result["status"],
                           "error": result.get("error"), "train_seconds": result.get("train_seconds", math.nan),
                           "eval_seconds": result.get("eval_seconds", math.nan), "mlflow_run_id": run_id}
    for k, value in (result.get("metrics") or {}).items():
        row[k] = _float(value)
    for k in ROW_METRICS:
        row.setdefault(k, math.nan)
    return row


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof = 1; NaN with one seed) over the finished seeds of each variant,
    for every SUMMARY_METRICS key: columns variant, label, n, {metric}_mean, {metric}_std; Table 1's row order."""
    rows = []
    for name in [n for n in VARIANTS if n in set(df["variant"])]:
        done = df[(df["variant"] == name) & (df["status"] == "finished")]
        row: dict[str, Any] = {"variant": name, "label": VARIANTS[name].label, "n": len(done)}
        for key, _, _ in SUMMARY_METRICS:
            values = pd.to_numeric(done[key], errors="coerce") if key in done else pd.Series(dtype=float)
            row[f"{key}_mean"] = float(values.mean()) if values.notna().any() else math.nan
            row[f"{key}_std"] = float(values.std(ddof=1)) if values.notna().sum() > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> str:
    """The printed table: one line per variant, "mean ± std" per metric ("mean" alone with one seed)."""
    if summary.empty:
        return "(no runs)"

    def cell(mean: float, std: float) -> str:
        if math.isnan(mean):
            return "n/a"
        return f"{mean:.4g}" if math.isnan(std) else f"{mean:.4g} ± {std:.2g}"

    view = pd.DataFrame({"variant": summary["label"], "seeds": summary["n"]})
    for key, caption, higher in SUMMARY_METRICS:
        arrow = "↑" if higher else "↓"
        view[f"{caption} {arrow}"] = [cell(m, s) for m, s in zip(summary[f"{key}_mean"], summary[f"{key}_std"])]
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        return view.to_string(index=False)


def plot_summary(summary: pd.DataFrame, path: Path | None = None, title: str = "") -> Any:
    """Bar chart, one panel per SUMMARY_METRICS key, a bar per variant with one-standard-deviation error bars;
    written atomically as PNG when ``path`` is given. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    cols = 3
    rows = -(-len(SUMMARY_METRICS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    x = range(len(summary))
    for ax, (key, caption, higher) in zip(axes.flat, SUMMARY_METRICS):
        err = summary[f"{key}_std"].fillna(0.0)
        ax.bar(x, summary[f"{key}_mean"], yerr=err, capsize=3, color=[f"C{i}" for i in x])
        ax.set_xticks(list(x), summary["variant"], rotation=45, ha="right")
        ax.set_title(f"{caption} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return fig


def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda f: df.to_parquet(f, index=False))


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    return atomic_write_bytes(path, df.to_csv(index=False).encode())


# -- MLflow (driver process only: one writer for the store) ---------------------------------------------------------
KIND_TAG, ABLATION_TAG = "pdcbdm.kind", "pdcbdm.ablation"


@dataclass
class Tracker:
    """The ablation's MLflow runs: one parent, a child per variant x seed, all written from the driver."""

    uri: str
    experiment_id: str
    name: str
    parent_id: str = ""
    children: dict[str, str] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)

    @classmethod
    def start(cls, uri: str, experiment: str, name: str, artifact_root: Path, params: dict[str, Any]) -> "Tracker":
        from mlflow.tracking import MlflowClient

        from tune import tracking

        exp = tracking.ensure_experiment(uri, experiment, artifact_root)
        run = MlflowClient(uri).create_run(exp, run_name=name, tags={KIND_TAG: "ablation", ABLATION_TAG: name})
        tracking.log_params(uri, run.info.run_id, params)
        return cls(uri, exp, name, run.info.run_id)

    def child(self, spec: RunSpec) -> str:
        from mlflow.tracking import MlflowClient

        from tune import tracking

        tags = {KIND_TAG: "ablation-run", ABLATION_TAG: self.name, "mlflow.parentRunId": self.parent_id,
                "pdcbdm.variant": spec.variant, "pdcbdm.seed": str(spec.seed)}
        run_id = MlflowClient(self.uri).create_run(self.experiment_id, run_name=spec.key, tags=tags).info.run_id
        tracking.log_params(self.uri, run_id, {"variant": spec.variant, **Config.from_dict(spec.cfg).flat()})
        self.children[spec.key] = run_id
        return run_id

    def finish_child(self, spec: RunSpec, result: dict[str, Any]) -> None:
        from tune import tracking

        run_id = self.children[spec.key]
        for rec in result.get("history") or []:
            tracking.log_metrics(self.uri, run_id, {k: v for k, v in rec.items() if k != "step"}, int(rec["step"]))
        metrics = {**(result.get("metrics") or {}), "train_seconds": result.get("train_seconds"),
                   "eval_seconds": result.get("eval_seconds")}
        tracking.log_metrics(self.uri, run_id, metrics, int(result.get("steps") or 0))
        folder = Path(spec.run_dir)
        files = [p for p in [folder / "config.json", folder / "result.json", folder / "per_class.parquet"] if p.exists()]
        tracking.log_artifacts(self.uri, run_id, files)
        tracking.log_artifacts(self.uri, run_id, sorted(folder.glob("samples_w*.png")), "samples")
        if (folder / "checkpoint.pt").exists():
            tracking.log_artifacts(self.uri, run_id, [folder / "checkpoint.pt"], "checkpoint")
        ok = result.get("status") == "finished"
        tracking.finish_run(self.uri, run_id, "FINISHED" if ok else "FAILED", None if ok else result.get("error"))
        self.closed.add(spec.key)

    def finish(self, summary: pd.DataFrame, files: Sequence[Path], status: str) -> None:
        from tune import tracking

        values = {f"{r['variant']}.{key}_{stat}": r[f"{key}_{stat}"] for _, r in summary.iterrows()
                  for key, _, _ in SUMMARY_METRICS for stat in ("mean", "std") if not math.isnan(r[f"{key}_{stat}"])}
        tracking.log_metrics(self.uri, self.parent_id, values, 0)
        tracking.log_artifacts(self.uri, self.parent_id, [p for p in files if p.exists()])
        tracking.finish_run(self.uri, self.parent_id, status)

    def kill_open(self) -> None:
        """After an interruption: children not yet closed and the parent end KILLED."""
        from tune import tracking

        for key, run_id in self.children.items():
            if key not in self.closed:
                tracking.finish_run(self.uri, run_id, "KILLED")
        tracking.finish_run(self.uri, self.parent_id, "KILLED")


# -- the command line -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits", choices=list(PRESETS),
                   help="base configuration every variant shares (default: digits, Digits-LT on the CPU)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all six)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (train.seed and the sampling "
                   "seed of the evaluation; default 3)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the preset's "
                   "train.steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field of the base preset (repeatable), e.g. --set eval.num_samples=500")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs trained at once in separate processes, each with (cores / jobs) torch threads "
                        "(default: the number of cores, one thread each)")
    p.add_argument("--grid", action="store_true", help="also score every eval.guidance_grid value (fid_w{w}, and "
                   "the grid's best w as best_guidance); the table always uses the fixed eval.proxy_guidance")
    p.add_argument("--out", default=None, help="output folder (default: ablations/NAME)")
    p.add_argument("--name", default=None, help="MLflow parent run name (default: ablation-PRESET-YYYYmmdd-HHMMSS)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
    p.add_argument("--experiment", default="pdcbdm-ablation", help="MLflow experiment (default: pdcbdm-ablation)")
    p.add_argument("--cache-dir", default=None, help="metrics cache: digits network, reference features "
                   "(default: $PDCBDM_CACHE or ~/.cache/pdcbdm)")
    p.add_argument("--checkpoints", action="store_true", help="keep each run's final checkpoint (and log it)")
    p.add_argument("--no-reuse", action="store_true", help="retrain runs that already have a finished result in OUT")
    return p


@dataclass
class Plan:
    """The validated command line: base config, runs, folders and tracking store."""

    args: argparse.Namespace
    base: Config
    name: str
    out: Path
    uri: str
    specs: list[RunSpec]


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate every option and build every run's config before anything is trained or logged."""
    from tune import tracking

    if args.seeds < 1:
        raise AblationError(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        raise AblationError(f"--jobs must be >= 1, got {args.jobs}")
    if args.steps is not None and args.steps < 1:
        raise AblationError(f"--steps must be >= 1, got {args.steps}")
    try:
        overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
        base = apply_overrides(preset(args.preset), overrides)
        names = parse_variants(args.variants)
        configs = {(n, s): variant_config(base, n, s) for n in names for s in range(args.seeds)}
    except ConfigError as exc:
        raise AblationError(str(exc)) from None
    name = args.name or f"ablation-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out or Path("ablations") / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or tracking.default_tracking_uri(out)
    try:
        tracking.check_tracking_uri(uri)
    except tracking.TrackingError as exc:
        raise AblationError(str(exc)) from None
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    specs = [RunSpec(n, s, cfg.to_dict(), str(out / "runs" / f"{n}-s{s}"), args.grid, threads, args.cache_dir,
                     args.checkpoints) for (n, s), cfg in configs.items()]
    return Plan(args, base, name, out, uri, specs)


def warm_caches(plan: Plan) -> None:
    """Build the evaluator once here, so that its cached digits network and reference features exist before the
    workers start (otherwise every worker would train the digits network at the same time)."""
    from pdcbdm.evaluation import Evaluator, evaluation_split
    from pdcbdm.train import load_data

    try:
        data = load_data(plan.base)
    except (FileNotFoundError, ValueError) as exc:
        raise AblationError(f"data set {plan.base.data.dataset!r}: {exc}") from None
    split = evaluation_split(plan.base, data.counts())
    Evaluator.build(plan.base, num_classes=len(data.counts()), head=split.head, tail=split.tail,
                    cache_dir=plan.args.cache_dir)


def _progress(i: int, total: int, spec: RunSpec, result: dict[str, Any], elapsed: float, reused: bool) -> None:
    if result.get("status") != "finished":
        print(f"[{i}/{total}] {spec.variant} seed {spec.seed}: FAILED after {elapsed:.0f}s: {result.get('error')}",
              flush=True)
        return
    fid = (result.get("metrics") or {}).get("fid")
    how = "reused" if reused else (f"{elapsed:.0f}s (train {result.get('train_seconds', 0):.0f}s, "
                                   f"eval {result.get('eval_seconds', 0):.0f}s)")
    print(f"[{i}/{total}] {spec.variant} seed {spec.seed}: {how}, FID {_float(fid):.4g}", flush=True)


def execute(plan: Plan, tracker: Tracker) -> list[dict[str, Any]]:
    """Run every spec (reusing finished ones), at most --jobs at once; log each to MLflow as it completes."""
    from pipelines import ablation as module  # the importable name, so that spawned workers can unpickle run_one

    results: list[dict[str, Any]] = []
    todo = []
    for spec in plan.specs:
        tracker.child(spec)
        old = None if plan.args.no_reuse else reusable(spec)
        if old is not None:
            tracker.finish_child(spec, old)
            results.append(old)
            _progress(len(results), len(plan.specs), spec, old, 0.0, True)
        else:
            todo.append(spec)
    started: dict[Future, tuple[RunSpec, float]] = {}
    with ProcessPoolExecutor(max_workers=min(plan.args.jobs, max(1, len(todo))),
                             mp_context=get_context("spawn")) as pool:
        for spec in todo:
            started[pool.submit(module.run_one, spec)] = (spec, time.perf_counter())
        pending = set(started)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                spec, t0 = started[fut]
                result = _collect(fut, spec)
                tracker.finish_child(spec, result)
                results.append(result)
                _progress(len(results), len(plan.specs), spec, result, time.perf_counter() - t0, False)
    return results


def _collect(fut: Future, spec: RunSpec) -> dict[str, Any]:
    """The worker's result, or a failed result carrying the exception (a crash, a killed worker)."""
    try:
        return fut.result()
    except Exception as exc:  # noqa: BLE001 - any failure of one run is recorded and the others go on
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return {"variant": spec.variant, "seed": spec.seed, "config": spec.cfg, "status": "failed", "error": detail}


def report(plan: Plan, tracker: Tracker, results: list[dict[str, Any]]) -> pd.DataFrame:
    """Write ablation.parquet, summary.csv, ablation.png and ablation.json; close the parent run; print the table."""
    order = {(s.variant, s.seed): i for i, s in enumerate(plan.specs)}
    results = sorted(results, key=lambda r: order[(r["variant"], r["seed"])])
    df = pd.DataFrame([result_row(r, tracker.children.get(f"{r['variant']}-s{r['seed']}")) for r in results])
    summary = summarise(df)
    paired = compare_to_baseline(df, "cbdm")
    files = [_write_parquet(df, plan.out / "ablation.parquet"), _write_csv(summary, plan.out / "summary.csv"),
             _write_csv(paired, plan.out / "paired.csv")]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close(plot_summary(summary, plan.out / "ablation.png", title=f"{plan.name} ({plan.args.seeds} seed(s))"))
    files.append(plan.out / "ablation.png")
    meta = {"name": plan.name, "args": vars(plan.args), "config": plan.base.to_dict(), "tracking_uri": plan.uri,
            "experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_id}
    write_json_atomic(plan.out / "ablation.json", meta)
    files.append(plan.out / "ablation.json")
    ok = bool((df["status"] == "finished").any())
    tracker.finish(summary, files, "FINISHED" if ok else "FAILED")
    print("\n" + format_summary(summary))
    print("\nEach variant against CBDM on the tail, paired over seeds (variant - CBDM; two-sided paired t-test; floor "
          "sd: the real-vs-real spread at the same sample count):\n" + format_comparison(paired, "cbdm"))
    print(f"\nresults: {plan.out} (ablation.parquet, summary.csv, paired.csv, ablation.png); "
          f"MLflow parent run {tracker.parent_id}")
    return df


def run_ablation(args: argparse.Namespace) -> pd.DataFrame:
    """Validate, warm the metric caches, open the MLflow parent run, run everything, write the tables."""
    plan = make_plan(args)
    warm_caches(plan)
    params = {"preset": args.preset, "variants": ",".join(dict.fromkeys(s.variant for s in plan.specs)),
              "seeds": args.seeds, "jobs": args.jobs, "overrides": " ".join(args.overrides), "grid": args.grid,
              **plan.base.flat()}
    tracker = Tracker.start(plan.uri, args.experiment, plan.name, plan.out / "mlartifacts", params)
    print(f"ablation {plan.name}: {len(plan.specs)} runs ({len(set(s.variant for s in plan.specs))} variants x "
          f"{args.seeds} seed(s), {plan.base.train.steps} steps each), {args.jobs} at a time; folder {plan.out}; "
          f"MLflow {plan.uri}", flush=True)
    try:
        results = execute(plan, tracker)
    except BaseException:
        tracker.kill_open()
        raise
    return report(plan, tracker, results)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        df = run_ablation(args)
    except AblationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if (df["status"] == "finished").all() else 1


if __name__ == "__main__":
    sys.exit(main())
