"""Improved precision and recall (Kynkaanniemi et al. 2019), docs/method.md "Metrics" (k = 5).

Each set's manifold is the union of balls around its points, each ball reaching that point's k-th nearest neighbour
within the set. Precision = share of generated points inside the real manifold; recall = share of real points inside
the generated manifold. Distances are computed in row blocks (a [rows, M] slab at a time, never N x M), so 50,000 x
50,000 2048-d features need only the features themselves plus one slab of memory.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["DEFAULT_BLOCK_ELEMENTS", "knn_radii", "manifold_membership", "improved_precision_recall"]

# Elements of one distance slab: 2^24 float32 = 64 MiB (topk needs about as much again).
DEFAULT_BLOCK_ELEMENTS = 1 << 24


def _as_tensor(features: np.ndarray | torch.Tensor, name: str, dtype: torch.dtype,
               device: torch.device | str) -> torch.Tensor:
    """Features as a finite 2-d tensor of `dtype` on `device`."""
    x = torch.as_tensor(features)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {tuple(x.shape)}")
    x = x.to(device=device, dtype=dtype)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _rows_per_block(columns: int, block_elements: int) -> int:
    if block_elements < 1:
        raise ValueError(f"block_elements must be >= 1, got {block_elements}")
    return max(1, block_elements // max(columns, 1))


def _squared_distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """[A, B] squared Euclidean distances via ||a||^2 + ||b||^2 - 2 a.b (one matmul), clamped at 0."""
    a_sq = (a * a).sum(dim=1, keepdim=True)
    return (a_sq + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def knn_radii(features: torch.Tensor, k: int, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded).

    Args:
        features: [N, D] tensor, N > k.
        k: neighbourhood size.
        block_elements: distance-slab size bound (rows x N).

    Returns:
        [N] squared radii, same dtype and device as `features`.
    """
    n = features.shape[0]
    if k < 1 or k >= n:
        raise ValueError(f"k must be in [1, {n - 1}] for a set of {n} points, got {k}")
    sq = (features * features).sum(dim=1)
    rows = _rows_per_block(n, block_elements)
    radii = []
    for start in range(0, n, rows):
        d = _squared_distances(features[start:start + rows], features, sq)
        # k + 1 smallest: the point itself (distance 0) is among them, as in the reference implementation.
        radii.append(torch.topk(d, k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def manifold_membership(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, *,
                        block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> torch.Tensor:
    """Whether each query lies in at least one ball (points[j], radius sqrt(radii[j])).

    Args:
        queries: [Q, D] tensor.
        points: [M, D] ball centres.
        radii: [M] squared radii (from `knn_radii`).
        block_elements: distance-slab size bound (rows x M).

    Returns:
        [Q] bool tensor.
    """
    sq = (points * points).sum(dim=1)
    rows = _rows_per_block(points.shape[0], block_elements)
    inside = [(_squared_distances(queries[s:s + rows], points, sq) <= radii[None, :]).any(dim=1)
              for s in range(0, queries.shape[0], rows)]
    return torch.cat(inside)


def improved_precision_recall(ref_features: np.ndarray | torch.Tensor, gen_features: np.ndarray | torch.Tensor, *,
                              k: int = 5, block_elements: int = DEFAULT_BLOCK_ELEMENTS,
                              device: torch.device | str = "cpu",
                              dtype: torch.dtype = torch.float32,
                              ref_weights: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall of generated features against reference features.

    Args:
        ref_features: [N, D] real (reference) features, N > k.
        gen_features: [M, D] generated features, M > k.
        k: the k-th nearest neighbour sets each ball's radius (paper: 5).
        block_elements: bound on the elements of one distance slab; memory beyond the inputs is O(block_elements).
        device: where distances are computed.
        dtype: float32 (fast; both sets are centred on the reference mean first to limit cancellation) or float64.
        ref_weights: [N] weights of a reference re-weighted to another class mixture (``mixture.py``): recall is
            then the weighted share of reference points inside the generated manifold. Precision is unweighted:
            the real manifold is a support, which weights do not change.

    Returns:
        (precision, recall), each in [0, 1].
    """
    real = _as_tensor(ref_features, "ref_features", dtype, device)
    fake = _as_tensor(gen_features, "gen_features", dtype, device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: ref_features {real.shape[1]}, gen_features {fake.shape[1]}")
    # Distances are translation invariant; centring keeps ||a||^2 + ||b||^2 - 2ab from cancelling in float32.
    centre = real.mean(dim=0, keepdim=True)
    real, fake = real - centre, fake - centre
    with torch.no_grad():
        real_radii = knn_radii(real, k, block_elements=block_elements)
        fake_radii = knn_radii(fake, k, block_elements=block_elements)
        precision = manifold_membership(fake, real, real_radii, block_elements=block_elements)
        recall = manifold_membership(real, fake, fake_radii, block_elements=block_elements)
    if ref_weights is None:
        return float(precision.double().mean()), float(recall.double().mean())
    w = np.asarray(ref_weights, dtype=np.float64)
    if w.shape != (real.shape[0],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"ref_weights must be {real.shape[0]} non-negative values with a positive sum")
    return float(precision.double().mean()), float(w @ recall.cpu().numpy().astype(np.float64) / w.sum())
