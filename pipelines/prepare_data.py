"""Prepare a data set: a built-in one as Parquet shards, or a user's own images as a prepared folder.

    python -m pipelines.prepare_data --dataset cifar10-lt --root ~/data --imbalance 100 --out data/c10lt
    python -m pipelines.prepare_data --from-folder DIR --size 64 --out data/mine
    python -m pipelines.prepare_data --from-table FILE --image-root DIR [--path-column C]
        [--label-column C | --label-columns A,B,...] --size 64 --out data/mine

--dataset: Idempotent: re-running with the same arguments leaves the files untouched; different arguments into a
folder that already holds a data set stop with an error unless --overwrite. _meta.json is written last and marks
completion. Read the result back with `pdcbdm.data.ParquetImageDataset(out)` (decoded tensors), or as a table with
`pandas.read_parquet(out)` / `pyarrow.dataset.dataset(out)` (the side files _meta.json and _counts.parquet start
with an underscore, which Parquet dataset discovery skips).

--from-folder / --from-table: a folder with one subfolder per class (or the `datasets` library's metadata.csv /
metadata.jsonl), or a table of path and label (CSV, TSV, Parquet, JSON lines, whitespace-separated text; one label
column or one 0/1 column per class), decoded once into D/train, D/heldout (real images held out per class),
optionally D/reference, with D/_report.json, D/_skipped.csv and D/_meta.json last (`pdcbdm.data.prepared`).
Unusable files are skipped and listed; more than --max-bad of them, a class losing every image, a single class or
a 16-bit image without --high-bit-depth stop with exit status 2 and nothing written. Same arguments and unchanged
inputs: "up to date", nothing rewritten. --dry-run prints the report and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdcbdm.data import (DATASET_NAMES, DEFAULT_IMBALANCE, SPLIT_MODES, HeadTailSplit, ImageDataset,
                         WriteReport, build_dataset, head_tail_split, resolve_imbalance, write_parquet)
from pdcbdm.data.digits import HELDOUT_SEED
from pdcbdm.data.ingest import BACKGROUNDS, CHANNELS, CROPS, HIGH_BIT_DEPTH, DecodeOptions, list_folder, list_source
from pdcbdm.data.prep_report import (REPORT_FILE, HeldoutRule, PrepareError, build_prepared, check_target,
                                     format_report, write_prepared)

DEFAULT_SHARD_ROWS = 10_000
# own-data options: None marks "not given", so that they can be refused with --dataset
OWN_DEFAULTS: dict[str, Any] = {"crop": "center", "channels": "auto", "alpha_background": "white",
                                "high_bit_depth": "refuse", "heldout_frac": 0.1, "heldout_max": 200,
                                "heldout_min_train": 20, "max_bad": "1%"}
OWN_ONLY = ("image_root", "path_column", "label_column", "label_columns", "size", "reference_folder", *OWN_DEFAULTS)
BUILTIN_ONLY = ("root", "imbalance")


def _defaults_text() -> str:
    return ", ".join(f"{rho:g} for {name}" for name, rho in DEFAULT_IMBALANCE.items())


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=DATASET_NAMES,
                        help="built-in data set to prepare: digits-lt/digits (scikit-learn digits, 16x16, no "
                             "download), cifar10-lt/cifar100-lt (long-tailed train split), cifar10/cifar100")
    source.add_argument("--from-folder", metavar="DIR",
                        help="your images: one subfolder per class (nested files allowed; classes sorted as "
                             "strings), or a folder with the datasets library's metadata.csv/metadata.jsonl")
    source.add_argument("--from-table", metavar="FILE",
                        help="your images listed in a table of path and label: .csv, .tsv, .parquet, .jsonl, or "
                             "whitespace-separated text (path label per line)")
    parser.add_argument("--image-root", metavar="DIR",
                        help="--from-table: folder the table's paths are relative to (default: the table's folder)")
    parser.add_argument("--path-column", metavar="C",
                        help="--from-table: the column of file paths (default: file_name, path, image, ...)")
    parser.add_argument("--label-column", metavar="C", help="--from-table: the column of class labels (default "
                        "label; without one, every other column holding only 0/1 is read as one-hot)")
    parser.add_argument("--label-columns", metavar="A,B,...",
                        help="--from-table: one-hot table, one 0/1 column per class (ISIC's ground truth)")


def _add_own_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, help="own data (required): output size S, a multiple of 4 from 8")
    parser.add_argument("--crop", choices=CROPS, help="own data: center (crop to a square, default), pad (to a "
                        "square, in --alpha-background), none (stretch); then an antialiased bicubic resize")
    parser.add_argument("--channels", choices=CHANNELS,
                        help="own data: auto (1 if every image is grey, else 3 with grey replicated; default), 1, 3")
    parser.add_argument("--alpha-background", choices=tuple(BACKGROUNDS),
                        help="own data: colour transparency is composited on (default white)")
    parser.add_argument("--high-bit-depth", choices=HIGH_BIT_DEPTH, help="own data: 16-bit or float images are "
                        "refused (default), or scaled per image from its minimum to its maximum (minmax)")
    parser.add_argument("--heldout-frac", type=float, help="own data: per class, floor(frac n_k) images held out "
                        f"for the floors and the judge (default {OWN_DEFAULTS['heldout_frac']})")
    parser.add_argument("--heldout-max", type=int, help="own data: at most this many held out per class "
                        f"(default {OWN_DEFAULTS['heldout_max']})")
    parser.add_argument("--heldout-min-train", type=int, help="own data: a class keeps all its images when holding "
                        f"out would leave fewer than this to train on (default {OWN_DEFAULTS['heldout_min_train']})")
    parser.add_argument("--reference-folder", metavar="DIR", help="own data: a folder of class subfolders written "
                        "as the reference split (its classes must be training classes)")
    parser.add_argument("--max-bad", help="own data: stop (exit 2) when more than this share of the files is "
                        "unusable: a fraction (0.01) or a percentage (1%%, the default)")
    parser.add_argument("--dry-run", action="store_true", help="own data: print the report, write nothing")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; every option says what it does."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.prepare_data", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_source_options(parser)
    parser.add_argument("--root", default=None,
                        help="--dataset CIFAR only: folder holding cifar-10-batches-py/ or cifar-100-python/ "
                             "(torchvision's layout), or receiving them with --download; ignored for digits")
    parser.add_argument("--imbalance", type=float, default=None,
                        help="--dataset: imbalance factor rho >= 1 of the -lt data sets, n_k = int(n_max "
                             f"rho^(-k/(K-1))); default {_defaults_text()}; balanced names accept only 1; ignored "
                             "for --split test")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="--dataset: train (long-tailed for -lt names) or test (always balanced; digits: the "
                             "held-out 50 images per class used as the FID reference)")
    parser.add_argument("--seed", type=int, default=0,
                        help="--dataset: seed of the per-class shuffle that picks the long-tailed subset, and of "
                             "the class shuffle of the head/tail split on balanced data (default 0); own data's "
                             f"held-out split always uses the fixed seed {HELDOUT_SEED}")
    parser.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS,
                        help=f"images per Parquet shard file (default {DEFAULT_SHARD_ROWS})")
    parser.add_argument("--head-ratio", type=float, default=0.7,
                        help="ratio r in (0,1) of the head/tail split recorded in _counts.parquet and the report "
                             "(default 0.7, the paper's 7:3 and eval.split_ratio's default)")
    parser.add_argument("--head-mode", choices=SPLIT_MODES, default="classes",
                        help="--dataset: classes: head = first ceil(r K) classes by frequency; samples: head = "
                             "fewest classes holding >= r of the images (default classes)")
    parser.add_argument("--download", action="store_true",
                        help="--dataset CIFAR only: fetch the archive into --root with torchvision if missing")
    _add_own_options(parser)
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


def _prepare_builtin(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--dataset: build the data set, write it to --out and print a summary."""
    given = [f"--{name.replace('_', '-')}" for name in OWN_ONLY if getattr(args, name) is not None]
    if given or args.dry_run:
        parser.exit(2, f"prepare_data: error: {', '.join(given) or '--dry-run'} applies to --from-folder/"
                       f"--from-table only\n")
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


