"""One call that scores generated samples against reference statistics: `evaluate_features`.

All metrics of docs/method.md "Metrics" (FID, IS, improved precision/recall with k = 5, PRD F_8 / F_1/8) plus KID
(unbiased at small N, kid.py) and the long-tail diagnostics of class_metrics.py, from features computed once by a
FeatureExtractor. Class consistency counts only the decisions a calibrated judge can read (judge.py); the share it
cannot read is `reject_rate`. PRD runs on equal-size sets with at most N / 10 clusters (prd.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .class_metrics import (check_split, class_consistency, group_consistency, per_class_fid,
                            reject_rate, tail_to_head_confusion)
from .fid import ReferenceStatistics, as_float64, fid_to_reference
from .inception_score import inception_score
from .judge import Judge, calibrate_judge
from .kid import group_kid
from .mixture import balanced_shares, mixture_weights, stratified_subsample
from .prd import PRD_CLUSTERS_PER_CLASS, prd_cluster_count, prd_f_scores
from .precision_recall import improved_precision_recall

__all__ = ["FeatureSet", "EvalResult", "evaluate_features", "PRD_CLUSTERS_PER_CLASS", "KID_MAX_REFERENCE",
           "CLASS_FID_MIN_REFERENCE",
           "PER_CLASS_KEYS", "METRICS_VERSION"]

# KID's reference side is a seeded subsample of at most this many points: the estimate stays unbiased and the
# reference-reference kernel sum of a 50,000-image reference (5e12 multiply-adds at 2048-d) is avoided.
KID_MAX_REFERENCE = 10_000
# Bump when a metric's definition changes: cached noise floors (floor.py) are keyed by it. 4: the proxy floors read
# a re-weighted reference with its class shares, as the proxy scores do.
METRICS_VERSION = 4
# A class's FID needs this many reference images of it: below, its covariance is a few points' (a tail class of a
# user's training set used as the reference) and the value mostly its own bias; its KID is reported instead.
CLASS_FID_MIN_REFERENCE = 10
# Per-class row entries, flattened by EvalResult.to_dict as f"{key}_class_{k}".
PER_CLASS_KEYS = ("fid", "kid", "consistency", "reject_rate", "n")


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
        class_shares: [K] the class mixture a reference stands for (``mixture.py``; the class-balanced training
            set: ``balanced``); None: its own class proportions. Every metric reads it through `weights`.
        judged: the same images (same rows) seen by the network that judges classes when it is not this one
            (``eval.judge=cnn`` beside Inception features): the judge reads its features and logits; None: this set.
    """

    features: np.ndarray
    logits: np.ndarray | None
    labels: np.ndarray
    extractor: str = ""
    logits_note: str = ""
    class_shares: np.ndarray | None = None
    judged: FeatureSet | None = None

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
        if self.class_shares is not None:
            shares = as_float64(self.class_shares, "class_shares", 1)
            if (shares < 0).any() or (labels.size and labels.max() >= len(shares)):
                raise ValueError(f"class_shares must be >= 0 with an entry for every label, got {len(shares)} "
                                 f"entries for labels up to {labels.max() if labels.size else None}")
            object.__setattr__(self, "class_shares", shares)
        if self.judged is not None and len(self.judged) != feats.shape[0]:
            raise ValueError(f"judged has {len(self.judged)} rows but features has {feats.shape[0]}")

    @property
    def reader(self) -> FeatureSet:
        """The features and logits the class judge reads: ``judged`` when another network judges, else this set."""
        return self if self.judged is None else self.judged

    @functools.cached_property
    def reference_statistics(self) -> ReferenceStatistics:
        """The set's Gaussian statistics as a reference (whole and per class group, with its class shares), each
        computed once for the life of this object (``fid.ReferenceStatistics``)."""
        return ReferenceStatistics(self.features, self.labels, self.class_shares)

    def weights(self) -> np.ndarray | None:
        """Row weights w_i = pi_k / n_k summing to 1 (``mixture.mixture_weights``), None when the set stands for
        its own class proportions."""
        return mixture_weights(self.labels, self.class_shares)

    def balanced(self, num_classes: int) -> FeatureSet:
        """The set re-weighted to the class-balanced mixture over the classes it holds."""
        return dataclasses.replace(self, class_shares=balanced_shares(self.labels, num_classes))

    def subset(self, rows: np.ndarray) -> FeatureSet:
        """The rows ``rows`` (indices or a mask), the class shares kept."""
        return dataclasses.replace(self, features=self.features[rows], labels=self.labels[rows],
                                   logits=None if self.logits is None else self.logits[rows],
                                   judged=None if self.judged is None else self.judged.subset(rows))

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
    """Every metric of one evaluation. None means "not computable here"; the matching *_note says why.

    consistency_* are shares of the judge's confident decisions (pooled over the group's samples) that match the
    label; reject_rate_* the shares of samples it could not read; tail_to_head_confusion the share of confident
    decisions on tail samples that name a head class. prd_n and prd_clusters record the equal set size and the
    clusters PRD used.
    """

    fid: float
    inception_score: tuple[float, float] | None
    inception_score_note: str | None
    precision: float
    recall: float
    f8: float | None
    f1_8: float | None
    fid_head: float | None
    fid_tail: float | None
    kid: float | None = None
    kid_head: float | None = None
    kid_tail: float | None = None
    per_class: list[dict[str, Any]] = field(default_factory=list)
    consistency_mean: float | None = None
    consistency_head: float | None = None
    consistency_tail: float | None = None
    tail_to_head_confusion: float | None = None
    reject_rate: float | None = None
    reject_rate_head: float | None = None
    reject_rate_tail: float | None = None
    consistency_note: str | None = None
    prd_n: int = 0
    prd_clusters: int = 0
    prd_note: str | None = None
    num_generated: int = 0
    num_reference: int = 0
    extractor: str = ""
    group_scores: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float | int | str | None]:
        """Flat, JSON-friendly view: Python floats/ints/strings/None only; per-class rows become fid_class_{k},
        kid_class_{k}, consistency_class_{k}, reject_rate_class_{k}, n_class_{k}; the IS pair becomes is_mean /
        is_std."""
        flat = {k: v for k, v in asdict(self).items() if k not in ("per_class", "inception_score", "group_scores")}
        flat.update(self.group_scores)
        flat["is_mean"], flat["is_std"] = self.inception_score if self.inception_score else (None, None)
        for row in self.per_class:
            for key in PER_CLASS_KEYS:
                flat[f"{key}_class_{row['label']}"] = row.get(key)
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


