"""Example data for ``prepare_data --from-folder``: Debian's Fashion-MNIST made long-tailed, as a PNG folder.

    sudo apt-get install -y dataset-fashion-mnist
    python -m pipelines.fashion_mnist_folder --out DIR [--imbalance 100] [--seed 0]
    python -m pipelines.prepare_data --from-folder DIR --size 32 --out data/fmnist-lt

The 70,000 28x28 grey images (train and test files together, 7,000 per class) are cut to
n_k = int(7000 rho^(-k/(K-1))) images of class k (class 0, T-shirt/top, the head; ``pdcbdm.data.longtail_counts``)
by a seeded per-class shuffle, and written as DIR/<class name>/<n>.png, n the image's index in the 70,000
(train first). The folder appears complete or not at all: it is filled under a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pdcbdm.data import longtail_counts, longtail_indices

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
APT_COMMAND = "sudo apt-get install -y dataset-fashion-mnist"
FILES = {"images": ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"),
         "labels": ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# the data set's label order; "/" cannot be in a folder name
CLASS_NAMES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle_boot")


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (MNIST's format: two zero bytes, type 0x08 = uint8, the number of dimensions, each
    dimension as a big-endian uint32, then the data) as a uint8 array."""
    data = gzip.decompress(path.read_bytes())
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {values.size} values, its header says {shape}")
    return values.reshape(shape)


def load_fashion_mnist(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 images uint8 [N, 28, 28] and labels int64 [N], train first; FileNotFoundError naming the apt
    command when the files are missing."""
    missing = [name for names in FILES.values() for name in names if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found in {source} (missing {', '.join(missing)}); install "
                                f"Debian's package with `{APT_COMMAND}` or pass --source DIR")
    images = np.concatenate([read_idx(source / name) for name in FILES["images"]])
    labels = np.concatenate([read_idx(source / name) for name in FILES["labels"]]).astype(np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{source}: unexpected shapes {images.shape} / {labels.shape}")
    return images, labels


def write_folder(images: np.ndarray, labels: np.ndarray, keep: np.ndarray, out: Path) -> None:
    """PNG files of the kept images under out/<class>/<index>.png, filled in a temporary sibling folder and renamed
    to ``out`` at the end."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in CLASS_NAMES:
            (tmp / name).mkdir()
        for i in keep.tolist():
            Image.fromarray(images[i]).save(tmp / CLASS_NAMES[labels[i]] / f"{i}.png")
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.fashion_mnist_folder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    parser.add_argument("--imbalance", type=float, default=100.0,
                        help="imbalance factor rho = n_max / n_min (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class shuffle (default 0)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help=f"folder of the four idx-ubyte.gz files (default {DEFAULT_SOURCE}, where "
                             f"dataset-fashion-mnist installs them)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write the long-tailed folder and print its per-class counts; exit status 2 for bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"--out {out} exists and is not an empty folder; choose a new one")
        if out.is_dir():
            out.rmdir()  # empty: replaced by the renamed temporary folder
        images, labels = load_fashion_mnist(args.source)
        counts = longtail_counts(int(np.bincount(labels).max()), len(CLASS_NAMES), args.imbalance)
        keep = longtail_indices(torch.from_numpy(labels), counts, args.seed).numpy()
        write_folder(images, labels, keep, out)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"fashion_mnist_folder: error: {exc}\n")
    print(f"wrote {len(keep)} images to {out} (rho {args.imbalance:g}, seed {args.seed}):")
    for name, n in zip(CLASS_NAMES, counts):
        print(f"  {name:<12} {n:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
