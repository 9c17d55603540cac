"""A class-balanced linear probe: a K-way classifier of the data's own classes on any feature network.

The class judge (judge.py) reads a classifier's logits beside its features. The FID Inception network gives 2,048-d
pool features but no head for the data's K classes, so this module fits one: multinomial logistic regression on the
features of the training images, then measures it on held-out images.

The fit:
- Standardisation: each feature dimension is centred on the training mean and divided by the training standard
  deviation (population, ddof 0), floored at 1e-6 times the largest one so that a constant dimension does not
  divide by zero. `LinearProbe.logits` applies the same map to new features.
- Class balance: the training set is long-tailed, so each sample of class k weighs 1 / (K_present * n_k), where
  K_present is the number of classes with at least one training image: every present class carries the same total
  weight 1 / K_present, and the weights sum to 1. (``balanced=False`` gives every sample 1 / N instead.)
- Objective: sum_i w_i * cross-entropy_i + weight_decay / 2 * ||W||^2 (the bias is not penalised), over the present
  classes only. It is strictly convex in W; the bias is fixed up to a common shift, which the start at zero and
  the gradient (whose bias entries sum to zero) pin to sum 0.
- Optimiser: torch.optim.LBFGS in float64, full batch, strong-Wolfe line search, from W = 0, b = 0. Nothing is
  drawn at random, so for one input, one torch build and one thread count the weights are bit-identical run to
  run. The loss and its gradient are computed analytically over row blocks of about 4 Mi elements, standardising
  each block on the fly: memory is O(block + K * D) beyond the caller's features (never N x N, and no float64 copy
  of an N x D float32 input).
- A class with no training image is not fitted: its weight row is 0 and its bias `ABSENT_BIAS` (-1e9), so its
  logit is exactly -1e9 for every input and never wins against a fitted class (whose logits are finite and, for
  features anywhere near the data, many orders of magnitude above that). Its softmax probability underflows to 0.

Held-out metrics: `heldout_accuracy` is the share of held-out images whose argmax logit is their label;
`balanced_accuracy` the mean, over the classes with at least one held-out image, of the share of that class's
images predicted as it (per-class recall). A held-out class absent from training scores recall 0 there.

Cache: `load_or_train_probe` keys the fitted weights by a hash of the training features and labels and the fit's
settings, stored as .npz (no pickles) with a format string checked on load; held-out metrics are recomputed on the
held-out set given at each call, so the cached file does not depend on it.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._io import atomic_write, resolve_cache_dir, sha256_text
from .judge import feature_set_digest

__all__ = ["ABSENT_BIAS", "LinearProbe", "train_probe", "probe_cache_path", "load_or_train_probe"]

ABSENT_BIAS = -1e9
_FORMAT = "pdcbdm-probe-v1"
# Elements of one standardised float64 row block (32 MiB): bounds the fit's working memory for any N.
_BLOCK_ELEMENTS = 1 << 22
# Standard deviations below this share of the largest are floored to it (a constant dimension divides by it).
_STD_FLOOR = 1e-6


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """A fitted linear classifier of standardised features (see the module docstring).

    Args:
        weight: [K, D] float64 weights on standardised features; zero rows for classes absent from training.
        bias: [K] float64 biases; `ABSENT_BIAS` for classes absent from training.
        mean: [D] training feature mean.
        scale: [D] training feature standard deviation, floored.
        num_classes: K.
        heldout_accuracy: argmax accuracy on the held-out images; None when none were given.
        balanced_accuracy: mean per-class recall over the classes in the held-out images; None likewise.
        extractor: identity of the network whose features it reads.
    """

    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    num_classes: int
    heldout_accuracy: float | None = None
    balanced_accuracy: float | None = None
    extractor: str = ""

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def trained_classes(self) -> tuple[int, ...]:
        """The classes it was fitted on (those with at least one training image)."""
        return tuple(int(k) for k in np.flatnonzero(self.bias != ABSENT_BIAS))

    def logits(self, features: np.ndarray) -> np.ndarray:
        """[N, K] float64 logits: standardise with the training mean and scale, then the affine map."""
        feats = _check_features("features", features, self.dim)
        mean, scale = torch.from_numpy(self.mean), torch.from_numpy(self.scale)
        weight, bias = torch.from_numpy(self.weight), torch.from_numpy(self.bias)
        out = np.empty((len(feats), self.num_classes))
        for rows in _row_blocks(len(feats), self.dim):
            out[rows] = (_standardised(feats[rows], mean, scale) @ weight.T + bias).numpy()
        return out

    def predict(self, features: np.ndarray) -> np.ndarray:
        """[N] argmax class of each feature row."""
        return self.logits(features).argmax(axis=1)

    def summary(self) -> dict[str, float | int | str]:
        """Size, fitted classes and held-out accuracies (the ones measured), for logs and JSON."""
        out: dict[str, float | int | str] = {"probe_classes": self.num_classes, "probe_dim": self.dim,
                                             "probe_trained_classes": len(self.trained_classes),
                                             "probe_extractor": self.extractor}
        if self.heldout_accuracy is not None:
            out["probe_heldout_accuracy"] = self.heldout_accuracy
        if self.balanced_accuracy is not None:
            out["probe_balanced_accuracy"] = self.balanced_accuracy
        return out


# ---------------------------------------------------------------- input checks

def _row_blocks(n: int, d: int) -> Iterator[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(d, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _standardised(block: np.ndarray, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(block - mean) / scale as a new float64 tensor (torch.tensor copies: a read-only input stays untouched)."""
    return torch.tensor(block, dtype=torch.float64).sub_(mean).div_(scale)


