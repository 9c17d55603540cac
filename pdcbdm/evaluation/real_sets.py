"""The real images an evaluation compares samples with, as features: what ``Evaluator.build`` loads once.

``RealSets.load`` resolves ``eval.reference`` and ``eval.judge`` and reads, each cached on disk by its data's
identity and the extractor's: the reference (a prepared set's training images re-weighted to a class-balanced
mixture by default, ``pdcbdm.metrics.mixture``), the class judge's calibration images and the judge (only a network
trained on the data's own classes judges them, ``FeatureExtractor.judges``, never the count of its logits), the floor
pool (real images disjoint from both, for the noise floors) and, for a prepared set, the training images' features
(the memorisation check; the class-balanced linear probe that judges classes for a network with no head over them,
Inception). With ``eval.judge=cnn`` beside another extractor, the calibration and floor images also carry the
domain CNN's features (``FeatureSet.judged``), which the judge reads.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pdcbdm.config import Config
from pdcbdm.data import (PREPARED, build_calibration_dataset, build_floor_dataset, build_reference_dataset,
                         reference_kind)
from pdcbdm.data.own import prepared_train
from pdcbdm.metrics import FeatureExtractor, FeatureSet, Judge, load_or_calibrate_judge, reference_features
from pdcbdm.metrics.probe import load_or_train_probe

from .settings import judge_network

__all__ = ["JUDGE_CHOICES", "RealSets", "readable_reference", "calibrated_judge", "cached_features", "judge_accuracy",
           "with_judged", "training_features", "floor_pool"]

# eval.judge: the extractor's own classifier where it has one (auto), a linear probe on its features, or the
# domain CNN of the prepared set (``settings.judge_network``)
JUDGE_CHOICES = ("auto", "probe", "cnn")


@dataclass
class RealSets:
    """The features of the real sets one evaluation scores with (module docstring)."""

    kind: str
    reference: FeatureSet
    score_shape: tuple[int, int, int]
    judge: Judge | None
    judge_accuracy: float | None
    floor_pool: FeatureSet | None
    floor_note: str | None
    train: FeatureSet | None
    judge_network: FeatureExtractor | None = None

    @classmethod
    def load(cls, cfg: Config, extractor: FeatureExtractor, num_classes: int,
             cache_dir: str | os.PathLike | None = None, progress: bool = False) -> RealSets:
        """Resolve ``eval.reference`` and ``eval.judge`` and read every set's features (computed once, then from
        the cache)."""
        d, choice = cfg.data, cfg.eval.reference
        kind = reference_kind(d.dataset, d.root, choice)
        ref_ds = build_reference_dataset(d.dataset, root=d.root, download=d.download, choice=choice)
        reference = cached_features(extractor, ref_ds, cache_dir, progress)
        if kind == "balanced-train":
            reference = reference.balanced(num_classes)
        judge_net = judge_network(cfg, extractor.device, cache_dir)
        calibration = _calibration(cfg, extractor, ref_ds, reference, cache_dir, progress, judge_net)
        train = training_features(cfg, extractor, reference, kind, cache_dir, progress)
        if judge_net is not None:
            judge = calibrated_judge(judge_net, calibration.reader, num_classes, ref_ds.class_names, cache_dir)
        else:
            judge = calibrated_judge(extractor, calibration, num_classes, ref_ds.class_names, cache_dir, train,
                                     probe=cfg.eval.judge == "probe")
        pool, note = floor_pool(cfg, extractor, cache_dir, progress, judge_net)
        accuracy = None if judge is None else judge_accuracy(calibration.reader, judge)
        return cls(kind, readable_reference(extractor, reference, ref_ds.class_names, num_classes),
                   tuple(ref_ds.image_shape), judge, accuracy, pool, note, train, judge_net)


def _calibration(cfg: Config, extractor: FeatureExtractor, ref_ds: Any, reference: FeatureSet,
                 cache_dir: str | os.PathLike | None, progress: bool,
                 judge_net: FeatureExtractor | None = None) -> FeatureSet:
    """The judge's calibration images' features: the reference's own when they are the same images (a built-in
    set's balanced reference, a prepared set's reference folder or heldout reference part); with the judging
    network's as ``judged`` when another network judges."""
    d, data, calibration = cfg.data, ref_ds, reference
    if d.dataset == PREPARED:
        cal_ds = build_calibration_dataset(d.dataset, root=d.root, download=d.download, choice=cfg.eval.reference)
        if cal_ds.identity != getattr(ref_ds, "identity", None):
            data, calibration = cal_ds, cached_features(extractor, cal_ds, cache_dir, progress)
    return with_judged(calibration, judge_net, data, cache_dir, progress)