def _judge_for(ref: FeatureSet, num_classes: int, judge: Judge | None) -> tuple[Judge | None, str | None]:
    """The judge to use: the given one, or one calibrated on the reference (its logits must be K-way)."""
    if judge is not None:
        return judge, None
    if ref.logits is None or ref.logits.shape[1] != num_classes:
        return None, "no judge given and the reference has no K-way logits to calibrate one on"
    counts = np.bincount(ref.labels, minlength=num_classes)
    if counts.min() < 2:
        return None, f"no judge given and the reference has < 2 images of some class (counts {counts.tolist()})"
    return calibrate_judge(ref.features, ref.logits, ref.labels, num_classes, extractor=ref.extractor), None


def _consistency(gen: FeatureSet, ref: FeatureSet, num_classes: int, groups: dict[str, tuple[int, ...]],
                 judge: Judge | None) -> tuple[list[float | None], list[float | None], dict[str, Any]]:
    """Per-class consistency and reject rate plus their summaries (``consistency_<group>``,
    ``reject_rate_<group>`` for every named group, the head's and tail's included); all None when the logits do
    not classify the data set's classes. Only the classes the judge covers are judged (judge.py, "Coverage")."""
    none: list[float | None] = [None] * num_classes
    reads_features = judge is not None and judge.probe is not None
    seen = gen.reader
    if not reads_features and (seen.logits is None or seen.logits.shape[1] != num_classes):
        width = None if seen.logits is None else seen.logits.shape[1]
        note = (f"no classifier over the {num_classes} data classes (logits width {width}); "
                "class consistency needs the digits network or another matching classifier")
        return none, none, {"consistency_note": note}
    judge, note = _judge_for(ref, num_classes, judge)
    if judge is None:
        return none, none, {"consistency_note": note}
    covered = set(judge.covered_classes)
    decided, labels = judge.decide(seen.features, seen.logits), gen.labels

    def judged(classes: Sequence[int]) -> list[int]:
        return [c for c in classes if c in covered]

    every = judged(range(num_classes))
    summary: dict[str, Any] = {"consistency_mean": group_consistency(labels, decided, every),
                               "reject_rate": reject_rate(labels, decided, every),
                               "tail_to_head_confusion": tail_to_head_confusion(labels, decided, groups["head"],
                                                                                judged(groups["tail"]))}
    for name, classes in groups.items():
        summary[f"consistency_{name}"] = group_consistency(labels, decided, judged(classes))
        summary[f"reject_rate_{name}"] = reject_rate(labels, decided, judged(classes))
    unjudged = sorted(set(range(num_classes)) - covered)
    if unjudged:
        summary["consistency_note"] = (f"classes {unjudged} have < 2 held-out images: the judge cannot read them, "
                                       f"their samples are not judged")
    consistency = [v if k in covered else None for k, v in enumerate(class_consistency(labels, decided,
                                                                                          num_classes))]
    rejected = [reject_rate(labels, decided, [k]) if k in covered else None for k in range(num_classes)]
    return consistency, rejected, summary


