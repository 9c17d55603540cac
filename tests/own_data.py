"""A tiny prepared folder of "own" images for the tests: a few classes of distinct coloured shapes, long-tailed.

Written with the library's own writers (``write_split`` + ``write_prepared_meta``, as ``pipelines.prepare_data``
does), so every command reads it exactly as it reads a user's prepared data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pdcbdm.data import head_tail_split
from pdcbdm.data.prepared import write_prepared_meta, write_split

NAMES = ("red square", "green disc", "blue cross", "yellow bar", "white ring", "purple stripes")
COLOURS = ((230, 40, 40), (40, 210, 60), (50, 70, 230), (230, 220, 40), (240, 240, 240), (160, 50, 200))


def _mask(kind: int, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    """The pixels of shape ``kind`` centred at (cy, cx) with radius r on a size x size grid."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = y - cy, x - cx
    dist = np.sqrt(dy ** 2 + dx ** 2)
    shapes = [
        (np.abs(dy) <= r) & (np.abs(dx) <= r),                                    # square
        dist <= r,                                                                # disc
        ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)),  # cross
        (np.abs(dy) <= r / 3) & (np.abs(dx) <= 1.4 * r),                          # bar
        (dist <= r) & (dist >= r / 2),                                            # ring
        (np.abs(dy) <= r) & (np.abs(dx) <= r) & ((x.astype(int) // 2) % 2 == 0),  # stripes
    ]
    return shapes[kind % len(shapes)]


def make_images(labels: np.ndarray, size: int, channels: int, seed: int) -> np.ndarray:
    """uint8 [N, C, size, size]: class k is shape k in colour k (grey: its brightness), jittered in place, size and
    brightness, on a dark noisy background."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(labels), channels, size, size), dtype=np.uint8)
    for i, k in enumerate(labels):
        r = size * rng.uniform(0.22, 0.32)
        cy, cx = rng.uniform(r, size - r, 2)
        mask = _mask(int(k), size, cy, cx, r)
        colour = np.asarray(COLOURS[int(k) % len(COLOURS)], dtype=np.float64) * rng.uniform(0.8, 1.0)
        colour = colour if channels == 3 else np.asarray([colour.mean() + 25 * k])
        image = rng.normal(20, 6, (channels, size, size))
        image[:, mask] = colour[:, None] + rng.normal(0, 8, (channels, int(mask.sum())))
        out[i] = np.clip(image, 0, 255).round().astype(np.uint8)
    return out


def write_own_data(root: str | Path, *, counts: Sequence[int] = (40, 20, 8, 4), heldout: int | Sequence[int] = 10,
                   reference: int | None = None, size: int = 16, channels: int = 3, seed: int = 0) -> Path:
    """Write a prepared folder at ``root``: train with ``counts`` per class, heldout with ``heldout`` per class
    (a number or one per class), and a reference split of ``reference`` per class when given; returns root."""
    root = Path(root)
    k = len(counts)
    names = list(NAMES[:k])
    split = head_tail_split(list(counts), min(0.7, (k - 1) / k))  # both groups non-empty for 2-3 classes too
    held = [heldout] * k if isinstance(heldout, int) else list(heldout)
    parts = {"train": list(counts), "heldout": held}
    if reference is not None:
        parts["reference"] = [reference] * k
    entries = {}
    for i, (name, per_class) in enumerate(parts.items()):
        labels = np.repeat(np.arange(k), per_class)
        images = make_images(labels, size, channels, seed + 100 * i)
        entries[name] = write_split(root, name, images, labels, names, split)
    report = {"kept": {n: e["rows"] for n, e in entries.items()}, "skipped": 0, "class_counts": list(counts),
              "imbalance": max(counts) / min(counts)}
    (root / "_report.json").write_text(json.dumps(report, indent=2))
    write_prepared_meta(root, class_names=names, image_shape=(channels, size, size), splits=entries,
                        transforms={"size": size, "hflip": False}, source={"kind": "tests.own_data", "seed": seed})
    return root
