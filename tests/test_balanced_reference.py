"""The class-balanced reference (pdcbdm.metrics.mixture): a long-tailed set's features re-weighted to a balanced
mixture score as a balanced set would, exactly on a balanced set and within the noise of a brute-force balanced
resample on a long-tailed one; the judge covers only the classes it has calibration images of; the many/medium/
few-shot groups; eval.reference is refused where it cannot apply."""

from __future__ import annotations

import numpy as np
import pytest

from pdcbdm.config import ConfigError, apply_overrides
from pdcbdm.metrics import FeatureSet, calibrate_judge, evaluate_features, fid_from_features, shot_groups
from pdcbdm.metrics.judge import REJECT
from pdcbdm.metrics.kid import kid_from_features
from pdcbdm.metrics.mixture import balanced_shares, mixture_weights, stratified_subsample
from pdcbdm.metrics.precision_recall import improved_precision_recall
from pdcbdm.presets import preset

K, D = 5, 8
MEANS = np.random.default_rng(0).normal(0.0, 3.0, (K, D))


def _mixture(counts, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of a Gaussian mixture with ``counts[k]`` points of class k (class k: mean MEANS[k], its own
    anisotropic spread, so that the class mixture changes the covariance)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(K), counts)
    scale = 0.5 + np.arange(K)[:, None] * 0.3
    return MEANS[labels] + rng.normal(size=(len(labels), D)) * scale[labels], labels


def test_weights_give_every_class_its_share_and_equal_one_over_n_on_a_balanced_set():
    labels = np.repeat(np.arange(4), [50, 20, 5, 0 + 1])
    w = mixture_weights(labels, balanced_shares(labels, 4))
    assert np.isclose(w.sum(), 1.0) and np.allclose(np.bincount(labels, weights=w), 0.25)
    even = np.repeat(np.arange(4), 10)
    assert np.allclose(mixture_weights(even, balanced_shares(even, 4)), 1 / 40)
    assert mixture_weights(labels, None) is None
    # a class absent from the set takes no share: the others are renormalised
    assert np.allclose(balanced_shares(np.array([0, 0, 2]), 3), [0.5, 0.0, 0.5])


def test_on_a_balanced_set_every_weighted_metric_equals_the_plain_one():
    gen, gen_labels = _mixture([40] * K, seed=1)
    ref, ref_labels = _mixture([60] * K, seed=2)
    w = mixture_weights(ref_labels, balanced_shares(ref_labels, K))
    assert fid_from_features(gen, ref, weights2=w) == pytest.approx(fid_from_features(gen, ref), rel=1e-10)
    plain_kid = kid_from_features(gen, ref, gen_labels=gen_labels, ref_labels=ref_labels)
    weighted_kid = kid_from_features(gen, ref, gen_labels=gen_labels, ref_labels=ref_labels,
                                     ref_shares=balanced_shares(ref_labels, K))
    assert weighted_kid == pytest.approx(plain_kid, rel=1e-9, abs=1e-12)
    assert improved_precision_recall(ref, gen, ref_weights=w) == pytest.approx(improved_precision_recall(ref, gen))
    kwargs = {"head_classes": [0, 1, 2], "tail_classes": [3, 4], "num_classes": K, "prd_runs": 2}
    plain = evaluate_features(FeatureSet(gen, None, gen_labels), FeatureSet(ref, None, ref_labels), **kwargs)
    balanced = evaluate_features(FeatureSet(gen, None, gen_labels),
                                 FeatureSet(ref, None, ref_labels).balanced(K), **kwargs)
    for key in ("fid", "fid_head", "fid_tail", "kid", "kid_tail", "recall", "precision", "f8", "f1_8"):
        assert getattr(balanced, key) == pytest.approx(getattr(plain, key), rel=1e-7, abs=1e-9), key


def test_on_a_long_tailed_set_the_weighted_scores_match_a_brute_force_balanced_resample():
    """The weighted FID and KID of a long-tailed reference against the same metric of balanced resamples of it
    (FID: every class drawn 1,000 times with replacement; KID: 40 of each class without replacement, as a
    duplicate pair would count as a pair of distinct draws): within 3 standard deviations of the resamples' spread
    (plus 2% of the value), while the unweighted FID is far off."""
    counts = [2000, 800, 300, 100, 40]
    gen, gen_labels = _mixture([200] * K, seed=3)
    ref, ref_labels = _mixture(counts, seed=4)
    shares = balanced_shares(ref_labels, K)
    weighted_fid = fid_from_features(gen, ref, weights2=mixture_weights(ref_labels, shares))
    weighted_kid = kid_from_features(gen, ref, gen_labels=gen_labels, ref_labels=ref_labels, ref_shares=shares)
    rng = np.random.default_rng(5)
    fids, kids = [], []
    for _ in range(12):
        rows = np.concatenate([rng.choice(np.flatnonzero(ref_labels == k), 1000) for k in range(K)])
        fids.append(fid_from_features(gen, ref[rows]))
        rows = np.concatenate([rng.choice(np.flatnonzero(ref_labels == k), 40, replace=False) for k in range(K)])
        kids.append(kid_from_features(gen, ref[rows], gen_labels=gen_labels, ref_labels=ref_labels[rows]))
    assert abs(weighted_fid - np.mean(fids)) <= 3 * np.std(fids, ddof=1) + 0.02 * np.mean(fids), (weighted_fid, fids)
    assert abs(weighted_kid - np.mean(kids)) <= 3 * np.std(kids, ddof=1) + 0.02 * abs(np.mean(kids)), (weighted_kid,
                                                                                                          kids)
    assert fid_from_features(gen, ref) > 3 * weighted_fid  # the long-tailed set as it is: another mixture