def _pairwise_reference(ref: FeatureSet, seed: int) -> FeatureSet:
    """The reference of the pairwise metrics (KID; precision/recall of a weighted reference): all of it, or a
    seeded subsample of KID_MAX_REFERENCE rows, stratified by class for a weighted reference
    (``mixture.stratified_subsample``: its tail kept whole, its shares kept)."""
    if len(ref) <= KID_MAX_REFERENCE:
        return ref
    if ref.class_shares is not None:
        return ref.subset(stratified_subsample(ref.labels, KID_MAX_REFERENCE, seed))
    return ref.subset(np.sort(np.random.default_rng(seed).choice(len(ref), size=KID_MAX_REFERENCE, replace=False)))


def _kid(gen: FeatureSet, ref: FeatureSet, num_classes: int, groups: dict[str, tuple[int, ...]],
         seed: int, device: torch.device | str) -> tuple[list[float | None], dict[str, float | None]]:
    """Per-class KID and KID of the whole set and of each named group (``kid_<name>``)."""
    sub = _pairwise_reference(ref, seed)

    def kid(classes: Sequence[int]) -> float | None:
        return group_kid(gen.features, gen.labels, sub.features, sub.labels, classes, ref_shares=sub.class_shares,
                         device=device)

    per_class = [kid([k]) for k in range(num_classes)]
    return per_class, {"kid": kid(range(num_classes)), **{f"kid_{name}": kid(c) for name, c in groups.items()}}


def _precision_recall(gen: FeatureSet, ref: FeatureSet, k: int, seed: int,
                      device: torch.device | str) -> tuple[float, float]:
    """Improved precision/recall; a weighted reference is read through its pairwise subsample and weights."""
    if ref.class_shares is None:
        return improved_precision_recall(ref.features, gen.features, k=k, device=device)
    sub = _pairwise_reference(ref, seed)
    return improved_precision_recall(sub.features, gen.features, k=k, device=device, ref_weights=sub.weights())


def _prd(gen: FeatureSet, ref: FeatureSet, clusters: int | None, runs: int, seed: int,
         n_init: int, device: torch.device | str) -> dict[str, Any]:
    """F_8 and F_1/8 on equal-size sets with at most N / 10 clusters (None, with a note, when N < 20)."""
    n = min(len(gen), len(ref))
    count = clusters or prd_cluster_count(n, len(np.unique(gen.labels)))
    if count == 0:
        return {"f8": None, "f1_8": None, "prd_n": n, "prd_clusters": 0,
                "prd_note": f"PRD needs >= 2 clusters of 10 points; the equal-size sets hold {n} points"}
    f8, f1_8 = prd_f_scores(gen.features, ref.features, num_clusters=count, num_runs=runs, seed=seed,
                            n_init=n_init, ref_weights=ref.weights(), device=device)
    return {"f8": f8, "f1_8": f1_8, "prd_n": n, "prd_clusters": count}


def _per_class_rows(gen: FeatureSet, ref: FeatureSet, num_classes: int, kid: list[float | None],
                    consistency: list[float | None], rejected: list[float | None]) -> list[dict[str, Any]]:
    """One row per class; its FID only where the reference holds CLASS_FID_MIN_REFERENCE images of it (KID, unbiased
    at any size, stands for the others)."""
    fids = per_class_fid(gen.features, gen.labels, ref.features, ref.labels, num_classes,
                         ref.reference_statistics)
    real = np.bincount(ref.labels, minlength=num_classes)
    fids = [f if real[k] >= CLASS_FID_MIN_REFERENCE else None for k, f in enumerate(fids)]
    counts = np.bincount(gen.labels, minlength=num_classes)
    return [{"label": k, "fid": fids[k], "kid": kid[k], "consistency": consistency[k], "reject_rate": rejected[k],
             "n": int(counts[k])} for k in range(num_classes)]


