"""Precision and recall for distributions, PRD (Sajjadi et al. 2018), and its F_8 / F_1/8 summary.

docs/method.md "Metrics": MiniBatchKMeans on the union of generated and reference features with 20 x (number of classes
sampled) clusters, 1001 angles, 10 runs averaged. With P the reference and Q the generated cluster histograms, the
PRD curve is, for slopes lambda = tan(angle), angle in (0, pi/2):
    alpha(lambda) = sum_w min(lambda P(w), Q(w))   (precision),   beta(lambda) = alpha(lambda) / lambda   (recall).
F_b = max over the curve of (1 + b^2) alpha beta / (b^2 alpha + beta). Large b weighs recall: F_8 is the recall-like
score, F_1/8 the precision-like one.

Small samples (what this implementation adds, and why). Sajjadi et al.'s code requires equal set sizes; the paper's
setting is 20 x classes clusters over tens of thousands of points. At the digits evaluation size the same recipe is
noise: 200 clusters over 200 generated + 500 real points gave real-vs-real F_8 0.61 and F_1/8 0.80 (two draws of
one distribution), because most clusters then hold one or two points and a histogram bin with one point from one
set and none from the other reads as a missing mode. So:
- both sets are cut to equal size N, the larger one by a seeded subsample without replacement (`equal_size_sets`);
- at most N / 10 clusters are used (`prd_cluster_count`: min(20 x classes, N // 10); the paper's 20 x classes is
  the cap whenever N allows, e.g. from N = 2,000 on for 10 classes). Ten points per cluster on average keeps
  real-vs-real F_8 at 0.97-0.98 and F_1/8 at 0.96-0.98 for N = 200 digits (10 draws, pipelines/noise_floor.py);
  `prd_from_features` refuses more clusters than N // 10.
"""

from __future__ import annotations

import numpy as np
import torch

from .fid import as_float64
from .mixture import weighted_draw

__all__ = ["prd_curve", "prd_from_features", "max_f_beta", "prd_f_scores", "equal_size_sets", "prd_cluster_count",
           "PRD_CLUSTERS_PER_CLASS", "PRD_POINTS_PER_CLUSTER"]

_ANGLE_EPS = 1e-10
PRD_CLUSTERS_PER_CLASS = 20
PRD_POINTS_PER_CLUSTER = 10


