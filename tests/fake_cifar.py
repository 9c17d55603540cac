"""Writes fake CIFAR-10/100 files in torchvision's pickle layout, so the real CIFAR reader runs in tests.

Images are a class colour plus a little noise (cheap to make, small as PNG), labels are shuffled across batch files
as in the real data. Usable by hand too:

    python -m tests.fake_cifar --variant cifar10 --train-per-class 5000 --test-per-class 1000 /tmp/fakecifar
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 3072] images: per-class colour, a horizontal ramp (so flips are visible) and noise."""
    colours = np.random.default_rng(12345).integers(30, 200, size=(int(labels.max()) + 1, 3, 1, 1))
    ramp = np.linspace(0, 40, 32)[None, None, None, :]
    noise = rng.integers(0, 16, size=(labels.size, 3, 32, 32))
    images = colours[labels] + ramp + noise
    return np.clip(images, 0, 255).astype(np.uint8).reshape(labels.size, 3072)


def _labels(num_classes: int, per_class: int | list[int], rng: np.random.Generator) -> np.ndarray:
    sizes = [per_class] * num_classes if isinstance(per_class, int) else list(per_class)
    labels = np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(sizes)])
    return labels[rng.permutation(labels.size)]


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar10(root: str | Path, train_per_class: int | list[int] = 20, test_per_class: int = 5,
                       seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; returns the folder.

    Args:
        root: parent folder (created).
        train_per_class: training images per class (an int, or one count per class).
        test_per_class: test images per class.
        seed: seed of images and label order.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    labels = _labels(10, train_per_class, rng)
    for i, part in enumerate(np.array_split(np.arange(labels.size), 5), start=1):
        _dump(folder / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(),
                                            b"labels": labels[part].tolist(), b"data": _images(labels[part], rng),
                                            b"filenames": [f"img_{j}.png".encode() for j in part]})
    test = _labels(10, test_per_class, rng)
    _dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test.tolist(),
                                  b"data": _images(test, rng), b"filenames": [b"t.png"] * test.size})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump(folder / "batches.meta", {b"num_cases_per_batch": int(labels.size // 5), b"label_names": names,
                                    b"num_vis": 3072})
    return folder


def write_fake_cifar100(root: str | Path, train_per_class: int | list[int] = 6, test_per_class: int = 2,
                        seed: int = 0) -> Path:
    """Write root/cifar-100-python/{train, test, meta}; returns the folder. Arguments as write_fake_cifar10."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = _labels(100, per_class, rng)
        _dump(folder / name, {b"filenames": [b"x.png"] * fine.size, b"batch_label": name.encode(),
                              b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                              b"data": _images(fine, rng)})
    _dump(folder / "meta", {b"fine_label_names": [f"fine_{k:02d}".encode() for k in range(100)],
                            b"coarse_label_names": [f"coarse_{k:02d}".encode() for k in range(20)]})
    return folder


def main(argv: list[str] | None = None) -> None:
    """Command line: write a fake CIFAR folder."""
    parser = argparse.ArgumentParser(description="Write fake CIFAR files in torchvision's layout.")
    parser.add_argument("root", help="parent folder to write cifar-10-batches-py/ or cifar-100-python/ into")
    parser.add_argument("--variant", choices=("cifar10", "cifar100"), default="cifar10", help="which CIFAR")
    parser.add_argument("--train-per-class", type=int, default=20, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=5, help="test images per class")
    parser.add_argument("--seed", type=int, default=0, help="seed of images and label order")
    args = parser.parse_args(argv)
    write = write_fake_cifar10 if args.variant == "cifar10" else write_fake_cifar100
    print(write(args.root, args.train_per_class, args.test_per_class, args.seed))


if __name__ == "__main__":
    main()
