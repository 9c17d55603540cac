"""Inception Score (Salimans et al. 2016): IS = exp(E_x KL(p(y|x) || p(y))), docs/method.md "Metrics" (10 splits).

With the FID Inception network the class posteriors p(y|x) come from its 1008-way logits; with the digits network
from its 10-way logits (a domain IS, comparable only between runs scored by the same network).
"""

from __future__ import annotations

import numpy as np
import torch

from .fid import as_float64

__all__ = ["inception_score"]


def _split_score(log_p: np.ndarray) -> float:
    """exp of the mean KL(p(y|x) || p(y)) over the rows of one split's log-posteriors."""
    p = np.exp(log_p)
    log_marginal = np.log(np.maximum(p.mean(axis=0), np.finfo(np.float64).tiny))
    kl = (p * (log_p - log_marginal[None, :])).sum(axis=1)
    return float(np.exp(kl.mean()))


def inception_score(logits: np.ndarray | torch.Tensor, splits: int = 10, *,
                    shuffle_seed: int | None = 0) -> tuple[float, float]:
    """Inception Score of N samples from their classifier logits.

    Args:
        logits: [N, C] unnormalised class scores (softmax gives p(y|x)); N >= splits.
        splits: number of equal parts the samples are cut into; IS is computed per part.
        shuffle_seed: the rows are permuted with this seed before splitting, so samples generated class by class
            do not make single-class splits (torch-fidelity does the same); None keeps the given order.

    Returns:
        (mean, std) over the splits; std uses the population formula (divisor `splits`), as the reference code.
    """
    x = as_float64(logits, "logits", 2)
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive int, got {splits!r}")
    if x.shape[0] < splits:
        raise ValueError(f"logits has {x.shape[0]} rows, fewer than splits={splits}")
    if shuffle_seed is not None:
        x = x[np.random.default_rng(shuffle_seed).permutation(x.shape[0])]
    shifted = x - x.max(axis=1, keepdims=True)  # log-softmax, stable for large logits
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    scores = [_split_score(part) for part in np.array_split(log_p, splits)]
    return float(np.mean(scores)), float(np.std(scores))
