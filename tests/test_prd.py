"""PRD's k-means (torch, on the features' device) and the feature statistics' device path: exact on separated
clusters, seeded, as good as scikit-learn's KMeans, and the PRD F-scores it gives at their known extremes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdcbdm.metrics import ReferenceStatistics, feature_statistics, fid_to_reference, prd_f_scores
from pdcbdm.metrics.prd import KMeansResult, _nearest_centres, kmeans


def _mixture(n_per: int, centres: np.ndarray, std: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs of ``n_per`` points around each of ``centres`` [B, D]; (points, blob index)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), n_per)
    return centres[labels] + std * rng.standard_normal((len(labels), centres.shape[1])), labels


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labelings split the points the same way (cluster numbers aside)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_finds_well_separated_clusters_exactly():
    centres = np.random.default_rng(0).standard_normal((8, 32)) * 30.0
    x, blobs = _mixture(50, centres, 1.0, seed=1)
    out = kmeans(torch.tensor(x, dtype=torch.float32), 8, seed=0, n_init=5)
    assert isinstance(out, KMeansResult) and out.labels.dtype == torch.int64 and out.centres.shape == (8, 32)
    labels = out.labels.numpy()
    assert _same_partition(labels, blobs)
    for k in range(8):  # each centre is its blob's mean
        assert np.allclose(out.centres[k].numpy(), x[labels == k].mean(axis=0), atol=1e-4)
    assert out.inertia == pytest.approx(((x - out.centres.numpy()[labels]) ** 2).sum(), rel=1e-4)


def test_kmeans_is_deterministic_for_a_seed():
    x = torch.tensor(_mixture(40, np.random.default_rng(2).standard_normal((6, 16)) * 3.0, 1.0, seed=3)[0],
                     dtype=torch.float32)
    first, again = kmeans(x, 12, seed=7, n_init=3), kmeans(x, 12, seed=7, n_init=3)
    assert torch.equal(first.labels, again.labels) and torch.equal(first.centres, again.centres)
    assert first.inertia == again.inertia and first.iterations == again.iterations


def test_kmeans_is_as_good_as_scikit_learns():
    """Overlapping clusters (a local optimum only): the inertia within 2% of scikit-learn's KMeans, 10 seedings."""
    from sklearn.cluster import KMeans

    x, _ = _mixture(60, np.random.default_rng(4).standard_normal((10, 20)) * 2.0, 1.0, seed=5)
    ours = kmeans(torch.tensor(x, dtype=torch.float32), 20, seed=0, n_init=10).inertia
    theirs = KMeans(n_clusters=20, n_init=10, random_state=0).fit(x).inertia_
    assert ours <= 1.02 * theirs


def test_kmeans_keeps_every_cluster_and_survives_coinciding_points():
    """Three distinct points repeated: k = 3 finds all three (an emptied centre moves to a far point); points that
    all coincide still give a clustering."""
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).repeat(20, 1)
    out = kmeans(x, 3, seed=1, n_init=1)
    assert torch.bincount(out.labels, minlength=3).tolist() == [20, 20, 20] and out.inertia == 0.0
    same = kmeans(torch.ones(30, 4), 2, seed=0, n_init=2)
    assert same.labels.shape == (30,) and same.inertia == 0.0
    with pytest.raises(ValueError, match="k <= N"):
        kmeans(torch.ones(3, 2), 4)


def test_nearest_centres_in_blocks_equal_one_block():
    x = torch.randn(257, 9, generator=torch.Generator().manual_seed(0))
    c = torch.randn(5, 9, generator=torch.Generator().manual_seed(1))
    sq = (x * x).sum(dim=1)
    labels, d2 = _nearest_centres(x, sq, c)
    small_labels, small_d2 = _nearest_centres(x, sq, c, block_elements=7)  # one row per block
    assert torch.equal(labels, small_labels) and torch.allclose(d2, small_d2)
    assert torch.equal(labels, torch.cdist(x, c).argmin(dim=1))
    assert torch.allclose(d2, torch.cdist(x, c).min(dim=1).values ** 2, atol=1e-4)


def test_prd_of_two_draws_of_one_distribution_is_near_one_of_disjoint_ones_near_zero():
    centres = np.random.default_rng(6).standard_normal((10, 64)) * 4.0
    a, _ = _mixture(100, centres, 1.0, seed=7)
    b, _ = _mixture(100, centres, 1.0, seed=8)
    f8, f1_8 = prd_f_scores(a, b, num_clusters=50, num_runs=3, n_init=3, device="cpu")
    assert f8 > 0.95 and f1_8 > 0.95
    f8, f1_8 = prd_f_scores(a + 100.0, b, num_clusters=50, num_runs=3, n_init=3, device="cpu")
    assert f8 < 0.01 and f1_8 < 0.01


def test_prd_honours_the_device_and_accepts_tensors():
    """device="cpu" is the default's result; tensor inputs give the numpy inputs' result."""
    centres = np.random.default_rng(9).standard_normal((4, 8)) * 5.0
    a, _ = _mixture(50, centres, 1.0, seed=10)
    b, _ = _mixture(50, centres[:3], 1.0, seed=11)
    plain = prd_f_scores(a, b, num_clusters=10, num_runs=2, seed=3)
    assert prd_f_scores(a, b, num_clusters=10, num_runs=2, seed=3, device=torch.device("cpu")) == plain
    assert prd_f_scores(torch.tensor(a), torch.tensor(b), num_clusters=10, num_runs=2, seed=3, device="cpu") == plain
    assert plain[0] > plain[1]  # a adds a fourth mode to b's three: recall-like above precision-like


def test_feature_statistics_on_a_device_equal_numpys():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((300, 7)) @ rng.standard_normal((7, 7)) + 3.0
    w = rng.uniform(0.1, 2.0, size=300)
    for weights in (None, w):
        mu, sigma = feature_statistics(x, weights)
        mu_t, sigma_t = feature_statistics(torch.tensor(x, dtype=torch.float32), weights, device="cpu")
        assert mu_t.dtype == sigma_t.dtype == np.float64
        assert np.allclose(mu_t, mu, atol=1e-5) and np.allclose(sigma_t, sigma, atol=1e-4)
        assert np.allclose(feature_statistics(x, weights, device="cpu")[1], sigma, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 rows"):
        feature_statistics(np.zeros((1, 3)), device="cpu")
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(np.full((4, 3), np.nan), device="cpu")
    with pytest.raises(ValueError, match="all mass on one row"):
        feature_statistics(x, np.eye(300)[0], device="cpu")


def test_fid_to_reference_on_a_device_equals_the_cpu_one():
    rng = np.random.default_rng(13)
    labels = np.arange(200) % 4
    ref, gen = rng.standard_normal((200, 5)) + labels[:, None], rng.standard_normal((80, 5)) + 0.3
    gen_labels = np.arange(80) % 4
    plain = fid_to_reference(gen, ReferenceStatistics(ref, labels))
    on_device = ReferenceStatistics(ref, labels)
    assert fid_to_reference(gen, on_device, device="cpu") == pytest.approx(plain, rel=1e-9)
    assert fid_to_reference(torch.tensor(gen), on_device, [1, 2], gen_labels, device="cpu") == pytest.approx(
        fid_to_reference(gen, ReferenceStatistics(ref, labels), [1, 2], gen_labels), rel=1e-9)