def _check_features(name: str, features: np.ndarray, dim: int | None = None) -> np.ndarray:
    """`features` as a 2-D float array with `dim` columns and only finite values (checked block by block)."""
    feats = np.asarray(features)
    if feats.ndim != 2 or (dim is not None and feats.shape[1] != dim):
        want = "[N, D]" if dim is None else f"[N, {dim}]"
        raise ValueError(f"{name} must be {want}, got shape {feats.shape}")
    if not (np.issubdtype(feats.dtype, np.floating) or np.issubdtype(feats.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {feats.dtype}")
    for rows in _row_blocks(len(feats), feats.shape[1]):
        if not np.isfinite(feats[rows]).all():
            raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return feats


def _check_labels(name: str, labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """`labels` as int64 [n] in [0, num_classes)."""
    raw = np.asarray(labels)
    if raw.ndim != 1 or len(raw) != n:
        raise ValueError(f"{name} must be [{n}] (one label per feature row), got shape {raw.shape}")
    if raw.size and not np.issubdtype(raw.dtype, np.integer):
        if not np.issubdtype(raw.dtype, np.floating) or not np.all(raw == np.round(raw)):
            raise ValueError(f"{name} must hold integer class indices, got dtype {raw.dtype}")
    out = raw.astype(np.int64)
    if out.size and (out.min() < 0 or out.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values from {int(out.min())} to "
                         f"{int(out.max())}")
    return out


def _check_settings(num_classes: int, weight_decay: float, max_iter: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not np.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")


def _check_heldout(heldout_features: np.ndarray | None, heldout_labels: np.ndarray | None, dim: int,
                   num_classes: int) -> tuple[np.ndarray, np.ndarray] | None:
    if heldout_features is None and heldout_labels is None:
        return None
    if heldout_features is None or heldout_labels is None:
        missing = "heldout_features" if heldout_features is None else "heldout_labels"
        raise ValueError(f"{missing} is missing: give heldout_features and heldout_labels together, or neither")
    feats = _check_features("heldout_features", heldout_features, dim)
    return feats, _check_labels("heldout_labels", heldout_labels, len(feats), num_classes)


# ---------------------------------------------------------------- the fit

def _standardisation(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training mean and floored population std per dimension, in float64, block by block (two passes)."""
    total = np.zeros(feats.shape[1])
    for rows in _row_blocks(len(feats), feats.shape[1]):
        total += feats[rows].sum(axis=0, dtype=np.float64)
    mean = total / len(feats)
    squares = np.zeros(feats.shape[1])
    for rows in _row_blocks(len(feats), feats.shape[1]):
        squares += ((np.asarray(feats[rows], dtype=np.float64) - mean) ** 2).sum(axis=0)
    std = np.sqrt(squares / len(feats))
    top = float(std.max())
    return mean, np.maximum(std, _STD_FLOOR * (top if top > 0 else 1.0))


def _sample_weights(labels: np.ndarray, num_classes: int, balanced: bool) -> np.ndarray:
    """Per-sample weights summing to 1: each present class totals 1 / K_present, or 1 / N each when not balanced."""
    if not balanced:
        return np.full(len(labels), 1.0 / len(labels))
    counts = np.bincount(labels, minlength=num_classes)
    present = int((counts > 0).sum())
    return 1.0 / (present * counts[labels])


def _loss_and_grad(params: torch.Tensor, feats: np.ndarray, targets: np.ndarray, weights: np.ndarray,
                   mean: torch.Tensor, scale: torch.Tensor, weight_decay: float) -> tuple[float, torch.Tensor]:
    """Weighted cross-entropy plus weight_decay / 2 * ||W||^2, and its gradient, over row blocks.

    Args:
        params: flat [Kp * (D + 1)] float64: W [Kp, D] row-major, then b [Kp].
        feats: raw [N, D] features (standardised here, a block at a time).
        targets: [N] indices in [0, Kp) of the fitted classes.
        weights: [N] sample weights.
    """
    d = feats.shape[1]
    kp = params.numel() // (d + 1)
    w, b = params[: kp * d].view(kp, d), params[kp * d:]
    grad_w, grad_b = weight_decay * w, torch.zeros_like(b)
    loss = 0.5 * weight_decay * float((w * w).sum())
    for rows in _row_blocks(len(feats), d):
        x = _standardised(feats[rows], mean, scale)
        y, sw = torch.from_numpy(targets[rows]), torch.from_numpy(weights[rows])
        log_p = torch.log_softmax(x @ w.T + b, dim=1)
        loss -= float((sw * log_p.gather(1, y[:, None])[:, 0]).sum())
        residual = log_p.exp()
        residual[torch.arange(len(y)), y] -= 1.0
        residual *= sw[:, None]  # d loss / d logits
        grad_w += residual.T @ x
        grad_b += residual.sum(dim=0)
    return loss, torch.cat([grad_w.reshape(-1), grad_b])


def _lbfgs(objective: Callable[[torch.Tensor], tuple[float, torch.Tensor]], size: int,
           max_iter: int) -> torch.Tensor:
    """Minimise `objective` (value, gradient) from zeros with full-batch L-BFGS (strong Wolfe), in float64."""
    params = torch.zeros(size, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        value, grad = objective(params.detach())
        params.grad = grad
        return torch.tensor(value, dtype=torch.float64)

    optimiser.step(closure)
    return params.detach()


def _heldout_scores(probe: LinearProbe, heldout: tuple[np.ndarray, np.ndarray] | None) -> LinearProbe:
    """`probe` with its held-out accuracies measured on `heldout` (or None for both without one)."""
    if heldout is None or len(heldout[1]) == 0:
        return _with_scores(probe, None, None)
    feats, labels = heldout
    correct = probe.predict(feats) == labels
    recalls = [float(correct[labels == k].mean()) for k in np.unique(labels)]
    return _with_scores(probe, float(correct.mean()), float(np.mean(recalls)))


def _with_scores(probe: LinearProbe, accuracy: float | None, balanced: float | None) -> LinearProbe:
    return LinearProbe(probe.weight, probe.bias, probe.mean, probe.scale, probe.num_classes, accuracy, balanced,
                       probe.extractor)


def train_probe(train_features: np.ndarray, train_labels: np.ndarray, num_classes: int, *,
                heldout_features: np.ndarray | None = None, heldout_labels: np.ndarray | None = None,
                weight_decay: float = 1e-3, max_iter: int = 200, seed: int = 0, extractor: str = "",
                balanced: bool = True) -> LinearProbe:
    """Fit the class-balanced linear probe (module docstring) and measure it on held-out images.

    Args:
        train_features: [N, D] features of the training images (any real dtype; read in float64).
        train_labels: [N] their classes in [0, K); at least 2 classes must be present.
        num_classes: K; classes without a training image get the `ABSENT_BIAS` rule.
        heldout_features: optional [M, D] features of images not trained on.
        heldout_labels: their [M] classes (given together with heldout_features).
        weight_decay: L2 penalty on W (on standardised features), >= 0; at 0, W of separable classes grows until
            max_iter stops it.
        max_iter: L-BFGS iterations at most.
        seed: accepted so callers can pass one seed everywhere; the fit draws nothing at random and ignores it.
        extractor: identity of the feature network (recorded).
        balanced: class-balanced sample weights (default); False weighs every sample equally (for comparison).
    """
    del seed  # deterministic fit: zero start, full batch
    _check_settings(num_classes, weight_decay, max_iter)
    feats = _check_features("train_features", train_features)
    labels = _check_labels("train_labels", train_labels, len(feats), num_classes)
    heldout = _check_heldout(heldout_features, heldout_labels, feats.shape[1], num_classes)
    present = np.flatnonzero(np.bincount(labels, minlength=num_classes))
    if len(present) < 2:
        raise ValueError(f"train_labels must contain at least 2 classes, got {len(present)} "
                         f"({present.tolist()})")
    mean, scale = _standardisation(feats)
    targets = np.searchsorted(present, labels)  # class index among the fitted classes
    weights = _sample_weights(labels, num_classes, balanced)
    d, kp = feats.shape[1], len(present)
    mean_t, scale_t = torch.from_numpy(mean), torch.from_numpy(scale)
    params = _lbfgs(lambda p: _loss_and_grad(p, feats, targets, weights, mean_t, scale_t, float(weight_decay)),
                    kp * (d + 1), int(max_iter)).numpy()
    weight, bias = np.zeros((num_classes, d)), np.full(num_classes, ABSENT_BIAS)
    weight[present], bias[present] = params[: kp * d].reshape(kp, d), params[kp * d:]
    probe = LinearProbe(weight, bias, mean, scale, int(num_classes), extractor=extractor)
    return _heldout_scores(probe, heldout)


# ---------------------------------------------------------------- cache

def probe_cache_path(data_digest: str, num_classes: int, weight_decay: float, *, max_iter: int = 200,
                     balanced: bool = True, extractor: str = "",
                     cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache file of the probe fitted on the training set `data_digest` (`feature_set_digest` of the features,
    None and the int64 labels) with these settings."""
    return _cache_path(_cache_key(data_digest, num_classes, weight_decay, max_iter, balanced, extractor), cache_dir)


def _cache_key(data_digest: str, num_classes: int, weight_decay: float, max_iter: int, balanced: bool,
               extractor: str) -> str:
    return sha256_text(_FORMAT, data_digest, str(int(num_classes)), repr(float(weight_decay)), str(int(max_iter)),
                       str(bool(balanced)), extractor)


def _cache_path(key: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    folder = resolve_cache_dir(cache_dir) / "probe"
    folder.mkdir(exist_ok=True)
    return folder / f"probe-{key[:24]}.npz"


def _save(path: Path, probe: LinearProbe, key: str) -> None:
    arrays = {"format": np.array(_FORMAT), "key": np.array(key), "weight": probe.weight, "bias": probe.bias,
              "mean": probe.mean, "scale": probe.scale, "num_classes": np.array(probe.num_classes),
              "extractor": np.array(probe.extractor)}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _load(path: Path, key: str, num_classes: int, dim: int) -> LinearProbe | None:
    """The probe stored at `path` under `key`, or None for a missing, unreadable, foreign or mismatched file."""
    # Our own file handle: np.load leaves the file it opened unclosed when it rejects the bytes.
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            if str(data["format"]) != _FORMAT or str(data["key"]) != key:
                return None
            probe = LinearProbe(data["weight"].astype(np.float64), data["bias"].astype(np.float64),
                                data["mean"].astype(np.float64), data["scale"].astype(np.float64),
                                int(data["num_classes"]), extractor=str(data["extractor"]))
    except (OSError, ValueError, KeyError, EOFError, AttributeError, TypeError, zipfile.BadZipFile):
        return None  # AttributeError/TypeError: a plain .npy array has no context manager or file list
    shapes_ok = (probe.num_classes == num_classes and probe.weight.shape == (num_classes, dim)
                 and probe.bias.shape == (num_classes,) and probe.mean.shape == probe.scale.shape == (dim,))
    return probe if shapes_ok else None


def load_or_train_probe(train_features: np.ndarray, train_labels: np.ndarray, num_classes: int, *,
                        heldout_features: np.ndarray | None = None, heldout_labels: np.ndarray | None = None,
                        weight_decay: float = 1e-3, max_iter: int = 200, seed: int = 0, extractor: str = "",
                        balanced: bool = True,
                        cache_dir: str | os.PathLike[str] | None = None) -> LinearProbe:
    """`train_probe`, fitted once per (training features and labels, num_classes, weight_decay, max_iter, balanced,
    extractor) and then read from the cache folder's "probe" subfolder (atomic .npz writes, no pickles). A file
    that cannot be read, has another format or key, or the wrong shapes is ignored and rewritten. The held-out
    accuracies are measured afresh on the held-out set of each call. Arguments as `train_probe`."""
    _check_settings(num_classes, weight_decay, max_iter)
    feats = _check_features("train_features", train_features)
    labels = _check_labels("train_labels", train_labels, len(feats), num_classes)
    heldout = _check_heldout(heldout_features, heldout_labels, feats.shape[1], num_classes)
    key = _cache_key(feature_set_digest(feats, None, labels), num_classes, weight_decay, max_iter, balanced,
                     extractor)
    path = _cache_path(key, cache_dir)
    cached = _load(path, key, num_classes, feats.shape[1]) if path.is_file() else None
    if cached is not None:
        return _heldout_scores(cached, heldout)
    probe = train_probe(feats, labels, num_classes, heldout_features=heldout_features,
                        heldout_labels=heldout_labels, weight_decay=weight_decay, max_iter=max_iter, seed=seed,
                        extractor=extractor, balanced=balanced)
    _save(path, probe, key)
    return probe