def test_stratified_subsample_keeps_small_classes_whole_within_the_budget():
    labels = np.repeat(np.arange(4), [5000, 900, 30, 2])
    rows = stratified_subsample(labels, 1000, seed=0)
    kept = np.bincount(labels[rows], minlength=4)
    assert kept.sum() <= 1000 and kept[2] == 30 and kept[3] == 2 and abs(int(kept[0]) - int(kept[1])) <= 0
    assert np.array_equal(rows, stratified_subsample(labels, 1000, seed=0)) and np.all(np.diff(rows) > 0)
    assert len(stratified_subsample(labels[:100], 1000, seed=0)) == 100


def test_the_judge_covers_only_classes_with_two_calibration_images_and_the_rest_go_unjudged():
    feats, labels = _mixture([30, 30, 30, 30, 1], seed=6)
    logits = -((feats[:, None, :] - MEANS[None]) ** 2).sum(axis=2)  # a nearest-mean classifier
    judge = calibrate_judge(feats, logits, labels, K)
    assert judge.covered_classes == (0, 1, 2, 3)
    tail_like = MEANS[4][None] + np.zeros((3, D))
    assert (judge.decide(tail_like, -((tail_like[:, None] - MEANS[None]) ** 2).sum(axis=2)) == REJECT).all()
    gen, gen_labels = _mixture([20] * K, seed=7)
    gen_set = FeatureSet(gen, -((gen[:, None, :] - MEANS[None]) ** 2).sum(axis=2), gen_labels)
    result = evaluate_features(gen_set, FeatureSet(feats, logits, labels), head_classes=[0, 1, 2],
                               tail_classes=[3, 4], num_classes=K, prd_runs=1, judge=judge)
    assert result.per_class[4]["consistency"] is None and result.per_class[4]["reject_rate"] is None
    assert result.consistency_tail is not None and result.consistency_tail >= 0.9  # class 3 alone
    assert "classes [4]" in result.consistency_note
    with pytest.raises(ValueError, match="at least 2 classes"):
        calibrate_judge(feats[labels >= 3], logits[labels >= 3], labels[labels >= 3], K)


def test_shot_groups_split_by_absolute_training_count_and_are_scored():
    assert shot_groups([500, 101, 100, 20, 19, 1]) == {"many": (0, 1), "medium": (2, 3), "few": (4, 5)}
    gen, gen_labels = _mixture([20] * K, seed=8)
    ref, ref_labels = _mixture([40] * K, seed=9)
    result = evaluate_features(FeatureSet(gen, None, gen_labels), FeatureSet(ref, None, ref_labels),
                               head_classes=[0, 1], tail_classes=[2, 3, 4], num_classes=K, prd_runs=1,
                               groups=shot_groups([300, 150, 50, 10, 5]))
    flat = result.to_dict()
    assert flat["fid_few"] == pytest.approx(evaluate_features(
        FeatureSet(gen, None, gen_labels), FeatureSet(ref, None, ref_labels), head_classes=[0, 1, 2],
        tail_classes=[3, 4], num_classes=K, prd_runs=1).fid_tail)
    assert flat["kid_many"] is not None and flat["consistency_few"] is None  # no classifier here
    with pytest.raises(ValueError, match="group name 'head'"):
        evaluate_features(FeatureSet(gen, None, gen_labels), FeatureSet(ref, None, ref_labels), head_classes=[0],
                          tail_classes=[4], num_classes=K, groups={"head": [1]})


def test_eval_reference_is_checked_before_anything_runs():
    with pytest.raises(ConfigError, match="eval.reference"):
        apply_overrides(preset("smoke"), ["eval.reference=train"])  # a built-in set: its balanced set only
    with pytest.raises(ConfigError, match="eval.reference"):
        apply_overrides(preset("smoke"), ["eval.reference=balanced"])
    assert preset("smoke").eval.reference == "auto"
