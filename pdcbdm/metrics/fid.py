"""Frechet Inception Distance (Heusel et al. 2017), the paper's main fidelity metric (docs/method.md, "Metrics").

FID = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)), with (mu, Sigma) the mean and covariance
of feature vectors (Inception pool3, or the digits network's embedding). Everything is computed in float64.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .mixture import mixture_weights

__all__ = ["as_float64", "feature_statistics", "GaussianStats", "ReferenceStatistics", "frechet_distance",
           "frechet_distance_of", "fid_from_features", "fid_to_reference"]


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


def feature_statistics(features: np.ndarray | torch.Tensor, weights: np.ndarray | None = None,
                       device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of N feature vectors, plain or weighted.

    Plain: the mean and the covariance with divisor N - 1. Weighted (``weights`` w >= 0, normalised to sum 1; the
    class-mixture weights of ``mixture.py``): mu = sum_i w_i x_i and the reliability-weighted unbiased covariance
    sum_i w_i (x_i - mu)(x_i - mu)^T / (1 - sum_i w_i^2), which for w_i = 1 / N is the plain one.

    Args:
        features: [N, D] features, N >= 2.
        weights: [N] non-negative weights, or None.
        device: where the N x D x D product (the cost) runs: on a GPU (the trial's) torch in float64, the results
            brought back as numpy; None or the CPU: numpy, whose BLAS forms X^T X by a symmetric rank-k update,
            faster there than torch's float64 matmul (docs/results.md, "Metrics").

    Returns:
        (mu [D], sigma [D, D]) in float64.
    """
    if device is not None and torch.device(device).type != "cpu":
        return _torch_statistics(features, weights, torch.device(device))
    x = as_float64(features, "features", 2)
    if x.shape[0] < 2:
        raise ValueError(f"features needs at least 2 rows to estimate a covariance, got {x.shape[0]}")
    if weights is None:
        return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
    w = _normalised_weights(weights, x.shape[0])
    mu = w @ x
    centred = x - mu
    return mu, (centred * w[:, None]).T @ centred / (1.0 - float(w @ w))


def _normalised_weights(weights: np.ndarray, rows: int) -> np.ndarray:
    """``weights`` as float64 summing to 1; ValueError unless ``rows`` non-negative values with a positive sum
    that leave a covariance to estimate (not all mass on one row)."""
    w = as_float64(weights, "weights", 1)
    if w.shape[0] != rows or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {rows} non-negative values with a positive sum")
    w = w / w.sum()
    if 1.0 - float(w @ w) <= 0.0:
        raise ValueError("weights put all mass on one row: no covariance can be estimated")
    return w


