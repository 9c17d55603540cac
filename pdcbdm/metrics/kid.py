"""Kernel Inception Distance (Binkowski et al. 2018): the unbiased squared MMD with a cubic polynomial kernel.

KID = MMD^2_u(X, Y) with k(x, y) = (x.y / D + 1)^3 (torch-fidelity's defaults: degree 3, gamma 1/D, coef0 1):
    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1)) - 2 sum_{i, j} k(x_i, y_j) / (m n)
Each term is an unbiased estimate of its expectation for i.i.d. samples, so KID is unbiased at any size (two draws
of one distribution give 0 on average, negative values included), unlike FID, whose small-N bias is large (the
per-class floors of docs/evaluation.md, "Reading small samples honestly"). torch-fidelity averages this estimate over
random equal-size subsets; here it is computed once over all points (sizes may differ), which for equal sizes and a
single whole-set subset is torch-fidelity's value exactly (tests/test_metrics.py checks it). Kernel sums are taken
in row blocks, so 50,000 x 50,000 points need no N x N matrix.

Class-stratified sets. The evaluation's sets are not i.i.d. draws from the class mixture: every class has a fixed
count (labels uniform over classes, a balanced reference). Then a set holds fewer same-class pairs than i.i.d. draws
would (20 x 19 x 10 of 200 x 199 pairs instead of a tenth), same-class pairs have the larger kernel values, and the
plain estimate is biased low: far below 0 for real digits, whose per-class KID is about 0 (docs/results.md,
"Metrics"). Given the labels (`gen_labels`, `ref_labels`), each within-set term is instead estimated stratum by
stratum: sum over class pairs (a, b) of p_a p_b times the mean kernel value of the block (a, b), diagonal excluded
when a = b, with p the set's class proportions. That is unbiased for the mixture with those proportions under
stratified sampling (and equal to the plain estimate for one class). The cross term needs no change: its plain mean
already weighs every block by p_a q_b. A set with a class of fewer than 2 points falls back to the plain within-set
term.

A reference re-weighted to another class mixture (``ref_shares``, ``mixture.py``: the class-balanced training set)
uses its shares in place of its proportions in the within-set term and its row weights pi_k / n_k in the cross
term. A class of that set with a single point has no pair: its diagonal block takes the point's own kernel value
(biased up by pi_k^2 times the gap to a pair's value; with K classes at most a 1 / K^2 share of the term).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .fid import as_float64
from .mixture import mixture_weights

__all__ = ["KID_DEGREE", "KID_COEF0", "kid_from_features", "group_kid", "per_class_kid"]

KID_DEGREE = 3
KID_COEF0 = 1.0
# Rows of one kernel block: 1,024 x N float64 is 400 MB for N = 50,000.
_BLOCK_ROWS = 1024


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, gamma: float, degree: int, coef0: float,
                weights_b: torch.Tensor | None = None) -> float:
    """sum over all (i, j) of (a_i . b_j * gamma + coef0)^degree (times weights_b[j] when given), in row blocks."""
    total = a.new_zeros(())
    for s in range(0, a.shape[0], _BLOCK_ROWS):
        k = ((a[s:s + _BLOCK_ROWS] @ b.T) * gamma + coef0) ** degree
        total += k.sum() if weights_b is None else (k @ weights_b).sum()
    return float(total)


def _within_mean(a: torch.Tensor, labels: np.ndarray | None, gamma: float, degree: int, coef0: float,
                 shares: np.ndarray | None = None) -> float:
    """Unbiased estimate of E k(A, A') for independent A, A' from the set's distribution: the mean over i != j of
    k(a_i, a_j), or with labels the stratified estimate of the module docstring (class proportions from the
    counts, or from ``shares`` indexed by label)."""
    n = a.shape[0]
    diagonal = ((a * a).sum(dim=1) * gamma + coef0) ** degree
    classes, index = ((np.zeros(1, dtype=np.int64), np.zeros(n, dtype=np.int64)) if labels is None
                      else np.unique(np.asarray(labels), return_inverse=True))
    counts = np.bincount(index).astype(np.float64)
    if counts.min() < 2 and shares is None:
        return (_kernel_sum(a, a, gamma, degree, coef0) - float(diagonal.sum())) / (n * (n - 1))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(index).to(a.device), len(counts)).to(a.dtype)  # [n, C]
    blocks = sum(onehot[s:s + _BLOCK_ROWS].T @ (((a[s:s + _BLOCK_ROWS] @ a.T) * gamma + coef0) ** degree) @ onehot
                 for s in range(0, n, _BLOCK_ROWS)).cpu().numpy()                    # [C, C] kernel sums
    pairs = np.outer(counts, counts) - np.diag(counts)                                # off-diagonal pair counts
    means = (blocks - np.diag((onehot.T @ diagonal).cpu().numpy())) / np.where(pairs > 0, pairs, 1.0)
    single = np.flatnonzero(counts < 2)                                               # only with shares
    means[single, single] = blocks[single, single]
    share = counts / n if shares is None else np.asarray(shares, dtype=np.float64)[classes]
    share = share / share.sum()
    return float(share @ means @ share)


def kid_from_features(gen_features: np.ndarray | torch.Tensor, ref_features: np.ndarray | torch.Tensor, *,
                      gen_labels: np.ndarray | None = None, ref_labels: np.ndarray | None = None,
                      ref_shares: np.ndarray | None = None, degree: int = KID_DEGREE, gamma: float | None = None,
                      coef0: float = KID_COEF0, device: torch.device | str = "cpu") -> float:
    """Unbiased KID (squared MMD, polynomial kernel) between two feature sets.

    Args:
        gen_features: [M, D] features, M >= 2.
        ref_features: [N, D] features, N >= 2 (M and N may differ).
        gen_labels, ref_labels: [M] and [N] class labels of sets drawn class by class with fixed counts; given,
            the within-set terms are estimated stratum by stratum (module docstring). None: i.i.d. samples.
        ref_shares: the class mixture the reference stands for (indexed by label; needs ``ref_labels``), None:
            its own proportions (module docstring).
        degree, gamma, coef0: kernel (x.y * gamma + coef0)^degree; gamma None = 1 / D (torch-fidelity's default).
        device: where the kernel sums are taken (float64; the evaluation passes the trial's device).

    Returns:
        The estimate as a Python float (may be slightly negative when the distributions agree).
    """
    x = as_float64(gen_features, "gen_features", 2)
    y = as_float64(ref_features, "ref_features", 2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: gen_features {x.shape[1]}, ref_features {y.shape[1]}")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 points per set, got {m} and {n}")
    for name, labels, size in (("gen_labels", gen_labels, m), ("ref_labels", ref_labels, n)):
        if labels is not None and np.shape(labels) != (size,):
            raise ValueError(f"{name} must have one label per row ({size}), got shape {np.shape(labels)}")
    if ref_shares is not None and ref_labels is None:
        raise ValueError("ref_shares needs ref_labels (the shares are per class)")
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    xt, yt = (torch.from_numpy(v).to(device) for v in (x, y))
    xx = _within_mean(xt, gen_labels, g, degree, coef0)
    yy = _within_mean(yt, ref_labels, g, degree, coef0, ref_shares)
    weights = None if ref_shares is None else torch.from_numpy(mixture_weights(ref_labels, ref_shares) * n).to(device)
    xy = _kernel_sum(xt, yt, g, degree, coef0, weights) / (m * n)
    return xx + yy - 2.0 * xy


def group_kid(gen_features: np.ndarray, gen_labels: np.ndarray, ref_features: np.ndarray, ref_labels: np.ndarray,
              classes: Sequence[int], *, ref_shares: np.ndarray | None = None,
              device: torch.device | str = "cpu") -> float | None:
    """Class-stratified KID between the generated and reference samples whose labels are in `classes` (None: < 2
    on a side); ``ref_shares`` and ``device`` as `kid_from_features`."""
    gen_mask = np.isin(gen_labels, list(classes))
    ref_mask = np.isin(ref_labels, list(classes))
    if gen_mask.sum() < 2 or ref_mask.sum() < 2:
        return None
    return kid_from_features(gen_features[gen_mask], ref_features[ref_mask], gen_labels=gen_labels[gen_mask],
                             ref_labels=ref_labels[ref_mask], ref_shares=ref_shares, device=device)


def per_class_kid(gen_features: np.ndarray, gen_labels: np.ndarray, ref_features: np.ndarray,
                  ref_labels: np.ndarray, num_classes: int) -> list[float | None]:
    """KID of each class k = 0..num_classes-1 against the reference images of class k (None: < 2 samples)."""
    return [group_kid(gen_features, gen_labels, ref_features, ref_labels, [k]) for k in range(num_classes)]
