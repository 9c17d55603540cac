"""Confirm a search's winner: re-train its top configurations with new seeds and ask whether rank 1 beats rank 2
beyond seed noise.

    python -m pipelines.confirm --search searches/NAME --top 3 --seeds 3
    python -m pipelines.confirm --resume searches/NAME/confirm          # continue after a crash or kill

Rank 1 of a search is one training run with one seed. This takes the search's K best completed trials (the order of
its trials.parquet: final FID at the best w), and trains each configuration (the search's base config, the same
budget and evaluation, plus the trial's searched values) with S new seeds: train.seed = 1000, 1001, ... (the sampling
seed of the evaluation follows it; a seed equal to the search's own train.seed is skipped, so that no run repeats
the search's). The runs are a grid on the search's runner (tune/grid.py: the same trainable, Ray and MLflow
records, --address, --storage-path, --resume; finished runs of the same config are reused, not trained again).

Per configuration: the mean, standard deviation and count of FID (at each run's best w, as the search ranks) and
tail FID. The lead test is a one-sided Welch t-test (unequal variances) of rank 1's FID below rank 2's over the new
seeds: rank 1 "leads beyond seed noise" when p < 0.05.

The confirmed winner is the configuration with the lowest mean FID over its finished new-seed runs (at least 2): the
alias ``best`` of the search's registered model (``models:/pdcbdm-SEARCH@best``, tune/registry.py) moves to that
configuration's search trial network (registered now if it was not rank 1), and the version is tagged
``pdcbdm.confirm.*`` with the confirmation's name and parent run, the configuration's search rank, its FID mean, sd
and seeds, and the lead test's verdict and p-value.

Writes into --out (default: SEARCH/confirm): confirm.parquet (one row per configuration), confirm_runs.parquet (one
row per run), confirm.png (FID and tail FID per configuration, error bars one standard deviation, each seed a dot),
confirm.json (the command line, the cells, the MLflow parent run); the runs and a parent run "confirm-SEARCH" (kind
"confirm", with these files, the means and the test) go to the search's MLflow store and experiment unless
--tracking-uri / --experiment say otherwise.
Exit status: 0 when every run finished, 1 when some failed, 2 on bad input, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from pdcbdm.config import Config
from pdcbdm.io import atomic_write
from tune import grid, registry, tracking
from tune.grid import Cell, GridPlan, GridRun, add_runner_args, close, exit_status, run_grid
from tune.search_folder import read_search_json
from tune.space_file import default_knobs
from tune.tags import LEAD_TEST_TAG, VERDICT_TAG

KIND = "confirm"
COMMAND = "python -m pipelines.confirm"
FIRST_SEED = 1000  # far from the seeds searches and ablations use (0, 1, 2, ...)
ALPHA = 0.05
METRICS = (("fid", "FID"), ("fid_tail", "tail FID"))
TEST_NAME = "one-sided Welch t-test (rank 1's FID below rank 2's, unequal variances)"


class ConfirmError(ValueError):
    """Bad input found before Ray starts; the message names what is wrong."""


# -- what to train ----------------------------------------------------------------------------------------------------
def new_seeds(count: int, search_seed: int) -> list[int]:
    """``count`` training seeds from FIRST_SEED on, skipping the search's own ``search_seed``."""
    seeds, seed = [], FIRST_SEED
    while len(seeds) < count:
        if seed != search_seed:
            seeds.append(seed)
        seed += 1
    return seeds


def _plain(value: Any) -> Any:
    """A Parquet cell as a plain Python value (numpy scalars become int/float/str); None for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def searched_knobs(search: dict[str, Any]) -> tuple[str, ...]:
    """The knobs the search varied: its space as search.json records it (``--space``), else (a search from before
    space files) the default space's."""
    knobs = (search.get("space") or {}).get("knobs")
    return tuple(knobs) if knobs else default_knobs()


