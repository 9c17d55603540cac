"""The metric math: FID, IS, improved precision/recall, PRD F-scores, KID, class-wise metrics, evaluate_features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from torch_fidelity.metric_kid import kid_features_to_metric

from pdcbdm.metrics import (REJECT, EvalResult, FeatureSet, Judge, class_consistency, equal_size_sets,
                            evaluate_features, feature_statistics, fid_from_features, frechet_distance,
                            group_consistency, group_fid, group_kid, improved_precision_recall, inception_score,
                            kid_from_features, knn_radii, manifold_membership, max_f_beta, per_class_fid,
                            prd_cluster_count, prd_curve, prd_f_scores, reject_rate, tail_to_head_confusion)
from pdcbdm.metrics import prd as prd_module
from pdcbdm.metrics.reference import load_feature_set, save_feature_set


def _blobs(centres: np.ndarray, per_blob: int, std: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Isotropic Gaussian blobs around `centres` [B, D]; returns points and their blob index."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), per_blob)
    return centres[labels] + std * rng.normal(size=(len(labels), centres.shape[1])), labels


# ---------------------------------------------------------------- FID

def test_fid_of_identical_features_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 12))
    assert abs(fid_from_features(x, x)) < 1e-8


def test_fid_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_fid_matches_symmetric_form_for_full_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # Tr (S1 S2)^1/2 = Tr (S1^1/2 S2 S1^1/2)^1/2, computed here through symmetric eigenvalues instead of sqrtm.
    r1 = scipy.linalg.sqrtm(s1).real
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_root
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20000, 4))
    y = rng.normal(size=(20000, 4)) * 2.0 + 1.0
    # N(0, I) vs N(1, 4I) in 4-d: 4 * 1 + 4 * (1 + 4 - 2 * 2) = 8
    assert fid_from_features(x, y) == pytest.approx(8.0, abs=0.3)


def test_fid_of_rank_deficient_covariances_stays_finite():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 20)), rng.normal(size=(6, 20)) + 1.0  # fewer samples than dimensions
    value = fid_from_features(x, y)
    assert np.isfinite(value) and value > 0


def test_a_references_statistics_are_kept_and_give_the_plain_fids():
    """FeatureSet.reference_statistics: computed once per reference object, whole and per class group, with the
    reference's class shares; the FIDs against it equal the ones computed from the features every time."""
    from pdcbdm.metrics import FeatureSet, fid_to_reference, group_fid

    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(3), [60, 30, 10])
    ref = FeatureSet(rng.normal(size=(100, 6)) + labels[:, None], None, labels, class_shares=np.full(3, 1 / 3))
    gen = rng.normal(size=(45, 6)) + 0.5
    gen_labels = np.arange(45) % 3
    stats = ref.reference_statistics
    assert ref.reference_statistics is stats and stats.of() is stats.of() and stats.of([2, 1]) is stats.of([1, 2])
    assert fid_to_reference(gen, stats) == pytest.approx(fid_from_features(gen, ref.features,
                                                                           weights2=ref.weights()), rel=1e-10)
    assert fid_to_reference(gen, stats, [1, 2], gen_labels) == pytest.approx(
        group_fid(gen, gen_labels, ref.features, labels, [1, 2], ref_shares=ref.class_shares), rel=1e-10)
    assert fid_to_reference(gen, stats, [9], gen_labels) is None  # no reference rows of that class


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and np.allclose(mu, [3.0, 6.0])
    assert np.allclose(sigma, [[4.0, 8.0], [8.0, 16.0]])


def test_fid_rejects_bad_shapes_by_name():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fid_from_features(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((4, 3), np.nan), np.zeros((4, 3)))


# ---------------------------------------------------------------- IS

def test_inception_score_of_uniform_logits_is_one():
    mean, std = inception_score(np.zeros((100, 7)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_num_classes():
    k = 10
    # Interleaved labels and no shuffle: every split holds each class equally often.
    logits = 100.0 * np.eye(k)[np.arange(50 * k) % k]
    mean, std = inception_score(logits, splits=5, shuffle_seed=None)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    mean_shuffled, _ = inception_score(logits, splits=1)
    assert mean_shuffled == pytest.approx(k, rel=1e-6)


def test_inception_score_of_a_single_class_is_one():
    logits = np.zeros((40, 5))
    logits[:, 2] = 50.0
    assert inception_score(logits, splits=4)[0] == pytest.approx(1.0, abs=1e-6)


def test_inception_score_rejects_too_few_rows():
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.zeros((5, 3)), splits=10)


# ---------------------------------------------------------------- improved precision / recall

def _dense_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x) ** 2
    return d.sort(dim=1).values[:, k]


