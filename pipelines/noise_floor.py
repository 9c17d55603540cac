"""Measure the real-vs-real noise floor of every evaluation metric at a preset's evaluation size.

    python -m pipelines.noise_floor                                  # digits preset: 200 samples, proxy 100
    python -m pipelines.noise_floor --seeds 10 --num-samples 500 --out floor500.json
    python -m pipelines.noise_floor --preset cifar10-lt --set data.root=/data/cifar --seeds 3
    python -m pipelines.noise_floor --preset own32 --set data.root=PREPARED      # your own data's held-out images

For `--seeds` independent draws of real images outside the reference (`pdcbdm.data.build_floor_dataset`: the
digits training pool, the CIFAR test split, or a prepared set's held-out images outside its reference; a class with
too few of them has no per-class floor and is named), each with the generated set's per-class counts (labels uniform
over classes, as the evaluation samples them), every metric is computed against the reference exactly as a
generated set is (pdcbdm.metrics.floor), with the evaluation's head/tail split (`eval.split_ratio` over the
training set's class counts). It prints one row per metric (mean, standard deviation, min and max over the draws),
the proxy scores' floor at `eval.proxy_samples`, the class judge's thresholds and its reject rate on synthetic
noise and blank images, and writes all of it as JSON (`--out`). Draws are cached like the evaluation's floors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from pdcbdm.config import ConfigError, apply_overrides
from pdcbdm.io import write_json_atomic
from pdcbdm.presets import preset

__all__ = ["build_parser", "main", "TABLE_METRICS", "synthetic_images"]

TABLE_METRICS = ("fid", "fid_head", "fid_tail", "kid", "kid_head", "kid_tail", "precision", "recall", "f8", "f1_8",
                 "is_mean", "consistency_mean", "consistency_head", "consistency_tail", "reject_rate",
                 "reject_rate_head", "reject_rate_tail", "tail_to_head_confusion")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every option explains itself in --help."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.noise_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits",
                        help="config preset whose data set, extractor and evaluation sizes are used (default digits)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (repeatable), e.g. --set eval.split_ratio=0.6")
    parser.add_argument("--seeds", type=int, default=5,
                        help="independent real draws per size (default 5; the evaluation itself averages 3)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="size of the full evaluation (default: the preset's eval.num_samples)")
    parser.add_argument("--proxy-samples", type=int, default=None,
                        help="size of the search's proxy evaluation (default: the preset's eval.proxy_samples)")
    parser.add_argument("--cache-dir", default=None, metavar="D",
                        help="cache folder for the feature network, reference features, judge and floors "
                             "(default: $PDCBDM_CACHE or ~/.cache/pdcbdm)")
    parser.add_argument("--device", default="cpu", help="torch device of the feature network (default cpu)")
    parser.add_argument("--out", default="noise_floor.json", help="JSON file written (default noise_floor.json)")
    parser.add_argument("--no-progress", action="store_true", help="hide feature-extraction progress bars")
    return parser


def synthetic_images(n: int, shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """Unreadable uint8 images the judge must reject: Gaussian noise (mean 128, std 60, clipped), uniform noise,
    all-black, all-white and mid-grey."""
    import torch  # deferred: torch (1.7 s); --help and the checks of bad input answer without it

    g = torch.Generator().manual_seed(seed)
    size = (n, *shape)
    return {
        "gaussian noise": (torch.randn(size, generator=g) * 60 + 128).round().clamp(0, 255).to(torch.uint8),
        "uniform noise": torch.randint(0, 256, size, generator=g, dtype=torch.int64).to(torch.uint8),
        "black": torch.zeros(size, dtype=torch.uint8),
        "white": torch.full(size, 255, dtype=torch.uint8),
        "grey": torch.full(size, 128, dtype=torch.uint8),
    }


def _judge_on_synthetic(evaluator: Any, n: int) -> dict[str, dict[str, float | None]]:
    """Reject rate, plain-argmax class-4 share and tail-to-head confusion of each synthetic image kind."""
    import torch  # deferred: torch (1.7 s); --help and the checks of bad input answer without it

    out = {}
    labels = torch.arange(n) % evaluator.num_classes
    for name, images in synthetic_images(n, evaluator.score_shape or evaluator.image_shape).items():
        metrics, _ = evaluator.score(images, labels)
        feats = evaluator.features(images, labels)
        argmax = feats.logits.argmax(1) if feats.logits is not None else None
        top = None if argmax is None else float(np.bincount(argmax, minlength=evaluator.num_classes).max() / n)
        out[name] = {"reject_rate": metrics.get("reject_rate"),
                     "tail_to_head_confusion": metrics.get("tail_to_head_confusion"),
                     "argmax_top_class_share": top}
    return out


def _stats(draws: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    values = [float(d[key]) for d in draws if isinstance(d.get(key), (int, float)) and np.isfinite(d[key])]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "min": float(np.min(values)), "max": float(np.max(values)), "n": len(values)}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _print_table(title: str, rows: dict[str, dict[str, float | None]]) -> None:
    print(f"\n{title}")
    print(f"{'metric':<24}{'mean':>12}{'std':>12}{'min':>12}{'max':>12}")
    for name, s in rows.items():
        print(f"{name:<24}{_fmt(s['mean']):>12}{_fmt(s['std']):>12}{_fmt(s['min']):>12}{_fmt(s['max']):>12}")


def _resolve(args: argparse.Namespace) -> tuple[Any, int, int]:
    try:
        cfg = apply_overrides(preset(args.preset), args.set)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    n = args.num_samples or cfg.eval.num_samples
    proxy = args.proxy_samples or cfg.eval.proxy_samples
    if args.seeds < 1 or n < 2 or proxy < 2:
        raise SystemExit(f"error: --seeds must be >= 1 and the sizes >= 2, got {args.seeds}, {n}, {proxy}")
    return cfg, n, proxy


def _measure(cfg: Any, args: argparse.Namespace, n: int, proxy_n: int) -> dict[str, Any]:
    """Build the evaluator and score the real draws at both sizes and the synthetic images."""
    # deferred: torch (1.7 s); --help and the checks of bad input answer without it
    from pdcbdm.evaluation import Evaluator, evaluation_split
    from pdcbdm.metrics.floor import noise_floor_draws, proxy_noise_floor_draws, short_classes
    from pdcbdm.sampling import uniform_labels
    from pdcbdm.train import load_data

    try:
        counts = load_data(cfg).counts()
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    split = evaluation_split(cfg, counts)
    evaluator = Evaluator.build(cfg, num_classes=len(counts), head=split.head, tail=split.tail, device=args.device,
                                cache_dir=args.cache_dir, progress=not args.no_progress, train_counts=counts)
    if evaluator.floor_pool is None:
        raise SystemExit(f"error: {evaluator.floor_note}")
    evaluator.floor_seeds = args.seeds
    k = len(counts)
    per_class = {size: np.bincount(uniform_labels(size, k).numpy(), minlength=k) for size in (n, proxy_n)}
    common = {"seeds": args.seeds, "cache_dir": args.cache_dir}
    full = noise_floor_draws(evaluator.floor_pool, evaluator.reference, per_class[n], head_classes=split.head,
                             tail_classes=split.tail, num_classes=k, judge=evaluator.judge, **common)
    proxy = proxy_noise_floor_draws(evaluator.floor_pool, evaluator.reference, per_class[proxy_n],
                                    tail_classes=split.tail, **common)
    return {
        "preset": args.preset, "overrides": args.set, "dataset": cfg.data.dataset, "seeds": args.seeds,
        "reference_kind": evaluator.reference_kind,
        "short_classes": {str(size): short_classes(evaluator.floor_pool, per_class[size]) for size in (n, proxy_n)},
        "extractor": evaluator.extractor.identity, "head": list(split.head), "tail": list(split.tail),
        "num_samples": n, "proxy_samples": proxy_n,
        "floor": {key: _stats(full, key) for key in TABLE_METRICS},
        "proxy_floor": {key: _stats(proxy, key) for key in ("proxy_fid", "proxy_fid_tail")},
        "per_class_floor": {f"{key}_class_{c}": _stats(full, f"{key}_class_{c}")
                            for c in range(k) for key in ("fid", "kid", "consistency", "reject_rate")},
        "judge": evaluator.judge.summary() if evaluator.judge is not None else None,
        "synthetic": _judge_on_synthetic(evaluator, n), "per_draw": full, "proxy_per_draw": proxy,
    }


def _report(result: dict[str, Any]) -> None:
    """Print the tables of a `_measure` result."""
    print(f"data set {result['dataset']}, extractor {result['extractor'][:40]}, head {tuple(result['head'])}, "
          f"tail {tuple(result['tail'])}, {result['seeds']} real draws per size")
    for size, short in result["short_classes"].items():
        if short:
            print(f"N = {size}: no per-class floor for class(es) {short} (fewer floor images than samples)")
    _print_table(f"full evaluation, N = {result['num_samples']}", result["floor"])
    _print_table(f"proxy, N = {result['proxy_samples']}", result["proxy_floor"])
    _print_table("per class (full evaluation)", result["per_class_floor"])
    judge = result["judge"]
    if judge is not None:
        print(f"\njudge: max softmax >= {judge['judge_min_confidence']:.3f} and scaled centroid distance <= "
              f"{judge['judge_max_distance']:.2f}; keeps {judge['judge_kept']:.3f} of "
              f"{judge['judge_calibration_n']} real held-out images")
    print(f"\n{'synthetic images':<24}{'reject':>10}{'t2h conf':>10}{'argmax top':>12}")
    for name, row in result["synthetic"].items():
        print(f"{name:<24}{_fmt(row['reject_rate']):>10}{_fmt(row['tail_to_head_confusion']):>10}"
              f"{_fmt(row['argmax_top_class_share']):>12}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (None: sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    cfg, n, proxy_n = _resolve(args)
    result = _measure(cfg, args, n, proxy_n)
    _report(result)
    write_json_atomic(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
