"""Class-wise metrics for long-tailed generation: per-class FID, head/tail-group FID, class consistency.

The paper targets head/tail confusion (tail-class samples that look like head classes). These metrics make it
visible: FID per class and per group (head / tail, from a head/tail split as in the PD loss, Eq. 10), the share of
samples generated for class k that a classifier assigns to k, and the share of tail-class samples it assigns to a
head class.

A classifier decision may be REJECT (-1, judge.py: the classifier cannot read the sample). Consistency and
confusion count only the other, confident decisions; `reject_rate` reports the rejected share on its own, so an
unreadable sample lowers neither consistency nor raises confusion but shows up there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .fid import ReferenceStatistics, fid_to_reference

__all__ = ["SHOT_MANY", "SHOT_FEW", "shot_groups", "check_split", "per_class_fid", "group_fid", "class_consistency",
           "tail_to_head_confusion", "group_consistency", "reject_rate"]


# Many-shot classes have more than SHOT_MANY training images, few-shot fewer than SHOT_FEW, medium-shot the rest
# (the usual long-tail recognition groups of Liu et al. 2019, OLTR).
SHOT_MANY = 100
SHOT_FEW = 20


def shot_groups(train_counts: Sequence[int], *, many: int = SHOT_MANY,
                few: int = SHOT_FEW) -> dict[str, tuple[int, ...]]:
    """{"many": classes with > many training images, "medium": few..many, "few": < few} (a group may be empty:
    its metrics are then None). Beside head/tail, which split by rank, these split by absolute count: a "tail"
    class of a mild imbalance may still hold hundreds of images."""
    counts = [int(c) for c in train_counts]
    return {"many": tuple(k for k, c in enumerate(counts) if c > many),
            "medium": tuple(k for k, c in enumerate(counts) if few <= c <= many),
            "few": tuple(k for k, c in enumerate(counts) if c < few)}


def check_split(head_classes: Sequence[int], tail_classes: Sequence[int], num_classes: int) -> tuple[tuple[int, ...],
                                                                                                     tuple[int, ...]]:
    """Validate a head/tail split: disjoint class indices in [0, num_classes). Returns both as int tuples."""
    head, tail = tuple(int(c) for c in head_classes), tuple(int(c) for c in tail_classes)
    for name, group in (("head_classes", head), ("tail_classes", tail)):
        bad = [c for c in group if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"{name} holds {bad}, outside [0, {num_classes}) (num_classes={num_classes})")
        if len(set(group)) != len(group):
            raise ValueError(f"{name} has repeated classes: {list(group)}")
    both = sorted(set(head) & set(tail))
    if both:
        raise ValueError(f"classes {both} are in both head_classes and tail_classes")
    return head, tail


def group_fid(gen_features: np.ndarray, gen_labels: np.ndarray, ref_features: np.ndarray, ref_labels: np.ndarray,
              classes: Sequence[int], *, ref_shares: np.ndarray | None = None) -> float | None:
    """FID between the generated and the reference samples whose labels are in `classes`.

    Args:
        gen_features, ref_features: [M, D] and [N, D] features.
        gen_labels, ref_labels: [M] and [N] integer labels (generated: the class each sample was generated for).
        classes: the class group (one class for per-class FID).
        ref_shares: the class mixture the reference stands for (``mixture.py``), renormalised over the group;
            None: the reference's own proportions.

    Returns:
        The FID, or None when either side has fewer than 2 samples in the group (no covariance). A caller that
        scores several sets against one reference keeps its ``fid.ReferenceStatistics`` and calls
        ``fid_to_reference`` instead, so that the reference's statistics are computed once.
    """
    return fid_to_reference(gen_features, ReferenceStatistics(ref_features, ref_labels, ref_shares), classes,
                            gen_labels)


def per_class_fid(gen_features: np.ndarray, gen_labels: np.ndarray, ref_features: np.ndarray,
                  ref_labels: np.ndarray, num_classes: int,
                  ref_stats: ReferenceStatistics | None = None) -> list[float | None]:
    """FID of each class k = 0..num_classes-1 against the reference images of class k (None: < 2 samples);
    ``ref_stats``: the reference's kept statistics (``FeatureSet.reference_statistics``), else computed here."""
    stats = ref_stats if ref_stats is not None else ReferenceStatistics(ref_features, ref_labels)
    return [fid_to_reference(gen_features, stats, [k], gen_labels) for k in range(num_classes)]


def _as_pair(gen_labels: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gen_labels, predicted = np.asarray(gen_labels), np.asarray(predicted)
    if gen_labels.shape != predicted.shape:
        raise ValueError(f"gen_labels shape {gen_labels.shape} differs from predicted shape {predicted.shape}")
    return gen_labels, predicted


def class_consistency(gen_labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> list[float | None]:
    """Share of the confident decisions on samples generated for class k that say k, for each k.

    Args:
        gen_labels: [M] class each sample was generated for.
        predicted: [M] classifier decision for each sample; negative (judge.REJECT) = not readable, not counted.
        num_classes: K.

    Returns:
        K entries, None for a class with no confident decision (no sample, or every sample rejected).
    """
    gen_labels, predicted = _as_pair(gen_labels, predicted)
    out: list[float | None] = []
    for k in range(num_classes):
        mask = (gen_labels == k) & (predicted >= 0)
        out.append(float((predicted[mask] == k).mean()) if mask.any() else None)
    return out


def group_consistency(gen_labels: np.ndarray, predicted: np.ndarray, classes: Sequence[int]) -> float | None:
    """Share of all confident decisions on samples of the group `classes` that match their label (pooled over
    the group's samples, None when there is none)."""
    gen_labels, predicted = _as_pair(gen_labels, predicted)
    mask = np.isin(gen_labels, list(classes)) & (predicted >= 0)
    return float((predicted[mask] == gen_labels[mask]).mean()) if mask.any() else None


def reject_rate(gen_labels: np.ndarray, predicted: np.ndarray, classes: Sequence[int]) -> float | None:
    """Share of the samples generated for the group `classes` that the classifier rejected (None: no sample)."""
    gen_labels, predicted = _as_pair(gen_labels, predicted)
    mask = np.isin(gen_labels, list(classes))
    return float((predicted[mask] < 0).mean()) if mask.any() else None


def tail_to_head_confusion(gen_labels: np.ndarray, predicted: np.ndarray, head_classes: Sequence[int],
                           tail_classes: Sequence[int]) -> float | None:
    """Share of the confident decisions on tail-class samples that name a head class (None when there is none;
    rejected samples are not counted)."""
    gen_labels, predicted = _as_pair(gen_labels, predicted)
    tail_mask = np.isin(gen_labels, list(tail_classes)) & (predicted >= 0)
    if not tail_mask.any():
        return None
    return float(np.isin(predicted[tail_mask], list(head_classes)).mean())
