"""Which guidance value a network is reported at, and the headline metrics a search ranks and tables show."""

from __future__ import annotations

from typing import Sequence

from .evaluator import GuidanceResult

__all__ = ["best_by_fid", "HEADLINE_KEYS", "headline"]


def best_by_fid(results: Sequence[GuidanceResult], min_consistency: float = 0.0) -> GuidanceResult:
    """The guidance value with the lowest FID among those whose class consistency (``consistency_mean``, the
    judge's share of readable samples drawn as their own class) reaches ``min_consistency``; all values when none
    does or when the extractor has no judge (Inception). Why: FID compares the whole sample set with the
    reference and is blind to labels, so a sample of the wrong class costs it nothing: the lowest FID can fall at
    a w whose samples are often of another class (docs/evaluation.md, "The best guidance scale")."""
    if not results:
        raise ValueError("no guidance results to choose from")

    def consistent(r: GuidanceResult) -> bool:
        value = r.metrics.get("consistency_mean")
        return value is None or value >= min_consistency

    pool = [r for r in results if consistent(r)] or list(results)
    return min(pool, key=lambda r: r.metrics["fid"])


HEADLINE_KEYS = ("fid", "is_mean", "precision", "recall", "f8", "f1_8", "fid_head", "fid_tail", "kid", "kid_head",
                 "kid_tail", "consistency_mean", "consistency_head", "consistency_tail", "tail_to_head_confusion",
                 "reject_rate", "reject_rate_head", "reject_rate_tail", "fid_few", "kid_few", "consistency_few",
                 "memorisation", "memorisation_tail")


def headline(result: GuidanceResult) -> dict[str, float | None]:
    """The metrics a search ranks and tables show, from one guidance value's scores, each with its noise floor
    (``<metric>_floor``) and the floor's spread over the real draws (``<metric>_floor_std``)."""
    out = {k: result.metrics.get(k) for k in HEADLINE_KEYS}
    out.update({f"{k}_floor{s}": result.metrics.get(f"{k}_floor{s}") for k in HEADLINE_KEYS for s in ("", "_std")})
    return out