def _torch_statistics(features: np.ndarray | torch.Tensor, weights: np.ndarray | None,
                      device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """``feature_statistics`` in float64 on ``device``: the same estimates, one [D, N] x [N, D] matmul there."""
    x = torch.as_tensor(features).to(device=device, dtype=torch.float64)
    if x.dim() != 2:
        raise ValueError(f"features must have 2 dimension(s), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features contains NaN or infinite values")
    if x.shape[0] < 2:
        raise ValueError(f"features needs at least 2 rows to estimate a covariance, got {x.shape[0]}")
    if weights is None:
        mu = x.mean(dim=0)
        centred = x - mu
        sigma = centred.T @ centred / (x.shape[0] - 1)
    else:
        w_np = _normalised_weights(weights, x.shape[0])
        w = torch.from_numpy(w_np).to(device)
        mu = w @ x
        centred = x - mu
        sigma = (centred * w[:, None]).T @ centred / (1.0 - float(w_np @ w_np))
    return mu.cpu().numpy(), ((sigma + sigma.T) / 2).cpu().numpy()


@dataclass(frozen=True, eq=False)
class GaussianStats:
    """The mean and covariance of a feature set, with what the Frechet distance needs of it computed once: the
    symmetric square root of the covariance (``root``). A reference's statistics are kept and reused by every
    evaluation against it (``ReferenceStatistics``)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray | torch.Tensor, weights: np.ndarray | None = None,
           device: torch.device | str | None = None) -> GaussianStats:
        """The statistics of ``features`` (``feature_statistics``; on ``device`` when given)."""
        return cls(*feature_statistics(features, weights, device))

    @functools.cached_property
    def root(self) -> torch.Tensor:
        """Sigma^(1/2): V diag(sqrt(max(l, 0))) V^T from the symmetric eigendecomposition (float64, CPU)."""
        sym = torch.from_numpy(self.sigma)
        values, vectors = torch.linalg.eigh((sym + sym.T) / 2)
        return (vectors * values.clamp_min(0).sqrt()) @ vectors.T

    @functools.cached_property
    def trace(self) -> float:
        return float(np.trace(self.sigma))


def frechet_distance_of(reference: GaussianStats, other: GaussianStats,
                        device: torch.device | str | None = None) -> float:
    """Frechet distance of two Gaussians, with Tr (S1 S2)^(1/2) = Tr (R1 S2 R1)^(1/2) for R1 = S1^(1/2) (both
    symmetric positive semi-definite): with the reference's root cached, one symmetric eigendecomposition per call,
    in float64 on ``device`` (the trial's; default CPU). Round-off eigenvalues below 0 are taken as 0, so rank-
    deficient covariances (fewer samples than dimensions) stay finite."""
    device = torch.device(device or "cpu")
    r1 = reference.root.to(device)
    product = r1 @ torch.from_numpy(other.sigma).to(device) @ r1
    values = torch.linalg.eigvalsh((product + product.T) / 2)
    tr_root = float(values.clamp_min(0).sqrt().sum())
    diff = reference.mu - other.mu
    return float(diff @ diff + reference.trace + other.trace - 2.0 * tr_root)


class ReferenceStatistics:
    """A reference set's Gaussian statistics, whole and per class group, each computed on first use and kept:
    the proxy evaluations of a trial, its final evaluation and its floors all compare with one reference, whose
    covariance (50k x 2,048 features for CIFAR) and root must not be recomputed per evaluation.

    Args:
        features: [N, D] reference features.
        labels: [N] their classes.
        shares: the class mixture the reference stands for (``mixture.py``), renormalised over a group; None: its
            own proportions.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, shares: np.ndarray | None = None) -> None:
        self.features, self.labels, self.shares = features, np.asarray(labels), shares
        self._cache: dict[tuple[int, ...] | None, GaussianStats | None] = {}

    def of(self, classes: Sequence[int] | None = None,
           device: torch.device | str | None = None) -> GaussianStats | None:
        """The statistics of the rows whose class is in ``classes`` (None: every row); None with fewer than 2.
        Computed on ``device`` (``feature_statistics``) by the first call that asks for them, then kept."""
        key = None if classes is None else tuple(sorted(int(c) for c in classes))
        if key not in self._cache:
            rows = np.ones(len(self.labels), bool) if key is None else np.isin(self.labels, key)
            self._cache[key] = (None if rows.sum() < 2 else
                                GaussianStats.of(_rows(self.features, rows),
                                                 mixture_weights(self.labels[rows], self.shares), device))
        return self._cache[key]


def _rows(features: np.ndarray | torch.Tensor, mask: np.ndarray) -> np.ndarray | torch.Tensor:
    """The rows of ``features`` where ``mask`` is True, a tensor staying a tensor on its device."""
    if isinstance(features, torch.Tensor):
        return features[torch.from_numpy(mask).to(features.device)]
    return np.asarray(features)[mask]


def frechet_distance(mu1: np.ndarray | torch.Tensor, sigma1: np.ndarray | torch.Tensor,
                     mu2: np.ndarray | torch.Tensor, sigma2: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2) (``frechet_distance_of``).

    Args:
        mu1, mu2: [D] means.
        sigma1, sigma2: [D, D] covariances.

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
    return frechet_distance_of(GaussianStats(m1, s1), GaussianStats(m2, s2))


def fid_from_features(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor, *,
                      weights1: np.ndarray | None = None, weights2: np.ndarray | None = None) -> float:
    """FID between two feature sets [N1, D] and [N2, D] (each N >= 2); either side may carry row weights
    (``feature_statistics``: a reference re-weighted to another class mixture)."""
    return frechet_distance_of(GaussianStats.of(features2, weights2), GaussianStats.of(features1, weights1))


def fid_to_reference(features: np.ndarray | torch.Tensor, reference: ReferenceStatistics,
                     classes: Sequence[int] | None = None, labels: np.ndarray | None = None,
                     device: torch.device | str | None = None) -> float | None:
    """FID of ``features`` (those of ``classes`` when given, by ``labels``) against the cached statistics of the
    same classes of ``reference``; None when either side has fewer than 2 rows there. Both sides' statistics and
    the distance are computed on ``device`` (None: the CPU; ``feature_statistics``)."""
    if classes is not None:
        features = _rows(features, np.isin(np.asarray(labels), list(classes)))
    ref = reference.of(classes, device)
    if ref is None or len(features) < 2:
        return None
    return frechet_distance_of(ref, GaussianStats.of(features, device=device), device)
