"""A reference set that stands for another class mixture than its own counts: the class-balanced training set.

A user with long-tailed data has no balanced set to score against (the paper scores CIFAR against the balanced
original). The training images re-weighted to a class mixture with shares pi_k stand in for it: image i of class k
gets the weight

    w_i = pi_k / n_k        (n_k images of class k in the set; pi uniform over the classes present = balanced)

so that every class counts pi_k in total. The metrics then use weighted estimates, exact on the cached features
(no resampling noise): the mean and covariance of FID (``fid.feature_statistics``), KID's reference terms
(``kid.py``), the recall's share of reference points (``precision_recall.py``) and PRD's reference draw (``prd.py``).
With every class equally large and uniform shares, every weight is 1 / N and each metric equals its plain value.

Shares are indexed by class label; a group of classes (head, tail, one class) renormalises them over the classes it
holds. Large weighted sets are cut for the pairwise metrics (KID, precision/recall) by ``stratified_subsample``:
per class at most an equal share of the budget, so that a 100,000-image training set keeps every image of its tail.
"""

from __future__ import annotations


import numpy as np

__all__ = ["balanced_shares", "mixture_weights", "stratified_subsample", "weighted_draw"]


def balanced_shares(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Shares [num_classes]: equal over the classes that have at least one image in ``labels``, 0 elsewhere."""
    present = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes] > 0
    if not present.any():
        raise ValueError("balanced_shares: the set holds no image")
    return present / present.sum()


def mixture_weights(labels: np.ndarray, shares: np.ndarray | None) -> np.ndarray | None:
    """Per-row weights w_i = pi_k / n_k summing to 1 (module docstring), the shares renormalised over the classes
    ``labels`` holds; None for ``shares`` None (the set's own mixture: uniform weights).

    Raises ValueError when a class of ``labels`` has no share (an index past ``shares``) or every present class
    has share 0."""
    if shares is None:
        return None
    labels = np.asarray(labels, dtype=np.int64)
    pi = np.asarray(shares, dtype=np.float64)
    if labels.size and labels.max() >= len(pi):
        raise ValueError(f"class shares cover {len(pi)} classes, but a label is {int(labels.max())}")
    counts = np.bincount(labels, minlength=len(pi)).astype(np.float64)
    mass = float(pi[counts > 0].sum())
    if mass <= 0.0:
        raise ValueError("the classes of this set all have class share 0")
    per_class = np.divide(pi, counts * mass, out=np.zeros_like(pi), where=counts > 0)
    return per_class[labels]


def stratified_subsample(labels: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Sorted row indices of at most ``max_rows`` rows: every class keeps min(n_k, c) rows, c the largest cap that
    fits the budget (small classes whole, large ones cut evenly), drawn without replacement with ``seed``; all rows
    when the set fits. Each class keeps at least 2 rows where it has them (the within-class terms need pairs)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) <= max_rows:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    cap = _largest_cap(counts, max_rows)
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(labels == k), size=min(n, cap), replace=False) for k, n in zip(classes, counts)]
    return np.sort(np.concatenate(keep))


def _largest_cap(counts: np.ndarray, budget: int) -> int:
    """The largest c >= 2 with sum(min(n_k, c)) <= budget (2 when even that overflows)."""
    low, high = 2, int(counts.max())
    while low < high:
        mid = (low + high + 1) // 2
        if int(np.minimum(counts, mid).sum()) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def weighted_draw(weights: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` rows drawn without replacement with probabilities proportional to ``weights``
    (all of them when ``size`` covers the set): a weighted set cut to a plain one of about its mixture."""
    w = np.asarray(weights, dtype=np.float64)
    if size >= len(w):
        return np.arange(len(w))
    return np.sort(np.random.default_rng(seed).choice(len(w), size=size, replace=False, p=w / w.sum()))

