"""Precision and recall for distributions, PRD (Sajjadi et al. 2018), and its F_8 / F_1/8 summary.

docs/method.md "Metrics": k-means on the union of generated and reference features with 20 x (number of classes
sampled) clusters, 1001 angles, 10 runs averaged. With P the reference and Q the generated cluster histograms, the
PRD curve is, for slopes lambda = tan(angle), angle in (0, pi/2):
    alpha(lambda) = sum_w min(lambda P(w), Q(w))   (precision),   beta(lambda) = alpha(lambda) / lambda   (recall).
F_b = max over the curve of (1 + b^2) alpha beta / (b^2 alpha + beta). Large b weighs recall: F_8 is the recall-like
score, F_1/8 the precision-like one.

Small samples (what this implementation adds, and why). Sajjadi et al.'s code requires equal set sizes; the paper's
setting is 20 x classes clusters over tens of thousands of points. At the digits evaluation size the same recipe is
noise: two draws of one distribution score well below 1 (docs/results.md, "Metrics"), because most clusters then
hold one or two points and a histogram bin with one point from one set and none from the other reads as a missing
mode. So:
- both sets are cut to equal size N, the larger one by a seeded subsample without replacement (`equal_size_sets`);
- at most N / 10 clusters are used (`prd_cluster_count`: min(20 x classes, N // 10); the paper's 20 x classes is
  the cap whenever N allows, e.g. from N = 2,000 on for 10 classes). Ten points per cluster on average keeps
  two real draws' F_8 and F_1/8 near 1 at the digits size (the same section; pipelines/noise_floor.py measures
  them); `prd_from_features` refuses more clusters than N // 10.

The clustering (`kmeans`, torch, on the device the evaluation names: the trial's GPU or the CPU). Each run draws
n_init k-means++ seedings (Arthur & Vassilvitskii 2007) on a seeded subsample of 3,072 points and keeps the one of
lowest inertia there, then runs Lloyd iterations over all 2N points until at most 0.1% of them change cluster (at
the digits size: none) or 100 iterations. Distances are float32 matmuls on features centred on the union's mean,
in row blocks of one [rows, K] slab. Run r is seeded by seed + r through a torch.Generator on the device. It
replaced scikit-learn's MiniBatchKMeans on the CPU (k-means++ seedings on a 3,072-point subsample too, then
mini-batch updates): on the same features both give F_8 and F_1/8 within the real-vs-real spread (docs/method.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .fid import as_float64
from .mixture import weighted_draw

__all__ = ["prd_curve", "prd_from_features", "max_f_beta", "prd_f_scores", "equal_size_sets", "prd_cluster_count",
           "kmeans", "KMeansResult", "PRD_CLUSTERS_PER_CLASS", "PRD_POINTS_PER_CLUSTER"]

_ANGLE_EPS = 1e-10
PRD_CLUSTERS_PER_CLASS = 20
PRD_POINTS_PER_CLUSTER = 10
# k-means: Lloyd iterations at most, and the share of points whose move ends them: stopping there moves F_8 and
# F_1/8 far less than the run's seed does (docs/results.md, "Metrics").
KMEANS_MAX_ITER = 100
KMEANS_TOL = 1e-3
# Points of the subsample the k-means++ seedings are drawn on: scikit-learn's MiniBatchKMeans default (3 x its
# batch of 1,024), which this module used before.
KMEANS_INIT_SIZE = 3 * 1024
# Elements of one [rows, K] distance block: 2^24 float32 = 64 MiB.
KMEANS_BLOCK_ELEMENTS = 1 << 24


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


@dataclass(frozen=True)
class KMeansResult:
    """One k-means clustering: ``centres`` [K, D] (in the coordinates of the points given), ``labels`` [N] (int64,
    each point's nearest centre), ``inertia`` (sum of squared distances to it) and the ``iterations`` run (the
    assignments made, the seeding's included)."""

    centres: torch.Tensor
    labels: torch.Tensor
    inertia: float
    iterations: int


def _nearest_centres(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor,
                     block_elements: int = KMEANS_BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest centre [N], squared distance to it [N]) by ||x||^2 - 2 x.c + ||c||^2, one matmul per
    block of rows, so memory beyond the inputs is one [rows, K] block however large N is."""
    c_sq = (centres * centres).sum(dim=1)
    rows = max(1, block_elements // max(centres.shape[0], 1))
    labels, dists = [], []
    for s in range(0, x.shape[0], rows):
        d = torch.addmm(c_sq[None, :], x[s:s + rows], centres.T, alpha=-2.0)   # -2 x.c + ||c||^2
        best = d.min(dim=1)
        labels.append(best.indices)
        dists.append((best.values + x_sq[s:s + rows]).clamp_min_(0.0))           # round-off below 0 is 0
    return torch.cat(labels), torch.cat(dists)


def _kmeans_plus_plus(x: torch.Tensor, x_sq: torch.Tensor, k: int, n_init: int,
                      generator: torch.Generator) -> torch.Tensor:
    """``n_init`` independent k-means++ seedings (Arthur & Vassilvitskii 2007) drawn side by side: each starts at a
    uniformly drawn point, and each next centre is a point drawn with probability proportional to its squared
    distance to the nearest centre chosen so far. Returns [n_init, k, D].

    The seedings advance together so that each step reads the points once, in one [n_init, D] x [D, N] matmul
    (faster than n_init matrix-vector products: docs/results.md, "Metrics")."""
    n = x.shape[0]
    chosen = [torch.randint(n, (n_init,), generator=generator, device=x.device)]
    d2 = x_sq.new_full((n_init, n), float("inf"))
    for step in range(k):
        last = chosen[-1]  # index_select, not x[int]: no device synchronisation per centre
        # ||x||^2 - 2 c.x + ||c||^2 for the n_init centres just chosen
        new = torch.addmm(x_sq[None, :], x.index_select(0, last), x.T, alpha=-2.0) + x_sq[last][:, None]
        d2 = torch.minimum(d2, new.clamp_min_(0.0))
        if step < k - 1:
            # + tiny: points that all coincide with a centre (d2 = 0 everywhere) are then drawn uniformly, and the
            # draw needs no check of the sum (a device synchronisation per centre)
            chosen.append(torch.multinomial(d2 + torch.finfo(d2.dtype).tiny, 1, generator=generator)[:, 0])
    return x[torch.stack(chosen, dim=1)]


def _best_seeding(x: torch.Tensor, k: int, n_init: int, init_size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """The k-means++ seeding of lowest inertia among ``n_init``, each drawn on one seeded subsample of
    ``init_size`` points and scored on it (scikit-learn's MiniBatchKMeans, which the module used before, seeds on
    such a subsample too: the seeding's cost is then independent of N)."""
    sample = x[torch.randperm(x.shape[0], generator=generator, device=x.device)[:max(init_size, k)]]
    sample_sq = (sample * sample).sum(dim=1)
    seedings = _kmeans_plus_plus(sample, sample_sq, k, n_init, generator)
    inertia = torch.stack([_nearest_centres(sample, sample_sq, centres)[1].sum() for centres in seedings])
    return seedings[int(inertia.argmin())]


def _cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of each cluster's points [K, D], its size [K]). On the CPU by index_add_; elsewhere as a one-hot
    matmul, because CUDA's index_add_ adds with atomics in no fixed order and a seed must give one clustering."""
    counts = torch.bincount(labels, minlength=k)
    if x.device.type == "cpu":
        return x.new_zeros(k, x.shape[1]).index_add_(0, labels, x), counts
    rows = max(1, KMEANS_BLOCK_ELEMENTS // k)
    sums = x.new_zeros(k, x.shape[1])
    for s in range(0, x.shape[0], rows):
        onehot = torch.nn.functional.one_hot(labels[s:s + rows], k).to(x.dtype)
        sums.addmm_(onehot.T, x[s:s + rows])
    return sums, counts


def _update_centres(x: torch.Tensor, labels: torch.Tensor, d2: torch.Tensor, k: int) -> torch.Tensor:
    """Lloyd's update: every centre to its points' mean. A centre left without points moves to one of the points
    farthest from their centres (the usual repair; it keeps K clusters, each a histogram bin)."""
    sums, counts = _cluster_means(x, labels, k)
    centres = sums / counts.clamp_min(1)[:, None].to(x.dtype)
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty):
        centres[empty] = x[torch.topk(d2, len(empty)).indices]
    return centres


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, n_init: int = 10, max_iter: int = KMEANS_MAX_ITER,
           tol: float = KMEANS_TOL, init_size: int = KMEANS_INIT_SIZE) -> KMeansResult:
    """Lloyd's k-means (Lloyd 1982) with k-means++ seeding, on the device of ``points``.

    The best of ``n_init`` seedings (``_best_seeding``) is refined by Lloyd iterations over all points (assign
    each point to its nearest centre, move each centre to its points' mean) until at most ``tol`` x N points change
    cluster in an assignment (tol = 0: none) or ``max_iter`` assignments; the result is that last assignment and
    the centres it used. Seeded by a torch.Generator on that device. Float32 points are compared in float32
    (centre them first: the distance is ||x||^2 - 2 x.c + ||c||^2, which cancels far from the origin).

    Args:
        points: [N, D] floating-point tensor, N >= k.
        k: clusters, >= 1.
        seed: seeds the subsample and the seedings.
        n_init: k-means++ seedings tried, >= 1.
        max_iter: most assignments (Lloyd iterations).
        tol: share of the points whose move ends the iterations.
        init_size: points of the seeding subsample (all N when fewer).
    """
    x = points
    if x.dim() != 2 or not 1 <= k <= x.shape[0] or n_init < 1 or max_iter < 1:
        raise ValueError(f"kmeans needs [N, D] points with 1 <= k <= N, n_init >= 1 and max_iter >= 1, got shape "
                         f"{tuple(x.shape)}, k={k}, n_init={n_init}, max_iter={max_iter}")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    centres = _best_seeding(x, k, n_init, init_size, generator)
    x_sq = (x * x).sum(dim=1)
    labels, d2 = _nearest_centres(x, x_sq, centres)
    iterations = 1
    while iterations < max_iter:
        centres = _update_centres(x, labels, d2, k)
        new_labels, d2 = _nearest_centres(x, x_sq, centres)
        moved = int((new_labels != labels).sum())
        labels, iterations = new_labels, iterations + 1
        if moved <= tol * x.shape[0]:
            break
    return KMeansResult(centres, labels, float(d2.sum()), iterations)


def _cluster_histograms(gen: torch.Tensor, ref: torch.Tensor, num_clusters: int, seed: int,
                        n_init: int, ref_weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the union of both sets once (``kmeans``, on their device) and return each set's normalised cluster
    histogram (the reference's weighted by ``ref_weights`` when given)."""
    labels = kmeans(torch.cat([gen, ref]), num_clusters, seed=seed, n_init=n_init).labels.cpu().numpy()
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
                      n_init: int = 10, ref_weights: np.ndarray | None = None,
                      device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """PRD curve of generated against reference features, averaged over `num_runs` clusterings.

    Args:
        gen_features: [M, D] generated features.
        ref_features: [N, D] reference features; the larger set is first subsampled (seeded by `seed`) to the
            smaller one's size n = min(M, N) (`equal_size_sets`).
        num_clusters: k-means clusters, in [1, n // 10] (see the module docstring; `prd_cluster_count`).
        num_angles: points on the curve (paper: 1001).
        num_runs: independent clusterings averaged (paper: 10).
        seed: seeds the subsample; run r's clustering is seeded by seed + r.
        n_init: k-means++ seedings per run, the best kept (10 in Sajjadi et al.'s code; fewer is faster).
        ref_weights: [N] weights of a reference re-weighted to another class mixture (``mixture.py``): a larger
            reference is cut by a weighted draw, an equal one weighs its histogram.
        device: where the k-means runs (the evaluation passes the trial's device).

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
    # centred on the union's mean in float64, then float32 on the device: k-means compares float32 distances
    centre = (gen.sum(axis=0) + ref.sum(axis=0)) / (len(gen) + len(ref))
    gen_t, ref_t = (torch.as_tensor(v - centre, dtype=torch.float32).to(device) for v in (gen, ref))
    curves = [prd_curve(*_cluster_histograms(gen_t, ref_t, num_clusters, seed + run, n_init, ref_weights),
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
                 n_init: int = 10, beta: float = 8.0, ref_weights: np.ndarray | None = None,
                 device: torch.device | str = "cpu") -> tuple[float, float]:
    """(F_beta, F_1/beta) of the averaged PRD curve: with beta = 8, (F_8 recall-like, F_1/8 precision-like).

    Arguments as `prd_from_features`; `beta` is the recall weight of the first score.
    """
    precision, recall = prd_from_features(gen_features, ref_features, num_clusters=num_clusters,
                                          num_angles=num_angles, num_runs=num_runs, seed=seed, n_init=n_init,
                                          ref_weights=ref_weights, device=device)
    return max_f_beta(precision, recall, beta), max_f_beta(precision, recall, 1.0 / beta)