def evaluate_features(gen: FeatureSet | Sequence[Any], ref: FeatureSet | Sequence[Any], *,
                      head_classes: Sequence[int], tail_classes: Sequence[int], num_classes: int, k: int = 5,
                      prd_runs: int = 10, seed: int = 0, prd_clusters: int | None = None, prd_n_init: int = 10,
                      is_splits: int = 10, device: torch.device | str = "cpu",
                      judge: Judge | None = None, groups: Mapping[str, Sequence[int]] | None = None) -> EvalResult:
    """Score generated features against reference features with every metric of docs/method.md "Metrics" plus KID.

    Args:
        gen: generated samples' FeatureSet (labels = the class each was generated for) or a 3-tuple.
        ref: reference FeatureSet (the full balanced training set in the paper), e.g. from `reference_features`;
            one with ``class_shares`` (the class-balanced training set) is read with its weights by every metric.
        head_classes, tail_classes: disjoint head/tail split (as the PD loss's, Eq. 10) for group FID/consistency.
        num_classes: K, the data set's number of classes.
        k: neighbourhood size of improved precision/recall (paper: 5).
        prd_runs: k-means runs averaged for PRD (paper: 10).
        seed: seed of the PRD subsample and clusterings and of KID's reference subsample (large references only).
        prd_clusters: PRD clusters; None = min(20 x the number of distinct classes in `gen` (paper), N // 10) with
            N = the smaller set's size (prd.py); an explicit value above N // 10 raises ValueError.
        prd_n_init: k-means++ seedings per PRD run (10 as Sajjadi et al.'s code; fewer is faster).
        is_splits: Inception Score splits (paper: 10).
        device: where FID's statistics, precision/recall distances, KID's kernel sums and PRD's k-means run.
        judge: the calibrated reading rule of class consistency (judge.py); None calibrates one on `ref` (which
            should then be images the classifier was not trained on, as the digits reference is).
        groups: further named class groups (e.g. the many/medium/few-shot groups of ``shot_groups``), scored as
            head and tail are: ``fid_<name>``, ``kid_<name>``, ``consistency_<name>``, ``reject_rate_<name>``.

    Returns:
        An EvalResult. IS is None (with a note) when `gen` has no logits; consistency and reject-rate entries are
        None when the logits are not a K-way classifier (e.g. Inception's 1008 ImageNet classes on CIFAR).
    """
    gen, ref = FeatureSet.coerce(gen), FeatureSet.coerce(ref)
    _check_pair(gen, ref, num_classes)
    head, tail = check_split(head_classes, tail_classes, num_classes)
    extra = _check_groups(groups, num_classes)
    named = {"head": head, "tail": tail, **extra}
    precision, recall = _precision_recall(gen, ref, k, seed, device)
    is_value, is_note = _inception_score(gen, is_splits)
    consistency, rejected, summary = _consistency(gen, ref, num_classes, named, judge)
    kid_per_class, kid = _kid(gen, ref, num_classes, named, seed, device)
    stats = ref.reference_statistics
    fid = {f"fid_{name}": fid_to_reference(gen.features, stats, classes, gen.labels, device)
           for name, classes in named.items()}
    extra_scores = {f"{metric}_{name}": scores.pop(f"{metric}_{name}", None) for name in extra
                    for metric, scores in (("fid", fid), ("kid", kid), ("consistency", summary),
                                           ("reject_rate", summary))}
    return EvalResult(
        fid=fid_to_reference(gen.features, stats, device=device), inception_score=is_value,
        inception_score_note=is_note, precision=precision, recall=recall, fid_head=fid["fid_head"],
        fid_tail=fid["fid_tail"],
        per_class=_per_class_rows(gen, ref, num_classes, kid_per_class, consistency, rejected),
        num_generated=len(gen), num_reference=len(ref), extractor=gen.extractor or ref.extractor,
        group_scores=extra_scores, **_prd(gen, ref, prd_clusters, prd_runs, seed, prd_n_init, device), **kid,
        **summary)


def _check_groups(groups: Mapping[str, Sequence[int]] | None, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Extra named class groups as int tuples; names must not collide with the head/tail fields."""
    out: dict[str, tuple[int, ...]] = {}
    for name, classes in (groups or {}).items():
        if name in ("head", "tail", "mean") or not name.isidentifier():
            raise ValueError(f"group name {name!r}: must be an identifier other than head, tail and mean")
        out[name], _ = check_split(classes, (), num_classes)
    return out
