"""Target-label distributions for CBDM's regulariser (Eq. 9) and PD-CBDM's re-weighting (Eq. 12)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from pdcbdm.config import LABEL_DIST_NAMES, LABEL_DIST_POWERS, parse_label_dist

KINDS = (*LABEL_DIST_NAMES, "power")


def target_distribution(counts: Sequence[int], kind: str, power: float | None = None) -> Tensor:
    """Probabilities q(k) over classes, float64, summing to 1.

    - ``cbdm``: q(k) = n_k / N, the empirical label frequency CBDM draws y' from.
    - ``inverted``: Eq. 12, q'(k) = (1/q(k)) / sum_j (1/q(j)), i.e. proportional to 1/n_k (tail drawn more often).
    - ``uniform``: 1/K.
    - ``power``: q_s(k) ∝ n_k^(-s) with s = ``power`` (s = -1 is cbdm, 0 uniform, 1 inverted).
    Classes with no training image get probability 0 under every kind (1/0 is not a weight).
    """
    n = torch.as_tensor(list(counts), dtype=torch.float64)
    if n.dim() != 1 or len(n) == 0 or bool((n < 0).any()) or float(n.sum()) <= 0:
        raise ValueError(f"counts must be a non-empty list of non-negative class counts with a positive sum, "
                         f"got {list(counts)}")
    s = LABEL_DIST_POWERS.get(kind)
    if kind == "power":
        if power is None:
            raise ValueError("target_distribution(kind='power') needs power=s")
        s = float(power)
    elif s is None:
        raise ValueError(f"unknown target distribution kind {kind!r}; valid: {', '.join(KINDS)}")
    present = n > 0
    weights = torch.zeros_like(n)
    weights[present] = n[present] ** (-s)
    return weights / weights.sum()


def from_spec(counts: Sequence[int], spec: str) -> Tensor:
    """q for a ``loss.label_dist`` string (``cbdm``, ``inverted``, ``uniform`` or ``power:S``)."""
    return target_distribution(counts, "power", parse_label_dist(spec))


def sample_labels(probs: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw n labels i.i.d. from ``probs``, where ``generator`` lives (else where ``probs`` do): a seeded draw
    depends on the generator's device only, and a device generator draws without a host round trip."""
    where = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(where, torch.float32), n, replacement=True, generator=generator)