def top_configs(trials: pd.DataFrame, top: int, knobs: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The ``top`` best completed trials (trials.parquet is ranked): rank, trial id, the search's FID and the
    values of the searched ``knobs`` (default: the default space's; a column the search did not vary is absent or
    empty and stays the base config's)."""
    knobs = default_knobs() if knobs is None else knobs
    done = trials[trials["status"] == "completed"] if "status" in trials else trials.iloc[0:0]
    if len(done) < 2:
        raise ConfirmError(f"the search has {len(done)} completed trial(s); a confirmation needs at least 2 (the "
                           f"search's trials.parquet ranks completed trials first)")
    if top > len(done):
        raise ConfirmError(f"--top {top}: the search has only {len(done)} completed trials")
    configs = []
    for rank, row in enumerate(done.head(top).to_dict("records"), start=1):
        params = {k: _plain(row.get(k)) for k in knobs if k in row}
        configs.append({"config_rank": rank, "trial_id": str(row.get("trial_id")), "search_fid": _plain(row.get("fid")),
                        "params": {k: v for k, v in params.items() if v is not None},
                        "mlflow_run_id": _plain(row.get("mlflow_run_id"))})
    return configs


def cells(configs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> list[Cell]:
    """One grid cell per configuration x seed: the trial's searched values and train.seed."""
    return [Cell(f"rank{c['config_rank']}-s{s}", {**c["params"], "train.seed": s},
                 {"config_rank": c["config_rank"], "trial_id": c["trial_id"], "seed": s})
            for c in configs for s in seeds]


# -- the statistics ---------------------------------------------------------------------------------------------------
def summarise(runs: pd.DataFrame, configs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per configuration (search rank order): trial id, the search's FID, and n, mean and sample standard
    deviation (ddof 1) over the finished runs of every METRICS key."""
    rows = []
    for c in configs:
        done = runs[(runs["config_rank"] == c["config_rank"]) & (runs["status"] == "finished")]
        row: dict[str, Any] = {"config_rank": c["config_rank"], "trial_id": c["trial_id"],
                               "search_fid": c["search_fid"], "n": len(done)}
        for key, _ in METRICS:
            values = pd.to_numeric(done[key], errors="coerce").dropna() if key in done else pd.Series(dtype=float)
            row[f"{key}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        row.update({k.split(".")[-1]: v for k, v in c["params"].items()})
        rows.append(row)
    return pd.DataFrame(rows)


def lead_test(first: Sequence[float], second: Sequence[float], alpha: float = ALPHA) -> dict[str, Any]:
    """Does the first configuration's FID lie below the second's beyond seed noise? A one-sided Welch t-test
    (H1: mean(first) < mean(second), unequal variances): lead = mean(second) - mean(first), t, p and a verdict."""
    a = np.asarray([x for x in first if math.isfinite(x)], dtype=float)
    b = np.asarray([x for x in second if math.isfinite(x)], dtype=float)
    out: dict[str, Any] = {"test": TEST_NAME, "n1": len(a), "n2": len(b), "alpha": alpha,
                           "lead": float(b.mean() - a.mean()) if len(a) and len(b) else math.nan,
                           "t": math.nan, "p_value": math.nan}
    if len(a) < 2 or len(b) < 2:
        out["verdict"] = "not tested: each configuration needs 2 finished runs"
        return out
    if a.std(ddof=1) == 0 and b.std(ddof=1) == 0:
        out["verdict"] = "not tested: no spread over seeds"
        return out
    res = stats.ttest_ind(a, b, equal_var=False, alternative="less")
    out.update(t=float(res.statistic), p_value=float(res.pvalue))
    if out["p_value"] < alpha:
        out["verdict"] = f"rank 1 leads beyond seed noise (p = {out['p_value']:.2g} < {alpha})"
    elif out["lead"] > 0:
        out["verdict"] = f"rank 1's lead is within seed noise (p = {out['p_value']:.2g} >= {alpha})"
    else:
        out["verdict"] = "rank 2 is as good or better on the new seeds: no lead"
    return out


def format_table(summary: pd.DataFrame) -> str:
    """The printed table: per configuration, the search's single-run FID and "mean ± sd (n)" over the new seeds."""
    def cell(mean: float, std: float) -> str:
        return "n/a" if math.isnan(mean) else (f"{mean:.4g}" if math.isnan(std) else f"{mean:.4g} ± {std:.2g}")

    view = summary.drop(columns=[f"{k}_{s}" for k, _ in METRICS for s in ("mean", "std")])
    for key, caption in METRICS:
        view[f"{caption} (new seeds)"] = [cell(m, s) for m, s in zip(summary[f"{key}_mean"], summary[f"{key}_std"])]
    view = view.rename(columns={"config_rank": "rank", "search_fid": "search FID", "n": "seeds"})
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        return view.to_string(index=False)


def plot(summary: pd.DataFrame, runs: pd.DataFrame, path: Path | None = None, title: str = "") -> Any:
    """FID and tail FID per configuration: mean with one-standard-deviation error bars, each seed a dot, the
    search's single-run FID a cross; written atomically as PNG when ``path`` is given."""
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 3.9), squeeze=False)
    x = np.arange(len(summary))
    done = runs[runs["status"] == "finished"]
    for ax, (key, caption) in zip(axes.flat, METRICS):
        ax.errorbar(x, summary[f"{key}_mean"], yerr=summary[f"{key}_std"].fillna(0.0), fmt="o", capsize=4,
                    label="mean ± sd")
        for i, rank in enumerate(summary["config_rank"]):
            values = pd.to_numeric(done.loc[done["config_rank"] == rank, key], errors="coerce") if key in done else []
            ax.scatter(np.full(len(values), i + 0.12), values, s=12, color="grey", label="a seed" if i == 0 else None)
        if key == "fid":
            ax.scatter(x, pd.to_numeric(summary["search_fid"], errors="coerce"), marker="x", color="C3",
                       label="the search's run")
        ax.set_xticks(list(x), [f"rank {r}" for r in summary["config_rank"]])
        ax.set_title(f"{caption} (lower is better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    # below the panels, where no point can hide behind it
    axes.flat[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return fig


# -- the command line -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--search", default=None, metavar="DIR", help="the search's folder (OUT/searches/NAME, as "
                   "tune/search.py prints it), with search.json and trials.parquet")
    p.add_argument("--top", type=int, default=3, help="configurations to confirm: the search's K best completed "
                   "trials (default 3, at least 2)")
    p.add_argument("--seeds", type=int, default=3, help="new seeds per configuration (default 3, at least 2)")
    add_runner_args(p, None)
    return p


def read_search(folder: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """search.json and trials.parquet of a finished search, or ConfirmError naming what is missing."""
    saved = read_search_json(folder, "--search", ConfirmError, ("config", "args"))
    table = folder / "trials.parquet"
    if not table.is_file():
        raise ConfirmError(f"--search {folder}: no trials.parquet (the search has not finished; resume it first)")
    return saved, pd.read_parquet(table)


def search_store(search: dict[str, Any], folder: Path) -> str | None:
    """The search's MLflow store (search.json's ``tracking_uri``) for runs without --tracking-uri, through
    ``tune.tracking.recorded_uri``: where search.json keeps it masked, MLFLOW_TRACKING_URI gives it again (else
    ConfirmError naming --tracking-uri and MLFLOW_TRACKING_URI); a warning when MLFLOW_TRACKING_URI names
    another store; no MLFLOW_TRACKING_* credentials sent to a server only search.json names."""
    saved = search.get("tracking_uri")
    if not saved:
        return None
    try:
        uri, warnings = tracking.recorded_uri(saved, None, f"the search in {folder}")
    except tracking.TrackingError as exc:
        raise ConfirmError(str(exc)) from None
    for line in warnings:
        print(f"warning: --search {folder}: {line}", file=sys.stderr, flush=True)
    return uri


def make_plan(args: argparse.Namespace) -> tuple[GridPlan, list[dict[str, Any]]]:
    """Validate everything (the search folder, --top, --seeds, the runner's options) before Ray starts."""
    saved, reuse = None, not args.no_reuse  # --no-reuse of this call, also with --resume
    if args.resume is not None:
        saved = grid.read_saved(Path(args.resume).resolve(), KIND)
        args = grid.resumed_args(build_parser(), args, saved)
    if not args.search:
        raise ConfirmError("--search DIR is required (the search's folder, OUT/searches/NAME)")
    if args.top < 2:
        raise ConfirmError(f"--top must be >= 2 (rank 1 is compared with rank 2), got {args.top}")
    if args.seeds < 2:
        raise ConfirmError(f"--seeds must be >= 2 (a spread needs two runs), got {args.seeds}")
    folder = Path(args.search).resolve()
    search, trials = read_search(folder)
    args.search = str(folder)
    base = Config.from_dict(search["config"])
    configs = top_configs(trials, args.top, searched_knobs(search))
    args.experiment = args.experiment or search["args"].get("experiment") or "pdcbdm"
    if saved is None and not args.tracking_uri:  # a --resume: confirm.json's store (tune.grid.make_plan)
        args.tracking_uri = search_store(search, folder)
    name = saved["name"] if saved else (args.name or f"confirm-{search.get('name') or folder.name}")
    out = Path(args.resume) if saved else Path(args.out) if args.out else folder / "confirm"
    plan = grid.make_plan(args, base, cells(configs, new_seeds(args.seeds, base.train.seed)), kind=KIND,
                          command=COMMAND, out=out, name=name, saved=saved,
                          reuse=reuse)
    return plan, configs


def report(plan: GridPlan, run: GridRun, configs: list[dict[str, Any]]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Write confirm.parquet, confirm_runs.parquet and confirm.png; close the parent run; print the table and the
    lead test."""
    matplotlib.use("Agg")  # the command writes PNG files: no display needed, none opened
    runs = run.rows.drop(columns=["cell"])
    summary = summarise(runs, configs)
    fids = [runs.loc[(runs["config_rank"] == r) & (runs["status"] == "finished"), "fid"] if "fid" in runs else []
            for r in (1, 2)]
    lead = lead_test(*(pd.to_numeric(f, errors="coerce").tolist() for f in fids))
    out = plan.search_dir
    files = [atomic_write(out / "confirm.parquet", lambda f: summary.to_parquet(f, index=False)),
             atomic_write(out / "confirm_runs.parquet", lambda f: runs.to_parquet(f, index=False)),
             out / "confirm.png", plan.meta_path]
    title = f"{plan.name}: {len(configs)} configurations x {plan.args.seeds} new seeds"
    plt.close(plot(summary, runs, out / "confirm.png", title))
    tracking.set_tags(plan.uri, run.parent, {LEAD_TEST_TAG: lead["test"], VERDICT_TAG: lead["verdict"]})
    values = {f"rank{r['config_rank']}.{k}_{s}": r[f"{k}_{s}"] for _, r in summary.iterrows()
              for k, _ in METRICS for s in ("mean", "std")}
    close(plan, run, files, {**values, "lead": lead["lead"], "lead_t": lead["t"], "lead_p_value": lead["p_value"]})
    print("\n" + format_table(summary))
    print(f"\nrank 1 against rank 2 on FID over the new seeds: lead {lead['lead']:.4g} (rank 2's mean minus rank "
          f"1's), {lead['test']}: t = {lead['t']:.3g}, p = {lead['p_value']:.3g}; {lead['verdict']}")
    print(promote_winner(plan, run.parent, summary, configs, lead))
    print(f"\nresults: {out} (confirm.parquet, confirm_runs.parquet, confirm.png); {int(runs['reused'].sum())} run(s) "
          f"reused; MLflow parent run {run.parent}")
    return runs, lead


def winner(summary: pd.DataFrame) -> pd.Series | None:
    """The confirmed winner: the configuration with the lowest mean FID over at least 2 finished new-seed runs
    (None when none has 2)."""
    ranked = summary[(summary["n"] >= 2) & summary["fid_mean"].map(math.isfinite)]
    return None if ranked.empty else ranked.loc[ranked["fid_mean"].idxmin()]


def promote_winner(plan: GridPlan, parent: str, summary: pd.DataFrame, configs: Sequence[dict[str, Any]],
                   lead: dict[str, Any]) -> str:
    """Move ``best`` of the search's registered model to the winner's search trial network and tag that version
    with this confirmation's result (``tune.registry.promote``); returns the line to print."""
    folder = Path(plan.args.search)
    name = read_search_json(folder, "--search", ConfirmError).get("name") or folder.name
    best = winner(summary)
    if best is None:
        return f"alias best of {registry.registered_name(name)} not moved: no configuration has 2 finished runs"
    run_id = next((c.get("mlflow_run_id") for c in configs if c["config_rank"] == best["config_rank"]), None)
    result = {"name": plan.name, "parent_run": parent, "search_rank": int(best["config_rank"]),
              "trial_id": best["trial_id"], "fid_mean": float(best["fid_mean"]), "fid_std": float(best["fid_std"]),
              "seeds": int(best["n"]), "winner": "lowest mean FID over the new seeds", "verdict": lead["verdict"],
              "p_value": float(lead["p_value"])}
    return registry.promote(plan.uri, name, run_id, result)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> pd.DataFrame:
        plan, configs = make_plan(args)
        a = plan.args
        params = {"search": a.search, "top": a.top, "seeds": a.seeds, **plan.cfg.flat()}
        return report(plan, run_grid(plan, params), configs)[0]

    return exit_status(run, (ConfirmError,))


if __name__ == "__main__":
    sys.exit(main())
