"""Frechet Inception Distance (Heusel et al. 2017), the paper's main fidelity metric (METHOD.md, "Metrics").

FID = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)), with (mu, Sigma) the mean and covariance
of feature vectors (Inception pool3, or the digits network's embedding). Everything is computed in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch

__all__ = ["as_float64", "feature_statistics", "frechet_distance", "fid_from_features"]

# Relative error ||X X - A||_F / ||A||_F above which the plain square root is distrusted and the offset retried.
_SQRTM_RTOL = 1e-5
# Largest imaginary part on the diagonal of the square root that is still taken for round-off.
_IMAG_ATOL = 1e-3


def as_float64(array: np.ndarray | torch.Tensor, name: str, ndim: int) -> np.ndarray:
    """Return `array` as a float64 numpy array with `ndim` dimensions, all values finite.

    Args:
        array: numpy array or torch tensor (any device).
        name: argument name used in error messages.
        ndim: required number of dimensions.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().to(torch.float64).numpy()
    out = np.asarray(array, dtype=np.float64)
    if out.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {out.shape}")
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def feature_statistics(features: np.ndarray | torch.Tensor,
                       weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of N feature vectors, plain or weighted.

    Plain: the mean and the covariance with divisor N - 1. Weighted (``weights`` w >= 0, normalised to sum 1; the
    class-mixture weights of ``mixture.py``): mu = sum_i w_i x_i and the reliability-weighted unbiased covariance
    sum_i w_i (x_i - mu)(x_i - mu)^T / (1 - sum_i w_i^2), which for w_i = 1 / N is the plain one.

    Args:
        features: [N, D] features, N >= 2.
        weights: [N] non-negative weights, or None.

    Returns:
        (mu [D], sigma [D, D]) in float64.
    """
    x = as_float64(features, "features", 2)
    if x.shape[0] < 2:
        raise ValueError(f"features needs at least 2 rows to estimate a covariance, got {x.shape[0]}")
    if weights is None:
        return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
    w = as_float64(weights, "weights", 1)
    if w.shape[0] != x.shape[0] or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {x.shape[0]} non-negative values with a positive sum")
    w = w / w.sum()
    spread = 1.0 - float(w @ w)
    if spread <= 0.0:
        raise ValueError("weights put all mass on one row: no covariance can be estimated")
    mu = w @ x
    centred = x - mu
    return mu, (centred * w[:, None]).T @ centred / spread


def _sqrtm_with_error(a: np.ndarray) -> tuple[np.ndarray, float]:
    """scipy's matrix square root and its relative residual (inf when the result is not finite)."""
    with warnings.catch_warnings():
        # A singular product (fewer samples than dimensions) warns; the residual check below decides instead.
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(a)
    if not np.isfinite(root).all():
        return root, float("inf")
    scale = max(float(np.linalg.norm(a, "fro")), np.finfo(np.float64).tiny)
    return root, float(np.linalg.norm(root @ root - a, "fro")) / scale


def frechet_distance(mu1: np.ndarray | torch.Tensor, sigma1: np.ndarray | torch.Tensor,
                     mu2: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor, *,
                     eps: float = 1e-6) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    The square root of sigma1 @ sigma2 comes from scipy.linalg.sqrtm. When it is not finite or inaccurate (a
    near-singular product, e.g. fewer samples than feature dimensions), it is recomputed with `eps` added to both
    diagonals, the usual fallback of the reference FID code. Imaginary round-off is dropped; a large imaginary part
    raises ValueError.

    Args:
        mu1, mu2: [D] means.
        sigma1, sigma2: [D, D] covariances.
        eps: diagonal offset of the fallback.

    Returns:
        The distance as a Python float (>= 0 up to round-off).
    """
    m1, m2 = as_float64(mu1, "mu1", 1), as_float64(mu2, "mu2", 1)
    s1, s2 = as_float64(sigma1, "sigma1", 2), as_float64(sigma2, "sigma2", 2)
    d = m1.shape[0]
    for name, value in (("mu2", m2), ("sigma1", s1), ("sigma2", s2)):
        expected = (d,) if name.startswith("mu") else (d, d)
        if value.shape != expected:
            raise ValueError(f"{name} has shape {value.shape}, expected {expected} to match mu1's dimension {d}")
    root, err = _sqrtm_with_error(s1 @ s2)
    if err > _SQRTM_RTOL:
        offset = np.eye(d) * eps
        root, err = _sqrtm_with_error((s1 + offset) @ (s2 + offset))
        if not np.isfinite(err):
            raise ValueError(f"the covariance product has no finite square root even with eps={eps} added")
    if np.iscomplexobj(root):
        worst = float(np.abs(np.diagonal(root).imag).max())
        if worst > _IMAG_ATOL:
            raise ValueError(f"square root of sigma1 @ sigma2 has an imaginary component of {worst:.3g}")
        root = root.real
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(root))


def fid_from_features(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor, *,
                      weights1: np.ndarray | None = None, weights2: np.ndarray | None = None) -> float:
    """FID between two feature sets [N1, D] and [N2, D] (each N >= 2); either side may carry row weights
    (``feature_statistics``: a reference re-weighted to another class mixture)."""
    mu1, sigma1 = feature_statistics(features1, weights1)
    mu2, sigma2 = feature_statistics(features2, weights2)
    return frechet_distance(mu1, sigma1, mu2, sigma2)
