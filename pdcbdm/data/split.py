"""Head/tail class split and the group samplers that feed the perceptual-distinguish loss (Eq. 10-11).

The paper sorts classes by frequency and splits them 7:3 (6:4 and 8:2 also tried); on balanced data it shuffles
the classes before splitting (docs/method.md, "Perceptual distinguish loss").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["HeadTailSplit", "head_tail_split", "ClassGroupSampler", "SPLIT_MODES"]

SPLIT_MODES = ("classes", "samples")
# Guards ceil/compare against float error: 0.7 * 10 evaluates to 7.000000000000001.
_EPS = 1e-9


@dataclass(frozen=True)
class HeadTailSplit:
    """The classes of the head and tail groups, each sorted ascending by class index.

    Args:
        head: head-class indices (non-empty).
        tail: tail-class indices (non-empty, disjoint from head).
    """

    head: tuple[int, ...]
    tail: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.head or not self.tail:
            raise ValueError(f"head and tail must both be non-empty, got head={self.head}, tail={self.tail}")
        overlap = set(self.head) & set(self.tail)
        if overlap:
            raise ValueError(f"head and tail overlap in classes {sorted(overlap)}")

    def is_tail(self, labels: torch.Tensor) -> torch.Tensor:
        """Boolean tensor, same shape as `labels`, True where the label is a tail class."""
        labels = torch.as_tensor(labels)
        return torch.isin(labels, torch.tensor(self.tail, dtype=labels.dtype, device=labels.device))

    def is_head(self, labels: torch.Tensor) -> torch.Tensor:
        """Boolean tensor, same shape as `labels`, True where the label is a head class."""
        labels = torch.as_tensor(labels)
        return torch.isin(labels, torch.tensor(self.head, dtype=labels.dtype, device=labels.device))

    def group_of(self, k: int) -> str:
        """"head" or "tail" for class `k` (ValueError if the class is in neither)."""
        if k in self.head:
            return "head"
        if k in self.tail:
            return "tail"
        raise ValueError(f"class {k} is in neither the head {self.head} nor the tail {self.tail}")


def _class_order(counts: list[int], seed: int) -> list[int]:
    """Classes by count descending (ties by index); a seeded shuffle when all counts are equal (paper, 4.4)."""
    if len(set(counts)) == 1:
        generator = torch.Generator().manual_seed(int(seed))
        return torch.randperm(len(counts), generator=generator).tolist()
    return sorted(range(len(counts)), key=lambda k: (-counts[k], k))


def _head_size(counts: list[int], order: list[int], ratio: float, mode: str) -> int:
    """Number of leading classes of `order` that form the head, at most K - 1: every split keeps a tail (with 2 or 3
    classes, ceil(0.7 K) would be all of them; a lesion set of benign and malignant is the common case)."""
    return min(_ratio_head_size(counts, order, ratio, mode), len(counts) - 1)


def _ratio_head_size(counts: list[int], order: list[int], ratio: float, mode: str) -> int:
    if mode == "classes":
        return math.ceil(ratio * len(counts) - _EPS)
    total = sum(counts)
    if total == 0:
        raise ValueError("mode='samples' needs at least one image, but all counts are 0")
    cumulative = 0
    for i, k in enumerate(order):
        cumulative += counts[k]
        if cumulative >= ratio * total - _EPS * total:
            return i + 1
    return len(order)


def head_tail_split(counts: Sequence[int], ratio: float = 0.7, *, mode: str = "classes",
                    seed: int = 0) -> HeadTailSplit:
    """Split classes into head and tail groups for the PD loss (Eq. 10; the paper's ratio is 7:3).

    Classes are sorted by count n_k descending, ties broken by class index; when every count is equal (balanced
    data) the order is a seeded shuffle instead, as the paper does on CIFAR-10/100.

    Args:
        counts: images per class, n_0..n_{K-1} (K >= 2).
        ratio: r in (0, 1). mode="classes": the head is the first ceil(r K) classes. mode="samples": the head is
            the shortest prefix of the sorted classes holding at least r of all images. Either way at most K - 1
            classes: the rarest class is always tail (K = 2: one head class, one tail class).
        mode: "classes" (default, the paper's reading) or "samples".
        seed: seed of the class shuffle used on balanced data (ignored otherwise).

    Raises:
        ValueError: if ratio is outside (0, 1), mode is unknown, K < 2, or either group would be empty.
    """
    counts = [int(c) for c in counts]
    if len(counts) < 2 or min(counts) < 0:
        raise ValueError(f"counts must hold at least 2 non-negative class counts, got {counts}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"ratio must be a number in (0, 1) exclusive, got {ratio!r}")
    if mode not in SPLIT_MODES:
        raise ValueError(f"mode must be one of {SPLIT_MODES}, got {mode!r}")
    order = _class_order(counts, seed)
    n_head = _head_size(counts, order, float(ratio), mode)
    if not 0 < n_head < len(counts):
        raise ValueError(f"ratio={ratio} with mode={mode!r} puts {n_head} of {len(counts)} classes in the head; "
                         "both the head and the tail must be non-empty")
    return HeadTailSplit(head=tuple(sorted(order[:n_head])), tail=tuple(sorted(order[n_head:])))


class ClassGroupSampler:
    """Draws data set indices uniformly, with replacement, from the images of a group of classes.

    Used to build the head batch (x0_h, y_h) and the tail batch (x0_l, y_l) of the PD loss (Eq. 10-11). A class
    is drawn in proportion to its image count within the group.

    Args:
        labels: int tensor [N], the data set's labels.
        classes: the classes of the group (e.g. `split.head`); at least one image must carry one of them.
    """

    def __init__(self, labels: torch.Tensor, classes: Sequence[int]) -> None:
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"labels must be a 1-d integer tensor, got dtype {labels.dtype}, "
                             f"shape {tuple(labels.shape)}")
        self.classes = tuple(sorted({int(k) for k in classes}))
        if not self.classes:
            raise ValueError("classes is empty: a group sampler needs at least one class")
        group = torch.tensor(self.classes, dtype=labels.dtype)
        self.indices = torch.isin(labels.cpu(), group).nonzero().flatten()
        if self.indices.numel() == 0:
            raise ValueError(f"no image carries any of the classes {self.classes}")

    def __len__(self) -> int:
        """Number of images in the group."""
        return int(self.indices.numel())

    def to(self, device: torch.device | str) -> "ClassGroupSampler":
        """This sampler with its indices on ``device``: it then draws there (with a generator on that device)."""
        self.indices = self.indices.to(device)
        return self

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw `n` data set indices (int64 tensor [n]) with replacement, on the device of the indices (``to``);
        `generator`, on that device, makes it reproducible."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        picks = torch.randint(len(self), (n,), generator=generator, device=self.indices.device)
        return self.indices[picks]
