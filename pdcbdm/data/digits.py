"""Digits-LT: scikit-learn's 8x8 handwritten digits as a small, download-free long-tailed set.

The 1,797 images (pixels 0..16) are scaled to uint8 0..255, one channel, at their native 8x8 or resized (bilinear)
to a larger size: 16x16 by default (DIGITS_SIZE), the size every digits evaluation scores at. A seeded,
balanced held-out split (HELDOUT_PER_CLASS images per class) is the evaluation reference; the rest is the training
pool, made long-tailed with the CIFAR-LT formula (longtail.py) using n_max = the smallest per-class pool size.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DIGITS_SIZE", "DIGITS_NATIVE_SIZE", "HELDOUT_PER_CLASS", "HELDOUT_SEED", "check_digits_size",
           "load_digits_uint8", "digits_pool_and_heldout"]

DIGITS_SIZE = 16
DIGITS_NATIVE_SIZE = 8
HELDOUT_PER_CLASS = 50
# Fixed, independent of the training seed: every run must be judged against the same reference images.
HELDOUT_SEED = 20240531


def _digits_table() -> np.ndarray:
    """scikit-learn's digits file (1,797 rows: 64 pixels 0..16, then the label), read from the installed package
    without importing it: ``sklearn.datasets`` is slow to import (docs/results.md, "Import costs"), and every
    trial's worker reads the digits."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError("the digits data sets need scikit-learn (pip install scikit-learn)")
    table = np.loadtxt(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    if table.shape != (1797, 65):
        raise ValueError(f"scikit-learn's digits.csv.gz has shape {table.shape}, expected (1797, 65)")
    return table


@functools.lru_cache(maxsize=2)
def _digits_cached(size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    table = _digits_table()
    pixels = torch.from_numpy(table[:, :64].reshape(-1, 8, 8)).to(torch.float32)  # [1797, 8, 8], 0..16
    labels = torch.from_numpy(table[:, 64]).to(torch.int64)
    scaled = pixels[:, None] * (255.0 / 16.0)
    if size != DIGITS_NATIVE_SIZE:
        scaled = F.interpolate(scaled, size=(size, size), mode="bilinear", align_corners=False)
    images = scaled.round().clamp(0, 255).to(torch.uint8)
    return images, labels


def check_digits_size(size: int) -> int:
    """``size`` if the digits can be served at it (8, the native size, or a larger multiple of 4: the U-Net
    halves it twice), else ValueError naming the valid sizes."""
    if isinstance(size, bool) or not isinstance(size, int) or size < DIGITS_NATIVE_SIZE or size % 4:
        raise ValueError(f"digits image size must be {DIGITS_NATIVE_SIZE} (native) or a larger multiple of 4 "
                         f"(bilinear upsampling; {DIGITS_SIZE} is the default), got {size!r}")
    return size


def load_digits_uint8(size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All 1,797 digits: images uint8 [N, 1, size, size], labels int64 [N], class names "0".."9"."""
    images, labels = _digits_cached(check_digits_size(size))
    return images.clone(), labels.clone(), [str(k) for k in range(10)]


def digits_pool_and_heldout(per_class: int = HELDOUT_PER_CLASS,
                            seed: int = HELDOUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into `load_digits_uint8`) of the training pool and of the balanced held-out split.

    Args:
        per_class: held-out images per class (every class has at least 174, so up to 173 works).
        seed: seed of the per-class shuffle that picks the held-out images.

    Returns:
        (pool, heldout): sorted int64 tensors, disjoint, together covering all 1,797 images.
    """
    _, labels = _digits_cached()
    smallest = int(torch.bincount(labels).min())
    if isinstance(per_class, bool) or not isinstance(per_class, int) or not 0 < per_class < smallest:
        raise ValueError(f"per_class must be an int in [1, {smallest - 1}] (the smallest class has {smallest} "
                         f"images), got {per_class!r}")
    generator = torch.Generator().manual_seed(int(seed))
    heldout = []
    for k in range(10):
        members = (labels == k).nonzero().flatten()
        heldout.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
    held = torch.cat(heldout).sort().values
    in_pool = torch.ones(labels.numel(), dtype=torch.bool)
    in_pool[held] = False
    return in_pool.nonzero().flatten(), held