def test_blockwise_radii_and_membership_equal_dense_reference():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(57, 6, generator=gen, dtype=torch.float64)
    fake = torch.randn(43, 6, generator=gen, dtype=torch.float64) * 1.3 + 0.2
    radii = knn_radii(real, 3, block_elements=7 * 57)  # 7 rows per block, the last block partial
    assert torch.allclose(radii, _dense_radii(real, 3), rtol=1e-9, atol=1e-12)
    inside = manifold_membership(fake, real, radii, block_elements=5 * 57)
    dense_inside = (torch.cdist(fake, real) ** 2 <= _dense_radii(real, 3)[None, :]).any(dim=1)
    assert torch.equal(inside, dense_inside)
    assert 0 < int(inside.sum()) < len(fake)  # the comparison is not trivial


def test_precision_recall_blocks_do_not_change_the_result():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(120, 10)), rng.normal(size=(90, 10)) * 1.2 + 0.3
    whole = improved_precision_recall(real, fake, k=5, block_elements=10**9, dtype=torch.float64)
    blocked = improved_precision_recall(real, fake, k=5, block_elements=64)
    assert blocked == whole
    assert 0 < whole[0] < 1 and 0 < whole[1] < 1


def test_precision_recall_of_identical_sets_is_one():
    x = np.random.default_rng(5).normal(size=(200, 8))
    assert improved_precision_recall(x, x.copy(), k=5) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    x = np.random.default_rng(6).normal(size=(150, 8))
    assert improved_precision_recall(x, x + 1000.0, k=5) == (0.0, 0.0)


def test_covering_half_the_modes_gives_half_recall_full_precision():
    # 2-d, so k-NN balls of 150 points cover their mode well (in many dimensions fresh samples fall between them).
    centres = np.array([[50.0, 0.0], [0.0, 50.0], [-50.0, 0.0], [0.0, -50.0]])
    real, _ = _blobs(centres, 150, 1.0, seed=7)
    fake, _ = _blobs(centres[:2], 150, 1.0, seed=8)  # fresh samples of two of the four modes
    precision, recall = improved_precision_recall(real, fake, k=5)
    assert precision >= 0.95
    assert 0.45 <= recall <= 0.5


def test_precision_recall_rejects_k_not_below_set_size():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="k must be"):
        improved_precision_recall(x, x, k=5)
    with pytest.raises(ValueError, match="feature dims"):
        improved_precision_recall(np.zeros((9, 3)), np.zeros((9, 4)), k=2)


# ---------------------------------------------------------------- PRD

def test_prd_curve_of_equal_histograms_reaches_one_one():
    p = np.array([0.2, 0.3, 0.5])
    precision, recall = prd_curve(p, p, num_angles=1001)
    f = max_f_beta(precision, recall, 1.0)
    assert f == pytest.approx(1.0, abs=1e-6)