def prd_curve(gen_hist: np.ndarray, ref_hist: np.ndarray, num_angles: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """PRD curve of two histograms over the same bins.

    Args:
        gen_hist: [C] generated-sample distribution Q (non-negative, sums to 1).
        ref_hist: [C] reference distribution P (non-negative, sums to 1).
        num_angles: points on the curve; angles spread evenly over (0, pi/2).

    Returns:
        (precision [num_angles], recall [num_angles]), clipped to [0, 1].
    """
    q, p = as_float64(gen_hist, "gen_hist", 1), as_float64(ref_hist, "ref_hist", 1)
    if q.shape != p.shape:
        raise ValueError(f"gen_hist has {q.shape[0]} bins, ref_hist {p.shape[0]}")
    if num_angles < 3:
        raise ValueError(f"num_angles must be >= 3, got {num_angles}")
    slopes = np.tan(np.linspace(_ANGLE_EPS, np.pi / 2 - _ANGLE_EPS, num_angles))
    precision = np.minimum(slopes[:, None] * p[None, :], q[None, :]).sum(axis=1)
    recall = precision / slopes
    return np.clip(precision, 0.0, 1.0), np.clip(recall, 0.0, 1.0)


def equal_size_sets(gen: np.ndarray, ref: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Both sets at the smaller one's size: the larger is replaced by a seeded subsample without replacement
    (rows kept in their order); equal sizes come back unchanged."""
    n = min(len(gen), len(ref))
    rng = np.random.default_rng(seed)

    def cut(x: np.ndarray) -> np.ndarray:
        return x if len(x) == n else x[np.sort(rng.choice(len(x), size=n, replace=False))]

    return cut(gen), cut(ref)


def prd_cluster_count(n: int, num_classes: int, *, per_class: int = PRD_CLUSTERS_PER_CLASS,
                      points_per_cluster: int = PRD_POINTS_PER_CLUSTER) -> int:
    """Clusters for PRD over two sets of n points each: min(per_class x num_classes, n // points_per_cluster).

    0 means too few points for a meaningful PRD (fewer than 2 clusters).
    """
    count = min(per_class * num_classes, n // points_per_cluster)
    return count if count >= 2 else 0


def _cluster_histograms(gen: np.ndarray, ref: np.ndarray, num_clusters: int, seed: int,
                        n_init: int, ref_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the union of both sets once and return each set's normalised cluster histogram (the reference's
    weighted by ``ref_weights`` when given)."""
    # float64: scikit-learn's float32 distance path up-casts chunk by chunk and is slower here.
    union = np.concatenate([gen, ref])
    # imported here: scikit-learn (with scipy) costs about 1 s to import, and most importers never cluster
    from sklearn.cluster import MiniBatchKMeans
    kmeans = MiniBatchKMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed)
    labels = kmeans.fit(union).labels_
    gen_hist = np.bincount(labels[:len(gen)], minlength=num_clusters) / len(gen)
    ref_hist = np.bincount(labels[len(gen):], weights=ref_weights, minlength=num_clusters)
    return gen_hist, ref_hist / ref_hist.sum()


def _weighted_equal_sizes(gen: np.ndarray, ref: np.ndarray, ref_weights: np.ndarray | None,
                          seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``equal_size_sets``, except that a weighted reference larger than the generated set is cut by a draw with
    probabilities proportional to its weights (``mixture.weighted_draw``: about its mixture, then unweighted)."""
    if ref_weights is None or len(ref) <= len(gen) or np.ptp(ref_weights) <= 1e-12 * np.max(ref_weights):
        gen, cut = equal_size_sets(gen, ref, seed)  # uniform weights (a balanced set): the plain cut
        return gen, cut, ref_weights if len(cut) == len(ref) else None  # a whole reference keeps its weights
    return gen, ref[weighted_draw(ref_weights, len(gen), seed)], None


def prd_from_features(gen_features: np.ndarray | torch.Tensor, ref_features: np.ndarray | torch.Tensor, *,
                      num_clusters: int, num_angles: int = 1001, num_runs: int = 10, seed: int = 0,
                      n_init: int = 10, ref_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """PRD curve of generated against reference features, averaged over `num_runs` clusterings.

    Args:
        gen_features: [M, D] generated features.
        ref_features: [N, D] reference features; the larger set is first subsampled (seeded by `seed`) to the
            smaller one's size n = min(M, N) (`equal_size_sets`).
        num_clusters: k-means clusters, in [1, n // 10] (see the module docstring; `prd_cluster_count`).
        num_angles: points on the curve (paper: 1001).
        num_runs: independent clusterings averaged (paper: 10).
        seed: seeds the subsample; run r uses random_state seed + r.
        n_init: k-means++ initialisations per run, the best kept (10 in Sajjadi et al.'s code; on 2048-d
            features they dominate the cost, so fewer trade some stability for speed).
        ref_weights: [N] weights of a reference re-weighted to another class mixture (``mixture.py``): a larger
            reference is cut by a weighted draw, an equal one weighs its histogram.

    Returns:
        (precision [num_angles], recall [num_angles]), the mean curves.
    """
    gen = as_float64(gen_features, "gen_features", 2)
    ref = as_float64(ref_features, "ref_features", 2)
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"feature dims differ: gen_features {gen.shape[1]}, ref_features {ref.shape[1]}")
    if ref_weights is not None and np.shape(ref_weights) != (len(ref),):
        raise ValueError(f"ref_weights must have one entry per reference row ({len(ref)})")
    gen, ref, ref_weights = _weighted_equal_sizes(gen, ref, ref_weights, seed)
    limit = len(gen) // PRD_POINTS_PER_CLUSTER
    if not 1 <= num_clusters <= limit:
        raise ValueError(f"num_clusters must be in [1, {limit}] (at most one cluster per "
                         f"{PRD_POINTS_PER_CLUSTER} points of the equal-size sets of {len(gen)}), got {num_clusters}")
    if num_runs < 1 or n_init < 1:
        raise ValueError(f"num_runs and n_init must be >= 1, got num_runs={num_runs}, n_init={n_init}")
    curves = [prd_curve(*_cluster_histograms(gen, ref, num_clusters, seed + run, n_init, ref_weights),
                        num_angles=num_angles)
              for run in range(num_runs)]
    return np.mean([c[0] for c in curves], axis=0), np.mean([c[1] for c in curves], axis=0)


def max_f_beta(precision: np.ndarray, recall: np.ndarray, beta: float) -> float:
    """max over the curve of F_beta = (1 + beta^2) p r / (beta^2 p + r); beta > 1 weighs recall."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    p, r = np.asarray(precision, dtype=np.float64), np.asarray(recall, dtype=np.float64)
    f = (1.0 + beta**2) * p * r / (beta**2 * p + r + _ANGLE_EPS)
    return float(f.max())


def prd_f_scores(gen_features: np.ndarray | torch.Tensor, ref_features: np.ndarray | torch.Tensor, *,
                 num_clusters: int, num_angles: int = 1001, num_runs: int = 10, seed: int = 0,
                 n_init: int = 10, beta: float = 8.0, ref_weights: np.ndarray | None = None) -> tuple[float, float]:
    """(F_beta, F_1/beta) of the averaged PRD curve: with beta = 8, (F_8 recall-like, F_1/8 precision-like).

    Arguments as `prd_from_features`; `beta` is the recall weight of the first score.
    """
    precision, recall = prd_from_features(gen_features, ref_features, num_clusters=num_clusters,
                                          num_angles=num_angles, num_runs=num_runs, seed=seed, n_init=n_init,
                                          ref_weights=ref_weights)
    return max_f_beta(precision, recall, beta), max_f_beta(precision, recall, 1.0 / beta)
