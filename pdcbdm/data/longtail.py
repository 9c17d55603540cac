"""Long-tailed subsampling (Cao et al. 2019, as used by CBDM and PD-CBDM; docs/method.md, "Data").

n_k = int(n_max * rho^(-k/(K-1))) images are kept for class k, class 0 being the head; rho = 100 gives 12,406
images for CIFAR10-LT (n_max 5000) and 10,847 for CIFAR100-LT (n_max 500).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["longtail_counts", "longtail_indices", "check_imbalance"]


def check_imbalance(rho: float, name: str = "imbalance") -> float:
    """Return `rho` as a float if it is a finite imbalance factor >= 1, else raise ValueError naming `name`."""
    if isinstance(rho, bool):
        raise ValueError(f"{name} must be a number >= 1, got {rho!r}")
    try:
        value = float(rho)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 1, got {rho!r}") from None
    if not math.isfinite(value) or value < 1.0:
        raise ValueError(f"{name} (the imbalance factor rho = n_max / n_min) must be finite and >= 1, got {rho!r}")
    return value


def longtail_counts(n_max: int, num_classes: int, rho: float) -> list[int]:
    """Per-class image counts of a long-tailed set: n_k = int(n_max * rho^(-k/(K-1))), k = 0..K-1.

    Args:
        n_max: images kept for the head class 0 (5000 for CIFAR-10, 500 for CIFAR-100).
        num_classes: number of classes K (K = 1 gives [n_max]).
        rho: imbalance factor n_0 / n_{K-1}, >= 1 (1, 10 and 100 in the paper; 1 is balanced).
    """
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1:
        raise ValueError(f"n_max must be a positive int, got {n_max!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    rho = check_imbalance(rho, "rho")
    if num_classes == 1:
        return [n_max]
    return [int(n_max * rho ** (-k / (num_classes - 1))) for k in range(num_classes)]


def longtail_indices(labels: torch.Tensor, counts: Sequence[int], seed: int) -> torch.Tensor:
    """Indices keeping the first counts[k] images of each class k after a seeded per-class shuffle.

    Every class's shuffle consumes the generator equally whatever `counts` is, so for a fixed seed a stronger
    imbalance keeps a subset of what a milder one keeps.

    Args:
        labels: int tensor [N] of class labels in [0, len(counts)).
        counts: images to keep per class (e.g. from `longtail_counts`); counts[k] may not exceed class k's size.
        seed: seed of the shuffle.

    Returns:
        int64 tensor of the kept positions in `labels`, sorted ascending (the source order is preserved).
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be a 1-d integer tensor, got dtype {labels.dtype}, shape {tuple(labels.shape)}")
    counts = [int(c) for c in counts]
    if not counts or min(counts) < 0:
        raise ValueError(f"counts must be a non-empty list of non-negative ints, got {counts}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(counts)):
        raise ValueError(f"labels must lie in [0, {len(counts)}) (len(counts)), "
                         f"got min {int(labels.min())}, max {int(labels.max())}")
    available = torch.bincount(labels.to(torch.int64), minlength=len(counts)).tolist()
    short = [k for k, (c, a) in enumerate(zip(counts, available)) if c > a]
    if short:
        k = short[0]
        raise ValueError(f"counts[{k}] = {counts[k]} exceeds the {available[k]} images of class {k} "
                         f"(classes short of images: {short})")
    generator = torch.Generator().manual_seed(int(seed))
    kept = []
    for k, n_k in enumerate(counts):
        members = (labels == k).nonzero().flatten()
        order = torch.randperm(members.numel(), generator=generator)
        kept.append(members[order[:n_k]])
    return torch.cat(kept).sort().values
