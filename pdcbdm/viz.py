"""Pictures of results: sample grids (a row per class) and loss curves, written atomically as PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from PIL import Image
from torch import Tensor

from pdcbdm.io import atomic_write


def image_grid(images: Tensor, nrow: int, pad: int = 1) -> Tensor:
    """Tile uint8 images [N, C, H, W] into one uint8 image [C, H', W'] with ``nrow`` images per row."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = images[i]
    return grid


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int, scale: int = 1) -> Path:
    """Save uint8 images [N, C, H, W] as a PNG grid (``scale`` enlarges small images with nearest neighbours)."""
    grid = image_grid(images, nrow)
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def class_rows(labels_per_row: int, num_classes: int) -> Tensor:
    """Labels for a grid with one row per class: [0]*n, [1]*n, ..."""
    return torch.arange(num_classes).repeat_interleave(labels_per_row)


def save_curves(history: Sequence[Mapping[str, float]], keys: Sequence[str], path: str | os.PathLike,
                x_key: str = "step", title: str = "") -> Path:
    """Plot ``keys`` of a list of records against ``x_key`` into a PNG (one panel per key)."""
    # pyplot is slow to import (docs/results.md, "Import costs") and every Ray trial's worker imports this module
    # for its sample grids: only the runs that draw a plot pay for it
    import matplotlib  # deferred: import cost (above)

    matplotlib.use("Agg")  # no display: the backend is chosen before pyplot loads
    import matplotlib.pyplot as plt  # deferred: import cost (above)

    keys = [k for k in keys if any(k in r for r in history)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r[x_key], r[key]) for r in history if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_xlabel(x_key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def save_labelled_rows(rows: Sequence[tuple[str, Sequence[Tensor]]], path: str | os.PathLike,
                       title: str = "") -> Path:
    """One row of uint8 images [C, H, W] per (label, images) pair, the label written left of its row, as a PNG
    (nearest-neighbour pixels: small images stay sharp). Rows may hold different numbers of images."""
    import matplotlib  # deferred: as in save_curves

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: as in save_curves

    width = max((len(images) for _, images in rows), default=1) or 1
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(1.0 * width + 1.6, 4.0), 1.0 * len(rows) + 0.5),
                             squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows):
        if images:
            grid = image_grid(torch.stack(list(images)), nrow=width).permute(1, 2, 0).numpy()
            ax.imshow(grid[:, :, 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    written = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return written
