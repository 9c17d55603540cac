"""The paper's ablation (Table 1) on any preset: DDPM, CBDM, CBDM + each PD-CBDM component, and PD-CBDM, over seeds.

    python -m pipelines.ablation --preset digits --seeds 3                  # Digits-LT, 6 variants x 3 seeds
    python -m pipelines.ablation --preset smoke --seeds 1 --variants cbdm,pd-cbdm --steps 20 --out D
    python -m pipelines.ablation --preset cifar100-lt --seeds 3 --steps 100000 --set data.root=/data/cifar
    python -m pipelines.ablation --resume D                                 # continue D after a crash or kill

Variants (config overrides over the preset; every other field is the preset's, so each variant has the same
budget, data, sampler and evaluation):
  ddpm      plain conditional DDPM with classifier-free guidance: no L_DA (cbdm_tau=0), no PD loss, no TSA
  cbdm      the baseline, CBDM (Eq. 9): cbdm_tau = the preset's (1 if the preset's is 0), q = label frequency
  pd        CBDM + the perceptual-distinguish loss (Eq. 10-11) with the preset's loss.pd_weight
  reweight  CBDM + the re-weighted target-label distribution q' (Eq. 12): label_dist=inverted
  tsa       CBDM + timestep-dependent self-attention (Eq. 13-14) at the preset's model.tsa_resolutions
  pd-cbdm   all three components
("+pd", "+reweight" and "+tsa" are accepted for pd, reweight and tsa.)

The ablation is a grid (variant x seed) on the search's runner (tune/grid.py): each run is a trial of the search's
trainable on Ray (--address, --storage-path, --resume as tune/search.py), trains for the budget (train.seed = the
seed) and is scored at the end by the search's final evaluation on eval.num_samples samples whose sampling seed is
the run's seed, so that every variant is judged on the same noise and the same head/tail classes (eval.split_ratio).
The table is at one fixed guidance scale, eval.proxy_guidance; with --grid every eval.guidance_grid value is scored
too (fid_w{w}, and the grid's best w as best_guidance). The data set (data.seed) is the same for every run.

Writes into --out (default: ablations/NAME):
  ablation.parquet       one row per variant x seed: status, wall seconds, the MLflow run id, whether the run was
                         reused, every headline metric at the fixed w (guidance), fid_w{w} and best_guidance
  summary.csv            mean and standard deviation (over seeds) of FID, recall, F_8, tail FID, tail-to-head
                         confusion and tail consistency per variant (also printed)
  paired.csv             each variant against CBDM on the tail metrics (tail FID and KID, tail consistency,
                         tail-to-head confusion): per-seed differences, their mean and spread, a paired t-test and
                         the metric's real-vs-real floor spread, with a verdict (pdcbdm/evaluation/paired.py; also
                         printed)
  ablation.png           bar chart of the same with error bars (one standard deviation)
  ablation.json          the command line, the base config, the cells, the MLflow parent run (written at the start)
  mlflow.db, mlartifacts/  the MLflow store (unless --tracking-uri points elsewhere): a parent run NAME (kind
                         "ablation") with the summary, a child run per variant x seed (VARIANT-sSEED) with its
                         metrics, sample grids, per-class table (evaluation/per_class.parquet) and EMA network
  tune-*/, train/        Ray's trial folders and training checkpoints (unless --storage-path points elsewhere)
A run whose config (seed and evaluation included) already has a finished MLflow run in the experiment is reused, not
trained again: re-running the same command with the same --out trains only what is missing, under the same parent
run (--no-reuse retrains). --resume DIR continues unfinished runs from their last checkpoint.
Exit status: 0 when every run finished, 1 when some failed, 2 on bad input, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from pdcbdm.config import Config, ConfigError, apply_overrides, parse_float_list
from pdcbdm.evaluation.paired import TAIL_METRICS, compare_to_baseline, format_comparison
from pdcbdm.io import atomic_write, atomic_write_bytes
from pdcbdm.presets import PRESETS, preset
from tune import arguments, grid
from tune.grid import GridPlan, GridRun, add_runner_args, close, exit_status, guidance_metrics, run_grid

__all__ = ["VARIANTS", "SUMMARY_METRICS", "Variant", "parse_variants", "variant_overrides", "variant_config",
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


def variant_overrides(base: Config, name: str, seed: int) -> dict[str, Any]:
    """The config fields of one run over ``base``: the variant's components switched on or off and train.seed =
    seed.

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
    return {
        "loss.cbdm_tau": tau if v.cbdm else 0.0,
        "loss.pd_weight": base.loss.pd_weight if v.pd else 0.0,
        "loss.label_dist": "inverted" if v.reweight else "cbdm",
        "model.tsa_resolutions": base.model.tsa_resolutions if v.tsa else "",
        "train.seed": seed,
    }


