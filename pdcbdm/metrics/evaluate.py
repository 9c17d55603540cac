"""One call that scores generated samples against reference statistics: `evaluate_features`.

All metrics of METHOD.md "Metrics" (FID, IS, improved precision/recall with k = 5, PRD F_8 / F_1/8) plus the
long-tail diagnostics of class_metrics.py, from features computed once by a FeatureExtractor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .class_metrics import (check_split, class_consistency, group_fid, group_mean, per_class_fid,
                            tail_to_head_confusion)
from .fid import as_float64, fid_from_features
from .inception_score import inception_score
from .prd import prd_f_scores
from .precision_recall import improved_precision_recall

__all__ = ["FeatureSet", "EvalResult", "evaluate_features", "PRD_CLUSTERS_PER_CLASS"]

PRD_CLUSTERS_PER_CLASS = 20


@dataclass(frozen=True)
class FeatureSet:
    """Features of one image set, the input of every metric.

    Args:
        features: [N, D] features (stored as float64 numpy).
        logits: [N, C] classifier logits of the same network, or None when it has no classifier head.
        labels: [N] int labels (generated sets: the class each sample was generated for).
        extractor: identity of the FeatureExtractor that made them ("" if unknown); sets from different
            extractors are refused by `evaluate_features`.
        logits_note: why `logits` is None, reported as the Inception Score's unavailability reason.
    """

    features: np.ndarray
    logits: np.ndarray | None
    labels: np.ndarray
    extractor: str = ""
    logits_note: str = ""

    def __post_init__(self) -> None:
        feats = as_float64(self.features, "features", 2)
        labels = np.asarray(self.labels.cpu() if isinstance(self.labels, torch.Tensor) else self.labels)
        if labels.ndim != 1 or labels.shape[0] != feats.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-d integer array with {feats.shape[0]} entries (one per feature "
                             f"row), got dtype {labels.dtype} and shape {labels.shape}")
        logits = None if self.logits is None else as_float64(self.logits, "logits", 2)
        if logits is not None and logits.shape[0] != feats.shape[0]:
            raise ValueError(f"logits has {logits.shape[0]} rows but features has {feats.shape[0]}")
        object.__setattr__(self, "features", feats)
        object.__setattr__(self, "labels", labels.astype(np.int64))
        object.__setattr__(self, "logits", logits)

    @classmethod
    def coerce(cls, value: FeatureSet | Sequence[Any]) -> FeatureSet:
        """Accept a FeatureSet or a plain (features, logits | None, labels) tuple."""
        if isinstance(value, FeatureSet):
            return value
        if len(value) != 3:
            raise ValueError(f"a feature set tuple must be (features, logits | None, labels), got {len(value)} items")
        return cls(*value)

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass
class EvalResult:
    """Every metric of one evaluation. None means "not computable here"; the matching *_note says why."""

    fid: float
    inception_score: tuple[float, float] | None
    inception_score_note: str | None
    precision: float
    recall: float
    f8: float
    f1_8: float
    fid_head: float | None
    fid_tail: float | None
    per_class: list[dict[str, Any]] = field(default_factory=list)
    consistency_mean: float | None = None
    consistency_head: float | None = None
    consistency_tail: float | None = None
    tail_to_head_confusion: float | None = None
    consistency_note: str | None = None
    num_generated: int = 0
    num_reference: int = 0
    extractor: str = ""

    def to_dict(self) -> dict[str, float | int | str | None]:
        """Flat, JSON-friendly view: Python floats/ints/strings/None only; per-class rows become fid_class_{k},
        consistency_class_{k}, n_class_{k}; the IS pair becomes is_mean / is_std."""
        flat = {k: v for k, v in asdict(self).items() if k not in ("per_class", "inception_score")}
        flat["is_mean"], flat["is_std"] = self.inception_score if self.inception_score else (None, None)
        for row in self.per_class:
            k = row["label"]
            flat[f"fid_class_{k}"] = row["fid"]
            flat[f"consistency_class_{k}"] = row["consistency"]
            flat[f"n_class_{k}"] = row["n"]
        return {k: _plain(v) for k, v in flat.items()}


def _plain(value: Any) -> float | int | str | None:
    """numpy scalars to Python numbers; everything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _check_pair(gen: FeatureSet, ref: FeatureSet, num_classes: int) -> None:
    if gen.features.shape[1] != ref.features.shape[1]:
        raise ValueError(f"feature dims differ: gen {gen.features.shape[1]}, ref {ref.features.shape[1]}")
    if gen.extractor and ref.extractor and gen.extractor != ref.extractor:
        raise ValueError(f"gen and ref come from different feature extractors: {gen.extractor!r} vs "
                         f"{ref.extractor!r}")
    for name, labels in (("gen.labels", gen.labels), ("ref.labels", ref.labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}) (num_classes), got min {labels.min()}, "
                             f"max {labels.max()}")