def with_judged(features: FeatureSet, judge_net: FeatureExtractor | None, data: Any,
                cache_dir: str | os.PathLike | None, progress: bool = False) -> FeatureSet:
    """``features`` of the images ``data`` with the judging network's features of the same images attached
    (``FeatureSet.judged``); unchanged when the extractor judges."""
    if judge_net is None:
        return features
    return dataclasses.replace(features, judged=cached_features(judge_net, data, cache_dir, progress))


def readable_reference(extractor: FeatureExtractor, reference: FeatureSet, class_names: Sequence[str],
              num_classes: int) -> FeatureSet:
    """The reference as the metrics see it: without its logits when they number K but are not this data's classes
    (``evaluate_features`` would calibrate a judge on any K-way logits), so that no class metric reads them."""
    if reference.logits is None or reference.logits.shape[1] != num_classes or extractor.judges(class_names):
        return reference
    note = f"{extractor.name}'s logits are not the data set's classes (no judge of class consistency)"
    return dataclasses.replace(reference, logits=None, logits_note=note)


def calibrated_judge(extractor: FeatureExtractor, calibration: FeatureSet, num_classes: int,
                     class_names: Sequence[str], cache_dir: str | os.PathLike | None,
                     train: FeatureSet | None = None, probe: bool = False) -> Judge | None:
    """The class judge calibrated on real images its classifier never trained on (``calibration``: digits'
    reference, a prepared set's held-out reference part), cached on disk; it covers the classes with >= 2 of them
    (judge.py, "Coverage"). The classifier: the extractor's own logits when it was trained on these classes (the
    digits and domain CNNs), else, given the training images' features ``train`` (a prepared set), a class-balanced
    linear probe on the features (``pdcbdm.metrics.probe``; Inception; with ``probe``, for any network). None when
    neither applies or fewer than 2 classes have 2 images to calibrate on."""
    c = calibration
    own = (not probe and c.logits is not None and extractor.judges(class_names)
           and c.logits.shape[1] == num_classes)
    if not own and train is None:
        return None
    try:
        if own:
            return load_or_calibrate_judge(c.features, c.logits, c.labels, num_classes,
                                           extractor=extractor.identity, cache_dir=cache_dir)
        probe = load_or_train_probe(train.features, train.labels, num_classes, heldout_features=c.features,
                                    heldout_labels=c.labels, extractor=extractor.identity, cache_dir=cache_dir)
        judge = load_or_calibrate_judge(c.features, probe.logits(c.features), c.labels, num_classes,
                                        extractor=f"{extractor.identity}+probe", cache_dir=cache_dir)
        return dataclasses.replace(judge, probe=probe)
    except ValueError:  # fewer than 2 classes to calibrate on: the metrics report why there is no consistency
        return None


def cached_features(extractor: FeatureExtractor, data: Any, cache_dir: str | os.PathLike | None,
                    progress: bool) -> FeatureSet:
    """Features of a real image set, cached on disk by its identity and the extractor's."""
    return reference_features(extractor, data, cache_dir, dataset_id=getattr(data, "identity", None),
                              progress=progress)


def judge_accuracy(calibration: FeatureSet, judge: Judge) -> float | None:
    """The judge's classifier's plain accuracy (argmax of its logits, or of its probe's) on the held-out
    calibration images of the classes it covers: how well it knows the classes it judges."""
    rows = np.isin(calibration.labels, judge.covered_classes)
    logits = judge.probe.logits(calibration.features) if judge.probe is not None else calibration.logits
    if logits is None or not rows.any():
        return None
    return float((logits[rows].argmax(axis=1) == calibration.labels[rows]).mean())


def training_features(cfg: Config, extractor: FeatureExtractor, reference: FeatureSet, kind: str,
                      cache_dir: str | os.PathLike | None, progress: bool) -> FeatureSet | None:
    """Features of a prepared set's training images, for the memorisation check and the judge's probe (the
    reference's own when it is the training set); None for a built-in set, whose floor pool may hold training
    images."""
    if cfg.data.dataset != PREPARED:
        return None
    if kind in ("balanced-train", "train"):
        return reference
    return cached_features(extractor, prepared_train(cfg.data.root), cache_dir, progress)


def floor_pool(cfg: Config, extractor: FeatureExtractor, cache_dir: str | os.PathLike | None,
               progress: bool, judge_net: FeatureExtractor | None = None) -> tuple[FeatureSet | None, str | None]:
    """Features of the floor data set (``build_floor_dataset``), cached like the reference's; or a note."""
    try:
        data = build_floor_dataset(cfg.data.dataset, root=cfg.data.root, download=cfg.data.download,
                                   choice=cfg.eval.reference)
    except (OSError, ValueError) as exc:
        return None, f"no noise floor: the floor data set is unavailable ({exc})"
    if len(data) == 0:
        return None, "no noise floor: the floor data set is empty (every held-out image is in the reference)"
    pool = cached_features(extractor, data, cache_dir, progress)
    return with_judged(pool, judge_net, data, cache_dir, progress), None