def test_prd_curve_of_disjoint_histograms_is_zero():
    precision, recall = prd_curve(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert precision.max() == 0.0 and recall.max() == 0.0


def test_max_f_beta_weights_recall_for_large_beta():
    precision, recall = np.array([1.0, 0.2]), np.array([0.2, 1.0])
    assert max_f_beta(precision, recall, 8.0) == pytest.approx(65 * 0.2 / (64 * 0.2 + 1), rel=1e-6)
    assert max_f_beta(np.array([0.2]), np.array([1.0]), 8.0) > max_f_beta(np.array([0.2]), np.array([1.0]), 1 / 8)


def test_prd_scores_identical_near_one_disjoint_near_zero():
    x, _ = _blobs(np.eye(4, 8) * 20.0, 60, 1.0, seed=9)
    f8, f1_8 = prd_f_scores(x, x.copy(), num_clusters=20, num_runs=2, seed=0)
    assert f8 > 0.99 and f1_8 > 0.99
    f8, f1_8 = prd_f_scores(x + 1000.0, x, num_clusters=20, num_runs=2, seed=0)
    assert f8 < 0.01 and f1_8 < 0.01


def test_f8_is_the_recall_side_and_f1_8_the_precision_side():
    centres = np.eye(4, 8) * 30.0
    ref, _ = _blobs(centres[:2], 100, 1.0, seed=10)
    # High recall, low precision: all reference modes plus as much mass on two modes the reference lacks.
    wide, _ = _blobs(centres, 50, 1.0, seed=11)
    f8, f1_8 = prd_f_scores(wide, ref, num_clusters=20, num_runs=2, seed=0)
    assert f8 > 0.9 and f1_8 < 0.6 and f8 > f1_8
    # High precision, low recall: one of the two reference modes only.
    narrow, _ = _blobs(centres[:1], 200, 1.0, seed=12)
    f8, f1_8 = prd_f_scores(narrow, ref, num_clusters=20, num_runs=2, seed=0)
    assert f1_8 > 0.9 and f8 < 0.6 and f1_8 > f8


def test_prd_is_deterministic_for_a_seed_and_checks_clusters():
    x, _ = _blobs(np.eye(3, 5) * 10.0, 40, 1.0, seed=13)
    y = x + 0.5
    assert prd_f_scores(x, y, num_clusters=10, num_runs=2, seed=3) == prd_f_scores(x, y, num_clusters=10,
                                                                                     num_runs=2, seed=3)
    with pytest.raises(ValueError, match="num_clusters"):
        prd_f_scores(x, y, num_clusters=1000, num_runs=1)


def test_prd_subsamples_the_larger_set_and_caps_clusters_at_a_tenth(monkeypatch):
    x, _ = _blobs(np.eye(3, 5) * 10.0, 100, 1.0, seed=21)      # 300 points
    y = x[:120] + 0.1                                           # 120 points
    a, b = equal_size_sets(x, y, seed=4)
    assert a.shape == b.shape == (120, 5) and b is y
    assert {tuple(r) for r in a} <= {tuple(r) for r in x}      # a subsample of rows, no duplicates
    assert len({tuple(r) for r in a}) == 120
    assert np.array_equal(a, equal_size_sets(x, y, seed=4)[0]) and not np.array_equal(a, equal_size_sets(x, y, 5)[0])
    seen = []
    real = prd_module._cluster_histograms
    monkeypatch.setattr(prd_module, "_cluster_histograms",
                        lambda g, r, c, s, n, *w: seen.append((len(g), len(r), c)) or real(g, r, c, s, n, *w))
    prd_f_scores(x, y, num_clusters=12, num_runs=2)
    assert seen == [(120, 120, 12)] * 2
    with pytest.raises(ValueError, match="at most one cluster per 10 points"):
        prd_f_scores(x, y, num_clusters=13, num_runs=1)
    # 20 x classes is the cap when N allows, else N // 10; under 2 clusters there is no PRD
    assert prd_cluster_count(200, 10) == 20 and prd_cluster_count(5000, 10) == 200 and prd_cluster_count(40, 10) == 4
    assert prd_cluster_count(19, 10) == 0


# ---------------------------------------------------------------- class-wise metrics

def _class_features(shift: np.ndarray, per_class: int = 40, seed: int = 14):
    """Reference features of 3 classes and generated ones equal to them, class 1 shifted by `shift`."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), per_class)
    ref = rng.normal(size=(len(labels), 4)) + labels[:, None] * 5.0
    gen = ref.copy()
    gen[labels == 1] += shift
    return gen, ref, labels


def test_per_class_and_group_fid_have_known_values():
    shift = np.array([1.0, 2.0, 0.0, 0.0])
    gen, ref, labels = _class_features(shift)
    fids = per_class_fid(gen, labels, ref, labels, 3)
    # A pure shift keeps the covariance: FID = ||shift||^2 = 5 for class 1, 0 elsewhere.
    assert fids[0] == pytest.approx(0.0, abs=1e-8) and fids[2] == pytest.approx(0.0, abs=1e-8)
    assert fids[1] == pytest.approx(5.0, rel=1e-8)
    assert group_fid(gen, labels, ref, labels, [0, 2]) == pytest.approx(0.0, abs=1e-8)
    assert group_fid(gen, labels, ref, labels, [0, 1]) > 0.5
    assert per_class_fid(gen[:41], labels[:41], ref, labels, 3)[1] is None  # one class-1 sample only


def test_class_consistency_and_tail_to_head_confusion():
    labels = np.array([0] * 4 + [1] * 4 + [2] * 4)
    predicted = np.array([0, 0, 0, 0, 1, 1, 0, 2, 2, 0, 0, 0])
    assert class_consistency(labels, predicted, 4) == [1.0, 0.5, 0.25, None]
    # Tail = {1, 2}: of 8 tail samples, predictions 0,0,0,0 fall in the head {0}.
    assert tail_to_head_confusion(labels, predicted, (0,), (1, 2)) == pytest.approx(4 / 8)
    assert tail_to_head_confusion(labels, predicted, (0,), (3,)) is None


def test_rejected_decisions_count_in_reject_rate_only():
    labels = np.array([0] * 4 + [1] * 4 + [2] * 4)
    predicted = np.array([0, 0, REJECT, REJECT, 1, REJECT, REJECT, REJECT, REJECT, REJECT, REJECT, REJECT])
    assert class_consistency(labels, predicted, 3) == [1.0, 1.0, None]
    assert reject_rate(labels, predicted, [0]) == 0.5 and reject_rate(labels, predicted, [1, 2]) == pytest.approx(7 / 8)
    # unreadable tail samples are neither consistent nor confused: no confident tail decision at all
    assert tail_to_head_confusion(labels, predicted, (0,), (1, 2)) == 0.0
    assert tail_to_head_confusion(labels, predicted, (0,), (2,)) is None
    predicted[8] = 0  # one confident tail decision, naming the head
    assert tail_to_head_confusion(labels, predicted, (0,), (1, 2)) == 0.5
    assert group_consistency(labels, predicted, [0, 1, 2]) == pytest.approx(3 / 4)  # pooled: 3 of 4 confident
    assert reject_rate(labels, predicted, [3]) is None


# ---------------------------------------------------------------- KID

def test_kid_matches_torch_fidelity_on_the_same_features():
    rng = np.random.default_rng(22)
    x, y = rng.normal(size=(150, 16)), rng.normal(size=(150, 16)) * 1.1 + 0.2
    # one subset holding every point: torch-fidelity's estimate over the whole sets (a permutation changes nothing)
    theirs = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=1, kid_subset_size=150,
                                    kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                    kid_kernel_poly_coef0=1, rng_seed=0, verbose=False)
    assert kid_from_features(x, y) == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9)
    # unequal sizes: the unbiased formula written out
    z = y[:70]
    k = lambda a, b: (a @ b.T / 16 + 1.0) ** 3  # noqa: E731
    kxx, kzz = k(x, x), k(z, z)
    expected = ((kxx.sum() - np.trace(kxx)) / (150 * 149) + (kzz.sum() - np.trace(kzz)) / (70 * 69)
                - 2 * k(x, z).mean())
    assert kid_from_features(x, z) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 points"):
        kid_from_features(x[:1], z)


def test_kid_in_row_blocks_equals_the_whole_matrix(monkeypatch):
    from pdcbdm.metrics import kid as kid_module

    rng = np.random.default_rng(25)
    x, y, labels = rng.normal(size=(40, 6)), rng.normal(size=(33, 6)), np.arange(40) % 4
    whole = kid_from_features(x, y), kid_from_features(x, y[:32], gen_labels=labels, ref_labels=labels[:32])
    monkeypatch.setattr(kid_module, "_BLOCK_ROWS", 7)
    blocked = kid_from_features(x, y), kid_from_features(x, y[:32], gen_labels=labels, ref_labels=labels[:32])
    assert blocked == pytest.approx(whole, rel=1e-12)


def test_kid_is_unbiased_for_two_draws_of_one_distribution():
    rng = np.random.default_rng(23)
    kids, biased = [], []
    for _ in range(300):
        x, y = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
        kids.append(kid_from_features(x, y))
        k = lambda a, b: (a @ b.T / 8 + 1.0) ** 3  # noqa: E731
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    kids, biased = np.array(kids), np.array(biased)
    se = kids.std() / np.sqrt(len(kids))
    assert abs(kids.mean()) < 3 * se            # unbiased: 0 on average at N = 20
    assert biased.mean() > 20 * se              # the V-statistic is not
    assert (kids < 0).any()


def test_class_stratified_kid_removes_the_fixed_count_bias():
    """Sets drawn with a fixed count per class (as the evaluation's): the plain estimate is biased low, the
    stratified one (labels given) is not."""
    rng = np.random.default_rng(24)
    centres = rng.normal(size=(5, 8)) * 3.0
    labels = np.repeat(np.arange(5), 6)
    plain, strat = [], []
    for _ in range(300):
        x = centres[labels] + rng.normal(size=(30, 8))
        y = centres[labels] + rng.normal(size=(30, 8))
        plain.append(kid_from_features(x, y))
        strat.append(kid_from_features(x, y, gen_labels=labels, ref_labels=labels))
        # one class: the stratified estimate is the plain one
        assert kid_from_features(x[:6], y[:6], gen_labels=labels[:6], ref_labels=labels[:6]) == pytest.approx(
            kid_from_features(x[:6], y[:6]), rel=1e-9)
    plain, strat = np.array(plain), np.array(strat)
    se = strat.std() / np.sqrt(len(strat))
    assert abs(strat.mean()) < 3 * se and plain.mean() < -10 * se
    assert group_kid(x, labels, y, labels, [0, 1]) == pytest.approx(
        kid_from_features(x[:12], y[:12], gen_labels=labels[:12], ref_labels=labels[:12]), rel=1e-12)
    assert group_kid(x[:7], labels[:7], y, labels, [1]) is None  # one generated sample of class 1


# ---------------------------------------------------------------- evaluate_features

def _accept_all(num_classes: int, dim: int) -> Judge:
    """A judge that reads every sample (isolates the counting from the rejection rule)."""
    return Judge(0.0, np.inf, np.zeros((num_classes, dim)), np.ones(dim), 0.5, 1.0, 0)


def _labelled_set(seed: int, logits_width: int | None) -> FeatureSet:
    feats, labels = _blobs(np.eye(4, 6) * 10.0, 30, 1.0, seed=seed)
    logits = None
    if logits_width is not None:
        logits = np.zeros((len(labels), logits_width))
        logits[np.arange(len(labels)), labels % logits_width] = 20.0
    return FeatureSet(feats, logits, labels, extractor="test-net")


def test_evaluate_features_on_identical_sets():
    ref = _labelled_set(15, 4)
    gen = FeatureSet(ref.features.copy(), ref.logits.copy(), ref.labels.copy(), extractor="test-net")
    res = evaluate_features(gen, ref, head_classes=(0, 1), tail_classes=(2, 3), num_classes=4, prd_runs=2)
    assert isinstance(res, EvalResult)
    assert abs(res.fid) < 1e-8 and abs(res.fid_head) < 1e-8 and abs(res.fid_tail) < 1e-8
    assert (res.precision, res.recall) == (1.0, 1.0)
    assert res.f8 > 0.99 and res.f1_8 > 0.99
    # 12 samples per split: class counts per split vary, so IS is below 4 but is exactly the 10-split value.
    assert res.inception_score == inception_score(gen.logits, 10) and res.inception_score_note is None
    assert 3.0 < res.inception_score[0] <= 4.0
    assert res.consistency_mean == 1.0 and res.consistency_tail == 1.0 and res.tail_to_head_confusion == 0.0
    # the judge calibrated on `ref` keeps 98% of it (its leave-one-out calibration)
    assert 0.0 < res.reject_rate <= 0.03
    assert abs(res.kid) < 1e-2 * abs(kid_from_features(gen.features, gen.features + 5.0))
    assert res.kid_head is not None and res.kid_tail is not None
    assert res.prd_n == 120 and res.prd_clusters == 12  # min(20 x 4 classes, 120 // 10)
    assert [row["n"] for row in res.per_class] == [30, 30, 30, 30]
    flat = res.to_dict()
    json.dumps(flat)
    assert all(v is None or type(v) in (int, float, str) for v in flat.values())
    assert flat["fid_class_3"] == res.per_class[3]["fid"] and flat["consistency_class_0"] == 1.0
    assert flat["kid_class_2"] == res.per_class[2]["kid"] and flat["reject_rate_class_1"] is not None
    assert flat["is_mean"] == res.inception_score[0]


def test_evaluate_features_reports_confusion_and_missing_classifier():
    ref = _labelled_set(16, 4)
    gen = _labelled_set(17, 4)
    logits = gen.logits.copy()
    feats = gen.features.copy()
    tail3 = np.flatnonzero(gen.labels == 3)[:15]
    logits[tail3] = 0.0
    logits[tail3, 0] = 20.0  # half of class 3 reads as head class 0 ...
    feats[tail3] = gen.features[gen.labels == 0][:15]  # ... because it looks like class 0
    confused = FeatureSet(feats, logits, gen.labels, extractor="test-net")
    res = evaluate_features(confused, ref, head_classes=(0, 1), tail_classes=(2, 3), num_classes=4, prd_runs=1,
                            judge=_accept_all(4, 6))
    assert res.per_class[3]["consistency"] == 0.5 and res.consistency_head == 1.0
    assert res.consistency_tail == pytest.approx(0.75) and res.tail_to_head_confusion == pytest.approx(0.25)
    assert res.reject_rate == 0.0
    # the calibrated judge reads these as class 0 too (the features agree with the logits)
    judged = evaluate_features(confused, ref, head_classes=(0, 1), tail_classes=(2, 3), num_classes=4, prd_runs=1)
    assert judged.tail_to_head_confusion > 0.2 and judged.reject_rate < 0.05
    # logits that disagree with the features (class-3 features, class-0 logits) are not readable: rejected
    odd = FeatureSet(gen.features, logits, gen.labels, extractor="test-net")
    res = evaluate_features(odd, ref, head_classes=(0, 1), tail_classes=(2, 3), num_classes=4, prd_runs=1)
    assert res.per_class[3]["reject_rate"] >= 0.5 and res.tail_to_head_confusion < 0.05

    # 1008-way (Inception-like) logits are not a classifier over these 4 classes; no logits means no IS.
    wide = evaluate_features(_labelled_set(17, 1008), ref, head_classes=(0, 1), tail_classes=(2, 3), num_classes=4,
                             prd_runs=1)
    assert wide.inception_score is not None and wide.consistency_mean is None and wide.consistency_note
    assert all(row["consistency"] is None and row["reject_rate"] is None for row in wide.per_class)
    assert wide.reject_rate is None
    bare = FeatureSet(gen.features, None, gen.labels, extractor="test-net", logits_note="pool3 only")
    res = evaluate_features(bare, ref, head_classes=(0, 1), tail_classes=(2, 3), num_classes=4, prd_runs=1)
    assert res.inception_score is None and res.inception_score_note == "pool3 only"
    assert res.to_dict()["is_mean"] is None


def test_evaluate_features_validates_inputs():
    ref = _labelled_set(18, None)
    other = FeatureSet(ref.features, None, ref.labels, extractor="other-net")
    with pytest.raises(ValueError, match="different feature extractors"):
        evaluate_features(other, ref, head_classes=(0,), tail_classes=(1,), num_classes=4)
    with pytest.raises(ValueError, match="both head_classes and tail_classes"):
        evaluate_features(ref, ref, head_classes=(0, 1), tail_classes=(1, 2), num_classes=4)
    with pytest.raises(ValueError, match="tail_classes"):
        evaluate_features(ref, ref, head_classes=(0,), tail_classes=(7,), num_classes=4)
    with pytest.raises(ValueError, match="gen.labels"):
        evaluate_features(ref, ref, head_classes=(0,), tail_classes=(1,), num_classes=3)
    with pytest.raises(ValueError, match="labels must be"):
        FeatureSet(np.zeros((3, 2)), None, np.zeros(4, dtype=int))


def test_evaluate_features_accepts_plain_tuples():
    ref = _labelled_set(19, None)
    res = evaluate_features((ref.features, None, ref.labels), (ref.features, None, ref.labels),
                            head_classes=(0, 1, 2), tail_classes=(3,), num_classes=4, prd_runs=1)
    assert abs(res.fid) < 1e-8 and res.inception_score is None


def test_feature_set_npz_round_trip(tmp_path):
    fs = _labelled_set(20, 4)
    path = save_feature_set(tmp_path / "ref.npz", fs, "data/x")
    back = load_feature_set(path)
    assert np.array_equal(back.features, fs.features) and np.array_equal(back.logits, fs.logits)
    assert np.array_equal(back.labels, fs.labels) and back.extractor == "test-net"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_feature_set(tmp_path / "missing.npz")