def _inception_score(gen: FeatureSet, splits: int) -> tuple[tuple[float, float] | None, str | None]:
    """IS from the generated logits, or None plus the reason; never estimated from other features."""
    if gen.logits is None:
        return None, gen.logits_note or "the feature extractor has no classifier logits"
    if len(gen) < splits:
        return None, f"{len(gen)} generated samples are fewer than the {splits} IS splits"
    return inception_score(gen.logits, splits), None


def _consistency(gen: FeatureSet, num_classes: int, head: tuple[int, ...],
                 tail: tuple[int, ...]) -> tuple[list[float | None], dict[str, Any]]:
    """Per-class consistency and its summaries; all None when the logits do not classify the data set's classes."""
    if gen.logits is None or gen.logits.shape[1] != num_classes:
        width = None if gen.logits is None else gen.logits.shape[1]
        note = (f"no classifier over the {num_classes} data classes (logits width {width}); "
                "class consistency needs the digits network or another matching classifier")
        return [None] * num_classes, {"consistency_note": note}
    predicted = gen.logits.argmax(axis=1)
    per_class = class_consistency(gen.labels, predicted, num_classes)
    return per_class, {
        "consistency_mean": group_mean(per_class, range(num_classes)),
        "consistency_head": group_mean(per_class, head),
        "consistency_tail": group_mean(per_class, tail),
        "tail_to_head_confusion": tail_to_head_confusion(gen.labels, predicted, head, tail),
    }


def _per_class_rows(gen: FeatureSet, ref: FeatureSet, num_classes: int,
                    consistency: list[float | None]) -> list[dict[str, Any]]:
    fids = per_class_fid(gen.features, gen.labels, ref.features, ref.labels, num_classes)
    counts = np.bincount(gen.labels, minlength=num_classes)
    return [{"label": k, "fid": fids[k], "consistency": consistency[k], "n": int(counts[k])}
            for k in range(num_classes)]


def evaluate_features(gen: FeatureSet | Sequence[Any], ref: FeatureSet | Sequence[Any], *,
                      head_classes: Sequence[int], tail_classes: Sequence[int], num_classes: int, k: int = 5,
                      prd_runs: int = 10, seed: int = 0, prd_clusters: int | None = None, prd_n_init: int = 10,
                      is_splits: int = 10, device: torch.device | str = "cpu") -> EvalResult:
    """Score generated features against reference features with every metric of METHOD.md "Metrics".

    Args:
        gen: generated samples' FeatureSet (labels = the class each was generated for) or a 3-tuple.
        ref: reference FeatureSet (the full balanced training set in the paper), e.g. from `reference_features`.
        head_classes, tail_classes: disjoint head/tail split (as the PD loss's, Eq. 10) for group FID/consistency.
        num_classes: K, the data set's number of classes.
        k: neighbourhood size of improved precision/recall (paper: 5).
        prd_runs: k-means runs averaged for PRD (paper: 10).
        seed: seed of the PRD clusterings.
        prd_clusters: PRD clusters; None = 20 x the number of distinct classes in `gen` (paper).
        prd_n_init: k-means++ initialisations per PRD run (10 as Sajjadi et al.'s code; fewer is faster).
        is_splits: Inception Score splits (paper: 10).
        device: where precision/recall distances are computed.

    Returns:
        An EvalResult. IS is None (with a note) when `gen` has no logits; consistency entries are None when the
        logits are not a K-way classifier (e.g. Inception's 1008 ImageNet classes on CIFAR).
    """
    gen, ref = FeatureSet.coerce(gen), FeatureSet.coerce(ref)
    _check_pair(gen, ref, num_classes)
    head, tail = check_split(head_classes, tail_classes, num_classes)
    clusters = prd_clusters or PRD_CLUSTERS_PER_CLASS * len(np.unique(gen.labels))
    precision, recall = improved_precision_recall(ref.features, gen.features, k=k, device=device)
    f8, f1_8 = prd_f_scores(gen.features, ref.features, num_clusters=clusters, num_runs=prd_runs, seed=seed,
                            n_init=prd_n_init)
    is_value, is_note = _inception_score(gen, is_splits)
    consistency, summary = _consistency(gen, num_classes, head, tail)
    return EvalResult(
        fid=fid_from_features(gen.features, ref.features), inception_score=is_value, inception_score_note=is_note,
        precision=precision, recall=recall, f8=f8, f1_8=f1_8,
        fid_head=group_fid(gen.features, gen.labels, ref.features, ref.labels, head),
        fid_tail=group_fid(gen.features, gen.labels, ref.features, ref.labels, tail),
        per_class=_per_class_rows(gen, ref, num_classes, consistency), num_generated=len(gen),
        num_reference=len(ref), extractor=gen.extractor or ref.extractor, **summary)
