"""Prepare a data set as Parquet shards (PNG images), a per-class counts table and _meta.json.

    python -m pipelines.prepare_data --dataset cifar10-lt --root ~/data --imbalance 100 --out data/c10lt

Idempotent: re-running with the same arguments leaves the files untouched; different arguments into a folder that
already holds a data set stop with an error unless --overwrite. _meta.json is written last and marks completion.
Read the result back with `pdcbdm.data.ParquetImageDataset(out)` (decoded tensors), or as a table with
`pandas.read_parquet(out)` / `pyarrow.dataset.dataset(out)` (the side files _meta.json and _counts.parquet start
with an underscore, which Parquet dataset discovery skips).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pdcbdm.data import (DATASET_NAMES, DEFAULT_IMBALANCE, SPLIT_MODES, HeadTailSplit, ImageDataset,
                         WriteReport, build_dataset, head_tail_split, resolve_imbalance, write_parquet)

DEFAULT_SHARD_ROWS = 10_000


def _defaults_text() -> str:
    return ", ".join(f"{rho:g} for {name}" for name, rho in DEFAULT_IMBALANCE.items())


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; every option says what it does."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.prepare_data", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES,
                        help="data set to prepare: digits-lt/digits (scikit-learn digits, 16x16, no download), "
                             "cifar10-lt/cifar100-lt (long-tailed train split), cifar10/cifar100 (balanced)")
    parser.add_argument("--root", default=None,
                        help="CIFAR only: folder holding cifar-10-batches-py/ or cifar-100-python/ (torchvision's "
                             "layout), or receiving them with --download; ignored for digits")
    parser.add_argument("--imbalance", type=float, default=None,
                        help="imbalance factor rho >= 1 of the -lt data sets, n_k = int(n_max rho^(-k/(K-1))); "
                             f"default {_defaults_text()}; balanced names accept only 1; ignored for --split test")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="train (long-tailed for -lt names) or test (always balanced; digits: the held-out "
                             "50 images per class used as the FID reference)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the per-class shuffle that picks the long-tailed subset, and of the class "
                             "shuffle of the head/tail split on balanced data (default 0)")
    parser.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS,
                        help=f"images per Parquet shard file (default {DEFAULT_SHARD_ROWS})")
    parser.add_argument("--head-ratio", type=float, default=0.7,
                        help="ratio r in (0,1) of the head/tail split recorded in _counts.parquet (default 0.7, "
                             "the paper's 7:3)")
    parser.add_argument("--head-mode", choices=SPLIT_MODES, default="classes",
                        help="classes: head = first ceil(r K) classes by frequency; samples: head = fewest "
                             "classes holding >= r of the images (default classes)")
    parser.add_argument("--download", action="store_true",
                        help="CIFAR only: fetch the archive into --root with torchvision if the files are missing")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output folder that holds a data set made with other arguments "
                             "(only this tool's files are deleted)")
    return parser


def _params(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments that define the stored data (root and download only say where it came from)."""
    rho = resolve_imbalance(args.dataset, args.imbalance) if args.split == "train" else None
    return {"split": args.split, "imbalance": rho, "seed": args.seed, "shard_rows": args.shard_rows,
            "head_ratio": args.head_ratio, "head_mode": args.head_mode}


def _summary(args: argparse.Namespace, data: ImageDataset, split: HeadTailSplit, report: WriteReport) -> str:
    counts, names = data.counts(), data.class_names
    action = f"wrote {len(report.written)} file(s)" if report.written else "already up to date, nothing written"
    lines = [f"{args.dataset} {args.split}: {len(data)} rows, image shape {data.image_shape}, "
             f"{data.num_classes} classes -> {args.out} ({action})"]
    if data.num_classes <= 20:
        lines += [f"  {k:>3} {names[k]:<12} {counts[k]:>6}  {split.group_of(k)}" for k in range(data.num_classes)]
    else:
        lines.append(f"  per-class counts: {counts}")
    for group, classes in (("head", split.head), ("tail", split.tail)):
        lines.append(f"  {group}: {len(classes)} classes, {sum(counts[k] for k in classes)} images")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the data set, write it to --out and print a summary. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = _params(args)
        data = build_dataset(args.dataset, root=args.root, imbalance=args.imbalance, split=args.split,
                             seed=args.seed, download=args.download)
        split = head_tail_split(data.counts(), args.head_ratio, mode=args.head_mode, seed=args.seed)
        report = write_parquet(data, args.out, shard_rows=args.shard_rows,
                               meta={"dataset": args.dataset, "params": params}, head_tail=split,
                               overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"prepare_data: error: {exc}\n")
    print(_summary(args, data, split, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