def parse_max_bad(text: str) -> float:
    """--max-bad as a fraction in [0, 1]: "0.01" or "1%"."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--max-bad must be a fraction in [0, 1] or a percentage like 1%, got {text!r}")
    return value


def _own_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Every own-data argument that shapes the prepared data, defaults filled in (stored in _meta.json)."""
    values = {name: getattr(args, name) if getattr(args, name) is not None else default
              for name, default in OWN_DEFAULTS.items()}
    values["max_bad"] = parse_max_bad(str(values["max_bad"]))
    columns = [c.strip() for c in args.label_columns.split(",") if c.strip()] if args.label_columns else None
    return {**values, "size": args.size, "path_column": args.path_column, "label_column": args.label_column,
            "label_columns": columns, "head_ratio": args.head_ratio, "shard_rows": args.shard_rows,
            "heldout_seed": HELDOUT_SEED, "resample": "bicubic, antialiased", "exif_orientation": True}


def _input_roots(args: argparse.Namespace) -> list[Path]:
    table_root = (Path(args.image_root) if args.image_root else Path(args.from_table).parent) if args.from_table \
        else None
    roots = [Path(args.from_folder) if args.from_folder else table_root, args.reference_folder]
    return [Path(r).resolve() for r in roots if r is not None]


def _check_out(args: argparse.Namespace) -> None:
    """--out may not lie inside an input folder (it would be read as a class) nor contain one."""
    out = Path(args.out).resolve()
    for root in _input_roots(args):
        if out == root or root in out.parents or out in root.parents:
            raise PrepareError(f"--out {args.out} overlaps the input folder {root}; write it elsewhere")


