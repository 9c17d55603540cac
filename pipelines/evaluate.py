"""Evaluate a checkpoint: sample over a grid of guidance values, score every metric, write JSON, CSV and grids.

    python -m pipelines.evaluate --checkpoint runs/smoke/checkpoint.pt --num-samples 500 --guidance 0,1,2 --out D
    python -m pipelines.evaluate --checkpoint C --sampler ddpm --device cuda --extractor inception --out D
    python -m pipelines.evaluate --checkpoint runs:/RUN_ID/model --tracking-uri sqlite:////abs/mlflow.db --out D

--checkpoint takes a checkpoint file of ``pdcbdm.train`` or the MLflow model of a search's trial (``runs:/RUN_ID/
model``, ``models:/MODEL_ID``, or a registered version: ``models:/pdcbdm-SEARCH@best`` is a search's winner,
``models:/NAME/VERSION`` one version; the EMA network, a pickle-free torch.export graph, see tune/mlflow_model.py;
metrics.json names the version an alias pointed to); --log-to-run writes the metrics back to that trial's run
(metrics evaluate_*, evaluate/metrics.json).

For each guidance value w (classifier-free guidance, eps~ = (1 + w) eps(x, t, y) - w eps(x, t, null)) one set of
samples is drawn with labels spread uniformly over the classes and scored against the reference features (docs/method.md
"Metrics": FID, IS, precision/recall with k = 5, PRD F_8 / F_1/8, head/tail FID, class consistency). The noise
error of Algorithm 2 is measured on the first training images.

Writes into --out:
  metrics.json       checkpoint, step, resolved config, per-w metrics, best w by FID, noise error, timings
  per_class.csv      one row per (guidance, class): FID, consistency, sample count, head/tail group
  samples_w{w}.png   a row per class (first 20 classes), up to 10 samples per row
  samples_w{w}.pt    with --save-samples: {"images": uint8 [N, C, H, W], "labels": int64 [N], "guidance": w}

Reference statistics are read from the cache written by `python -m pipelines.reference_stats` (computed here
once when missing). A checkpoint trained on a prepared data set (data.dataset=parquet) is scored against its
folder's reference (its held-out reference part unless it has a reference split: ``reference_kind`` in
metrics.json) with its domain CNN; the folder (data.root) must be readable here. Exit status 2 on a missing or
corrupt checkpoint or data set, or a bad option.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pdcbdm.config import Config, ConfigError, apply_overrides, parse_float_list
from pdcbdm.data import HeadTailSplit, reference_kind, to_unit_range
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.evaluation import Evaluator, GuidanceResult, best_by_fid, evaluation_split, headline, sampling_autocast
from pdcbdm.io import write_json_atomic
from pdcbdm.noise_error import noise_error
from pdcbdm.train import load_data
from pdcbdm.training import CheckpointError
from pdcbdm.viz import save_grid
from pipelines.model_source import UsageError, load_network, pick_device, source_name

__all__ = ["build_parser", "evaluate_checkpoint", "format_table", "grid_of_classes", "main", "parse_guidance"]

# CLI flag -> config field, so that an invalid value's error names both.
FLAG_FIELDS = {
    "--num-samples": "eval.num_samples", "--batch-size": "eval.batch_size", "--sampler": "sample.sampler",
    "--steps": "sample.steps", "--extractor": "eval.extractor", "--inception-weights": "eval.inception_weights",
    "--noise-error-images": "eval.noise_error_images", "--noise-error-stride": "eval.noise_error_stride",
    "--device": "train.device",
}
GRID_CLASSES = 20
GRID_PER_ROW = 10
TABLE_KEYS = (("FID", "fid"), ("IS", "is_mean"), ("prec", "precision"), ("recall", "recall"), ("F8", "f8"),
              ("F1/8", "f1_8"), ("FID tail", "fid_tail"), ("tail->head", "tail_to_head_confusion"))


# -- options --------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every option explains itself in --help."""
    p = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PATH|URI",
                   help="checkpoint.pt written by pdcbdm.train, or a trial's MLflow model: runs:/RUN_ID/model, "
                        "or a registered one: models:/pdcbdm-SEARCH@best (a search's winner), models:/NAME/VERSION "
                        "(the EMA network; --which must stay ema)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow store of a runs:/ or models:/ --checkpoint (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--log-to-run", action="store_true",
                   help="with a runs:/RUN_ID/model or registry --checkpoint: log the best w's metrics (evaluate_*) and "
                        "metrics.json (evaluate/metrics.json) to that run")
    p.add_argument("--out", required=True, metavar="D", help="output folder (created; existing files are replaced)")
    p.add_argument("--which", choices=("ema", "net"), default="ema",
                   help="weights to evaluate: the EMA copy (default, as the paper) or the raw network")
    p.add_argument("--guidance", default=None, metavar="W1,W2,...",
                   help="comma-separated guidance strengths w >= 0, one sampling each (default: the checkpoint "
                        "config's eval.guidance_grid)")
    p.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="samples per guidance value, labels uniform over classes (default: eval.num_samples)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="images per sampling / feature / noise-error batch (default: eval.batch_size)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None,
                   help="ddim (--steps steps) or ddpm (ancestral, all T steps; slow) (default: sample.sampler)")
    p.add_argument("--steps", type=int, default=None, metavar="S",
                   help="DDIM steps (default: sample.steps; ignored by ddpm)")
    p.add_argument("--device", default="auto", metavar="cpu|cuda|auto",
                   help="where the network and the feature network run; auto = CUDA when available (default)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial noise (the same noise for every w, so the w are compared on equal "
                        "draws) and of the PRD clusterings (default 0)")
    p.add_argument("--extractor", choices=("digits", "domain", "inception"), default=None,
                   help="feature network: digits CNN (64-d, has logits), domain (the CNN trained on a prepared "
                        "data set's train split: data.dataset=parquet) or FID Inception-V3 (2048-d) "
                        "(default: eval.extractor)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="Inception weights in torch-fidelity's layout (only with the inception extractor)")
    p.add_argument("--cache-dir", default=None, metavar="D",
                   help="cache of reference statistics and the digits network (default: $PDCBDM_CACHE or "
                        "~/.cache/pdcbdm)")
    p.add_argument("--noise-error-images", type=int, default=None, metavar="N",
                   help="training images for the noise error of Algorithm 2; 0 skips it "
                        "(default: eval.noise_error_images)")
    p.add_argument("--noise-error-stride", type=int, default=None, metavar="K",
                   help="visit every K-th timestep in the noise error (default: eval.noise_error_stride)")
    p.add_argument("--save-samples", action="store_true", help="also write samples_w{w}.pt (uint8 images, labels)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def parse_guidance(spec: str) -> tuple[float, ...]:
    """Parse --guidance "0,1,2" into (0.0, 1.0, 2.0); UsageError naming --guidance when malformed or negative."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--guidance must be comma-separated numbers such as '0,1,2', got {spec!r}") from None
    if not values or any(not math.isfinite(w) or w < 0 for w in values):
        raise UsageError(f"--guidance must hold one or more finite values >= 0, got {spec!r}")
    if len(set(values)) != len(values):
        raise UsageError(f"--guidance repeats a value, got {spec!r}")
    return values


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``section.field`` overrides the options ask for (options left unset keep the checkpoint's values)."""
    values = {"--num-samples": args.num_samples, "--batch-size": args.batch_size, "--sampler": args.sampler,
              "--steps": args.steps, "--extractor": args.extractor, "--inception-weights": args.inception_weights,
              "--noise-error-images": args.noise_error_images, "--noise-error-stride": args.noise_error_stride,
              "--device": args.device}
    return {FLAG_FIELDS[flag]: v for flag, v in values.items() if v is not None}


def resolve_config(base: Config, overrides: dict[str, Any], guidance: Sequence[float] | None) -> Config:
    """The run config: the checkpoint's config with the overrides applied and validated.

    Args:
        base: the checkpoint's Config.
        overrides: ``{"section.field": value}`` (see FLAG_FIELDS).
        guidance: the grid of w to record as eval.guidance_grid (None keeps the checkpoint's).

    The samples follow the checkpoint's ``eval.protocol`` as a trial's final evaluation does, except that
    ``--sampler`` or ``--steps`` switch it to ``fast`` (the config's sampler, with those values).

    Raises UsageError naming the option and the config field when a value is invalid.
    """
    items = dict(overrides)
    if {"sample.sampler", "sample.steps"} & set(items):
        items["eval.protocol"] = "fast"  # asked for a sampler: the paper protocol's fixed DDPM would ignore it
    if guidance is not None:
        items["eval.guidance_grid"] = ",".join(f"{w:g}" for w in guidance)
    kind = items.get("eval.extractor", base.eval.extractor)
    if kind != "inception":
        if items.get("eval.inception_weights") is not None:
            raise UsageError(f"--inception-weights is only used with the inception extractor (--extractor "
                             f"inception); this run uses the {kind} network")
        items["eval.inception_weights"] = None  # a stale Inception path in the checkpoint must not break a CNN
    try:
        return apply_overrides(base, items)
    except ConfigError as exc:
        flags = [f for f, key in FLAG_FIELDS.items() if key in str(exc)]
        raise UsageError(f"{exc}{' (option ' + flags[0] + ')' if flags else ''}") from None


# -- outputs --------------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp)`` on a temp file beside ``path``, then move it into place (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def grid_of_classes(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                    max_classes: int = GRID_CLASSES, per_row: int = GRID_PER_ROW) -> tuple[torch.Tensor, int]:
    """Arrange samples as one row per class for ``save_grid``: (images [rows * n, C, H, W], n per row).

    Args:
        images: uint8 samples [N, C, H, W].
        labels: [N] class each sample was generated for.
        num_classes: K; rows are drawn for classes 0 .. min(K, max_classes) - 1.
        max_classes: most rows shown.
        per_row: most samples per row; fewer when no class has that many. Missing cells stay white.
    """
    shown = min(num_classes, max_classes)
    counts = torch.bincount(labels, minlength=num_classes)[:shown]
    n = max(1, min(per_row, int(counts.max()) if shown else 1))
    grid = torch.full((shown * n, *images.shape[1:]), 255, dtype=torch.uint8)
    for k in range(shown):
        picked = images[labels == k][:n]
        grid[k * n:k * n + picked.shape[0]] = picked
    return grid, n


def write_per_class_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write the per-(guidance, class) rows as CSV, atomically; empty cells for None."""
    columns = list(rows[0]) if rows else ["guidance", "label"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def save_sample_tensor(path: Path, images: torch.Tensor, labels: torch.Tensor, guidance: float) -> Path:
    """Write one guidance value's samples as a ``torch.load(weights_only=True)``-readable dict, atomically."""
    payload = {"images": images.contiguous(), "labels": labels.to(torch.int64), "guidance": float(guidance)}
    return _atomic_write(path, lambda tmp: torch.save(payload, tmp))


def w_name(w: float) -> str:
    """The w as it appears in file names and JSON keys: 0 -> "0", 1.5 -> "1.5"."""
    return f"{w:g}"


# -- work -----------------------------------------------------------------------------------------------------------
def measure_noise_error(net: nn.Module, cfg: Config, device: torch.device, *, seed: int,
                        progress: bool) -> tuple[float, int] | None:
    """Algorithm 2 over the first ``eval.noise_error_images`` training images (no flips), in batches of
    ``eval.batch_size``, every ``eval.noise_error_stride``-th timestep: (mean squared error per pixel, images
    used), or None when the count is 0.

    Args:
        net: the noise-prediction network eps_theta(x_t, t, y).
        cfg: the run config (data set, diffusion schedule, eval.noise_error_* and eval.batch_size).
        device: where the network runs.
        seed: seed of the one eps drawn per image.
        progress: show a progress bar.
    """
    n = cfg.eval.noise_error_images
    if n == 0:
        return None
    data = load_data(cfg)
    n = min(n, len(data))
    bs = cfg.eval.batch_size
    batches = [(to_unit_range(data.images[i:min(i + bs, n)]), data.labels[i:min(i + bs, n)]) for i in range(0, n, bs)]
    value = noise_error(net, GaussianDiffusion(cfg.diffusion), batches, stride=cfg.eval.noise_error_stride,
                        seed=seed, device=device, progress=progress)
    return value, n


def _class_rows(w: float, rows: list[dict[str, Any]], head: Sequence[int], names: Sequence[str]) -> list[dict]:
    """Per-class rows of one w, with the guidance value, class name and head/tail group added."""
    out = []
    for row in rows:
        k = int(row["label"])
        name = names[k] if k < len(names) else str(k)
        out.append({"guidance": w, "label": k, "class_name": name, "group": "head" if k in head else "tail",
                    **{key: v for key, v in row.items() if key != "label"}})
    return out


def _score_grid(evaluator: Evaluator, net: nn.Module, grid: Sequence[float], out: Path, *, seed: int,
                save_samples: bool, progress: bool,
                names: Sequence[str]) -> tuple[list[GuidanceResult], list[dict[str, Any]], dict[str, Any]]:
    """The evaluator's report of each w (``Evaluator.evaluate_grid``, as a trial's final evaluation), with its grid
    PNG (and tensor) written; returns (results, per-class rows, timings)."""
    results = evaluator.evaluate_grid(net, grid, n=evaluator.cfg.eval.num_samples, seed=seed, progress=progress,
                                      autocast=sampling_autocast(evaluator.cfg, evaluator.device))
    rows, timings = [], {}
    for r in results:
        rows += _class_rows(r.guidance, r.per_class, evaluator.head, names)
        tiles, n = grid_of_classes(r.images, r.labels, evaluator.num_classes)
        save_grid(tiles, out / f"samples_w{w_name(r.guidance)}.png", nrow=n, scale=max(1, 64 // r.images.shape[-1]))
        if save_samples:
            save_sample_tensor(out / f"samples_w{w_name(r.guidance)}.pt", r.images, r.labels, r.guidance)
        timings[w_name(r.guidance)] = r.timings
    return results, rows, timings


def evaluate_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, which: str = "ema",
                        guidance: Sequence[float] | None = None, overrides: dict[str, Any] | None = None,
                        seed: int = 0, cache_dir: str | os.PathLike | None = None, save_samples: bool = False,
                        progress: bool = True) -> dict[str, Any]:
    """Evaluate one checkpoint and write metrics.json, per_class.csv and the sample grids into ``out``.

    Args:
        checkpoint: a checkpoint.pt of ``pdcbdm.train`` (CheckpointError when missing or corrupt).
        out: output folder (created).
        which: "ema" or "net" weights.
        guidance: the w to sample at (None: the config's eval.guidance_grid).
        overrides: ``{"section.field": value}`` on the checkpoint's config (sampler, steps, counts, extractor,
            train.device for the device, ...).
        seed: initial-noise seed (shared by every w) and PRD seed.
        cache_dir: reference-statistics and digits-network cache (None: $PDCBDM_CACHE or ~/.cache/pdcbdm).
        save_samples: also write samples_w{w}.pt.
        progress: show progress bars.

    Returns:
        The dict written to metrics.json.
    """
    start = time.perf_counter()
    out = Path(out)
    net, base_cfg, data = load_network(checkpoint, which)  # checked before any slow work
    cfg = resolve_config(base_cfg, overrides or {}, guidance)
    device = pick_device(cfg.train.device)
    net = net.to(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    evaluator, split = _build_evaluator(cfg, data, device, cache_dir, progress)
    t_setup = time.perf_counter()
    grid = tuple(dict.fromkeys(parse_float_list(cfg.eval.guidance_grid, "eval.guidance_grid")))  # one run per w
    results, rows, per_w = _score_grid(evaluator, net, grid, out, seed=seed, save_samples=save_samples,
                                       progress=progress, names=data.get("class_names") or [])
    t_noise = time.perf_counter()
    nerr = measure_noise_error(net, cfg, device, seed=seed, progress=progress)
    summary = _summary(checkpoint, which, cfg, data, split, results, nerr, device)
    summary["judge"] = evaluator.judge_kind
    summary["timings"] = {"setup_s": t_setup - start, "per_guidance": per_w,
                          "noise_error_s": time.perf_counter() - t_noise, "total_s": time.perf_counter() - start}
    write_per_class_csv(out / "per_class.csv", rows)
    write_json_atomic(out / "metrics.json", summary)
    return summary


def log_to_run(model_uri: str, summary: dict[str, Any]) -> str:
    """Write an evaluation's results to the run of a runs:/RUN_ID/model URI, or of a registered version (the run of
    the version evaluated: ``summary["checkpoint"]``): the best w's headline metrics as evaluate_* (at the model's
    training step) and the whole summary as evaluate/metrics.json. Returns the run."""
    # deferred: MLflow (1.3 s) for --log-to-run only; --help answers without it
    from mlflow.tracking import MlflowClient
    from tune.registry import RegistryError, is_registry_uri, pin

    run_id = model_uri[len("runs:/"):].split("/", 1)[0] if model_uri.startswith("runs:/") else None
    if is_registry_uri(model_uri):
        try:
            run_id = pin(summary["checkpoint"]).run_id
        except RegistryError as exc:
            raise UsageError(f"--log-to-run: {exc}") from None
    if not run_id:
        raise UsageError(f"--log-to-run needs a runs:/RUN_ID/model or registry --checkpoint of a run, got {model_uri}")
    client = MlflowClient()
    values = {f"evaluate_{k}": v for k, v in summary["best"].items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    values["evaluate_best_guidance"] = summary["best_guidance"]
    for key, value in values.items():
        client.log_metric(run_id, key, float(value), step=int(summary["step"]))
    client.log_dict(run_id, summary, "evaluate/metrics.json")
    return run_id


def _build_evaluator(cfg: Config, data: dict[str, Any], device: torch.device,
                     cache_dir: str | os.PathLike | None, progress: bool) -> tuple[Evaluator, HeadTailSplit]:
    """The Evaluator with the evaluation's head/tail split (``eval.split_ratio`` over the checkpoint's class
    counts), the same for every checkpoint whatever its loss.split_ratio."""
    counts = [int(c) for c in data.get("class_counts") or []]
    if len(counts) != int(data["num_classes"]):
        raise CheckpointError(f"checkpoint lacks class_counts for its {data['num_classes']} classes")
    split = evaluation_split(cfg, counts)
    evaluator = Evaluator.build(cfg, num_classes=len(counts), head=split.head, tail=split.tail, device=device,
                                cache_dir=cache_dir, progress=progress, train_counts=counts)
    if tuple(evaluator.image_shape) != tuple(data["image_shape"]):
        raise CheckpointError(f"checkpoint images are {tuple(data['image_shape'])} but its config's data "
                              f"({cfg.data.dataset}, data.image_size={cfg.data.image_size}) are "
                              f"{tuple(evaluator.image_shape)}")
    return evaluator, split


def _summary(checkpoint: str | os.PathLike, which: str, cfg: Config, data: dict[str, Any], split: HeadTailSplit,
             results: list[GuidanceResult], nerr: tuple[float, int] | None, device: torch.device) -> dict[str, Any]:
    """The metrics.json content (timings are added by the caller)."""
    best = best_by_fid(results, cfg.eval.min_consistency)
    noise = None if nerr is None else {"value": nerr[0], "metric": "mse", "images": nerr[1],
                                       "stride": cfg.eval.noise_error_stride}
    return {
        "checkpoint": source_name(checkpoint, data), "which": which, "step": int(data["step"]),
        "config": cfg.to_dict(), "device": str(device), "num_classes": int(data["num_classes"]),
        "class_counts": [int(c) for c in data["class_counts"]], "head_classes": list(split.head),
        "tail_classes": list(split.tail), "guidance_values": [r.guidance for r in results],
        "guidance": {w_name(r.guidance): r.metrics for r in results},
        "best_guidance": best.guidance, "best": headline(best), "noise_error": noise,
        "eval_protocol": cfg.eval.protocol,
        "reference_kind": reference_kind(cfg.data.dataset, cfg.data.root, cfg.eval.reference),
    }


# -- report ---------------------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(summary: dict[str, Any]) -> str:
    """The short per-w table printed at the end (n/a where a metric is not computable, e.g. IS without logits)."""
    header = ["w", *(name for name, _ in TABLE_KEYS)]
    lines = [[w, *(_cell(summary["guidance"][w].get(key)) for _, key in TABLE_KEYS)] for w in summary["guidance"]]
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(str(c).rjust(widths[i]) for i, c in enumerate(r)) for r in [header, *lines]]
    text.append(f"best w by FID: {w_name(summary['best_guidance'])}")
    if summary.get("noise_error"):
        ne = summary["noise_error"]
        text.append(f"noise error (Algorithm 2, {ne['metric']}, {ne['images']} images, stride {ne['stride']}): "
                    f"{ne['value']:.4g}")
    return "\n".join(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (None: sys.argv[1:]); returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    if args.tracking_uri:
        import mlflow  # deferred: MLflow (1.3 s) for --tracking-uri only; --help answers without it

        mlflow.set_tracking_uri(args.tracking_uri)
    try:
        guidance = parse_guidance(args.guidance) if args.guidance is not None else None
        if args.inception_weights is not None and not Path(args.inception_weights).is_file():
            raise UsageError(f"--inception-weights file not found: {args.inception_weights}")
        summary = evaluate_checkpoint(args.checkpoint, args.out, which=args.which, guidance=guidance,
                                      overrides=cli_overrides(args), seed=args.seed, cache_dir=args.cache_dir,
                                      save_samples=args.save_samples, progress=not args.no_progress)
        if args.log_to_run:
            print(f"logged to MLflow run {log_to_run(args.checkpoint, summary)}")
    except (UsageError, CheckpointError, ConfigError, FileNotFoundError) as exc:  # bad input: a message
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"wrote {Path(args.out) / 'metrics.json'}, per_class.csv, samples_w*.png "
          f"({summary['timings']['total_s']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