def variant_config(base: Config, name: str, seed: int) -> Config:
    """The resolved config of one run (``variant_overrides`` applied to ``base``)."""
    return apply_overrides(base, variant_overrides(base, name, seed))


# -- tables and plots -------------------------------------------------------------------------------------------------
def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _column_mean(rows: pd.DataFrame, key: str) -> float:
    values = pd.to_numeric(rows[key], errors="coerce") if key in rows else pd.Series(dtype=float)
    return float(values.mean()) if values.notna().any() else math.nan


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof = 1; NaN with one seed) over the finished seeds of each variant,
    for every SUMMARY_METRICS key: columns variant, label, n, {metric}_mean, {metric}_std; Table 1's row order.
    Also {metric}_floor and {metric}_floor_std, the real-vs-real noise floor at the runs' sample count (the same
    for every run of one evaluation; NaN where the rows carry none)."""
    rows = []
    for name in [n for n in VARIANTS if n in set(df["variant"])]:
        done = df[(df["variant"] == name) & (df["status"] == "finished")]
        row: dict[str, Any] = {"variant": name, "label": VARIANTS[name].label, "n": len(done)}
        for key, _, _ in SUMMARY_METRICS:
            values = pd.to_numeric(done[key], errors="coerce") if key in done else pd.Series(dtype=float)
            row[f"{key}_mean"] = _column_mean(done, key)
            row[f"{key}_std"] = float(values.std(ddof=1)) if values.notna().sum() > 1 else math.nan
            row[f"{key}_floor"] = _column_mean(done, f"{key}_floor")
            row[f"{key}_floor_std"] = _column_mean(done, f"{key}_floor_std")
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
    """Bar chart, one panel per SUMMARY_METRICS key, a bar per variant with one-standard-deviation error bars
    over seeds, and the real-vs-real noise floor (dashed, its spread shaded) where the summary has it: a bar
    within the floor's band is as good as real data at this sample count. Written atomically as PNG when ``path``
    is given. Returns the matplotlib figure."""
    cols = 3
    rows = -(-len(SUMMARY_METRICS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    x = range(len(summary))
    floors = False
    for ax, (key, caption, higher) in zip(axes.flat, SUMMARY_METRICS):
        err = summary[f"{key}_std"].fillna(0.0)
        ax.bar(x, summary[f"{key}_mean"], yerr=err, capsize=3, color=[f"C{i}" for i in x])
        floors = _draw_floor(ax, summary, key) or floors
        ax.set_xticks(list(x), summary["variant"], rotation=45, ha="right")
        ax.set_title(f"{caption} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if floors:
        fig.subplots_adjust(bottom=fig.subplotpars.bottom + 0.04)
        fig.text(0.5, 0.01, "error bars: one standard deviation over seeds; dashed: the same metric for real images "
                 "at the same sample count (real vs real), shaded: its standard deviation", ha="center", fontsize=8)
    if path is not None:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return fig


def _draw_floor(ax: Any, summary: pd.DataFrame, key: str) -> bool:
    floor = summary.get(f"{key}_floor", pd.Series(dtype=float)).dropna()
    if floor.empty:
        return False
    level = float(floor.iloc[0])
    spread = summary.get(f"{key}_floor_std", pd.Series(dtype=float)).dropna()
    ax.axhline(level, color="black", linestyle="--", linewidth=1)
    if not spread.empty:
        ax.axhspan(level - float(spread.iloc[0]), level + float(spread.iloc[0]), color="grey", alpha=0.2)
    return True


def _write_parquet(df: pd.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda f: df.to_parquet(f, index=False))


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    return atomic_write_bytes(path, df.to_csv(index=False).encode())


# -- the runs: a grid on the search's runner --------------------------------------------------------------------------
KIND = "ablation"
COMMAND = "python -m pipelines.ablation"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--grid", action="store_true", help="also score every eval.guidance_grid value (fid_w{w}, and "
                   "the grid's best w as best_guidance); the table always uses the fixed eval.proxy_guidance")
    add_runner_args(p, "pdcbdm-ablation")
    return p


def base_config(args: argparse.Namespace) -> Config:
    """The preset with --set and --steps, scored at the fixed eval.proxy_guidance (and, with --grid, over
    eval.guidance_grid as well): the final evaluation's guidance values are the config's eval.guidance_grid."""
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    cfg = apply_overrides(preset(args.preset), overrides)
    ws = {cfg.eval.proxy_guidance}
    if args.grid:
        ws |= set(parse_float_list(cfg.eval.guidance_grid, "eval.guidance_grid"))
    return apply_overrides(cfg, {"eval.guidance_grid": ",".join(f"{w:g}" for w in sorted(ws))})


def make_plan(args: argparse.Namespace) -> GridPlan:
    """Validate every option and build every run's config before anything is trained or logged."""
    saved, reuse = None, not args.no_reuse  # --no-reuse of this call, also with --resume
    if args.resume is not None:
        saved = grid.read_saved(Path(args.resume).resolve(), KIND)
        args = grid.resumed_args(build_parser(), args, saved)
    if args.seeds < 1:
        raise AblationError(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        raise AblationError(f"--steps must be >= 1, got {args.steps}")
    try:
        base = base_config(args)
        names = parse_variants(args.variants)
        cells = [grid.Cell(f"{n}-s{s}", variant_overrides(base, n, s), {"variant": n, "seed": s})
                 for n in names for s in range(args.seeds)]
    except ConfigError as exc:
        raise AblationError(str(exc)) from None
    if saved:
        out, name = Path(args.resume), saved["name"]
    else:
        name = args.name or arguments.default_name(f"ablation-{args.preset}")
        out = Path(args.out) if args.out else Path("ablations") / name
        name = args.name or grid.existing_name(out.resolve(), KIND) or name
    return grid.make_plan(args, base, cells, kind=KIND, command=COMMAND, out=out, name=name, saved=saved,
                          reuse=reuse)


def fixed_w_rows(plan: GridPlan, rows: pd.DataFrame) -> pd.DataFrame:
    """ablation.parquet: one row per variant x seed with the metrics at the fixed w (eval.proxy_guidance) taken
    from each run's guidance sweep (the runs' headline metrics are at their best w: every metric scored per w is
    replaced, ROW_METRICS are NaN for a failed run)."""
    w = plan.cfg.eval.proxy_guidance
    out = []
    for row in rows.to_dict("records"):
        at_w = guidance_metrics(plan.uri, row.get("mlflow_run_id"), w) if row["status"] == "finished" else {}
        row.update({k: _float(at_w.get(k)) for k in {*ROW_METRICS, *at_w} - {"guidance"}}, guidance=w)
        out.append({"variant": row["variant"], "label": VARIANTS[row["variant"]].label, **row})
    return pd.DataFrame(out).drop(columns=["cell"])


def report(plan: GridPlan, run: GridRun) -> pd.DataFrame:
    """Write ablation.parquet, summary.csv, paired.csv and ablation.png; close the parent run; print the tables."""
    matplotlib.use("Agg")  # the command writes PNG files: no display needed, none opened
    df = fixed_w_rows(plan, run.rows)
    summary = summarise(df)
    paired = compare_to_baseline(df, "cbdm")
    out = plan.search_dir
    files = [_write_parquet(df, out / "ablation.parquet"), _write_csv(summary, out / "summary.csv"),
             _write_csv(paired, out / "paired.csv"), out / "ablation.png", plan.meta_path]
    plt.close(plot_summary(summary, out / "ablation.png", title=f"{plan.name} ({plan.args.seeds} seed(s))"))
    values = {f"{r['variant']}.{key}_{stat}": r[f"{key}_{stat}"] for _, r in summary.iterrows()
              for key, _, _ in SUMMARY_METRICS for stat in ("mean", "std")}
    close(plan, run, files, values)
    print("\n" + format_summary(summary))
    print("\nEach variant against CBDM on the tail, paired over seeds (variant - CBDM; two-sided paired t-test; floor "
          "sd: the real-vs-real spread at the same sample count):\n" + format_comparison(paired, "cbdm"))
    print(f"\nresults: {out} (ablation.parquet, summary.csv, paired.csv, ablation.png); {int(df['reused'].sum())} "
          f"run(s) reused; MLflow parent run {run.parent}")
    return df


def run_ablation(args: argparse.Namespace) -> pd.DataFrame:
    """Validate, run the grid (reusing finished runs), write the tables."""
    plan = make_plan(args)
    a = plan.args
    params = {"preset": a.preset, "variants": ",".join(dict.fromkeys(c.labels["variant"] for c in plan.cells)),
              "seeds": a.seeds, "overrides": " ".join(a.overrides), "grid": a.grid, **plan.cfg.flat()}
    return report(plan, run_grid(plan, params))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status(lambda: run_ablation(args), (AblationError,))


if __name__ == "__main__":
    sys.exit(main())