def _prepare_own(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--from-folder / --from-table: list, decode, check, report and write (unless up to date or --dry-run)."""
    given = [f"--{name}" for name in BUILTIN_ONLY if getattr(args, name) is not None]
    if given or args.download or args.size is None:
        what = "--size is required" if args.size is None else f"{', '.join(given or ['--download'])} applies to " \
                                                                "--dataset only"
        parser.exit(2, f"prepare_data: error: {what} with --from-folder/--from-table\n")
    try:
        arguments = _own_arguments(args)
        options = DecodeOptions(size=args.size, crop=arguments["crop"], channels=arguments["channels"],
                                alpha_background=arguments["alpha_background"],
                                high_bit_depth=arguments["high_bit_depth"])
        rule = HeldoutRule(arguments["heldout_frac"], arguments["heldout_max"], arguments["heldout_min_train"])
        _check_out(args)
        listing = list_source(folder=args.from_folder, table=args.from_table, image_root=args.image_root,
                              path_column=args.path_column, label_column=args.label_column,
                              label_columns=arguments["label_columns"])
        reference = list_folder(args.reference_folder) if args.reference_folder else None
        source = {"kind": "folder" if args.from_folder else "table", "inputs": [str(r) for r in _input_roots(args)],
                  "table": str(Path(args.from_table).resolve()) if args.from_table else None,
                  "input_files_fingerprint": listing.fingerprint, "arguments": arguments,
                  "reference_files_fingerprint": reference.fingerprint if reference else None}
        if not args.dry_run and check_target(args.out, source, args.overwrite):
            print(format_report(json.loads((Path(args.out) / REPORT_FILE).read_text())))
            print(f"{args.out}: up to date (same arguments and input files), nothing written")
            return 0
        data = build_prepared(listing, options, rule=rule, head_ratio=args.head_ratio,
                              max_bad=arguments["max_bad"], reference=reference)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"prepare_data: error: {exc}\n")
    print(format_report(data.report))
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    transforms = {**arguments, "channels_out": int(data.splits["train"][0].shape[1])}
    write_prepared(data, args.out, transforms=transforms, source=source, shard_rows=args.shard_rows)
    print(f"wrote {args.out} (train, heldout{', reference' if reference else ''}; _meta.json last)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare a built-in data set (--dataset) or the user's own images (--from-folder/--from-table). Returns the
    exit status; bad input exits with status 2 and a message naming the file or flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset is not None:
        return _prepare_builtin(parser, args)
    return _prepare_own(parser, args)


if __name__ == "__main__":
    sys.exit(main())
