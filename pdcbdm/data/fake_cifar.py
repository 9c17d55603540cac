"""Fake CIFAR-10/100 files in torchvision's pickle layout, read by the real CIFAR reader (``pdcbdm.data.cifar``).

The tests use them instead of the real data, and ``python -m pipelines.gpu_check`` writes them at the real size
(5,000 training and 1,000 test images per CIFAR-10 class) on machines without internet. Images are a class colour,
a horizontal ramp (so flips are visible) and a little noise; labels are shuffled across the batch files as in the
real data. The same seed writes the same bytes.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

__all__ = ["CIFAR10_NAMES", "write_fake_cifar10", "write_fake_cifar100"]

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 3072] images: per-class colour, a horizontal ramp and noise."""
    colours = np.random.default_rng(12345).integers(30, 200, size=(int(labels.max(initial=0)) + 1, 3, 1, 1))
    ramp = np.linspace(0, 40, 32)[None, None, None, :]
    noise = rng.integers(0, 16, size=(labels.size, 3, 32, 32))
    images = colours[labels] + ramp + noise
    return np.clip(images, 0, 255).astype(np.uint8).reshape(labels.size, 3072)


def _labels(num_classes: int, per_class: int | list[int], rng: np.random.Generator) -> np.ndarray:
    """Each class's label ``per_class`` times (an int, or one count per class), in a seeded random order."""
    sizes = [per_class] * num_classes if isinstance(per_class, int) else list(per_class)
    if len(sizes) != num_classes or min(sizes) < 0:
        raise ValueError(f"per_class must be a count >= 0 or {num_classes} of them, got {per_class!r}")
    labels = np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(sizes)])
    return labels[rng.permutation(labels.size)]


def _dump(path: Path, obj: dict) -> None:
    # protocol 2, as the Python 2 originals: the reader's restricted unpickler must take it
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar10(root: str | Path, train_per_class: int | list[int] = 20, test_per_class: int = 5,
                       seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; returns the folder.

    Args:
        root: parent folder (created).
        train_per_class: training images per class (an int, or one count per class); 5000 is the real size.
        test_per_class: test images per class (1000 in the real data).
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
    _dump(folder / "batches.meta", {b"num_cases_per_batch": int(labels.size // 5),
                                    b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    return folder


def write_fake_cifar100(root: str | Path, train_per_class: int | list[int] = 6, test_per_class: int = 2,
                        seed: int = 0) -> Path:
    """Write root/cifar-100-python/{train, test, meta}; returns the folder. Arguments as write_fake_cifar10 (the
    real sizes: 500 training and 100 test images per class)."""
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
