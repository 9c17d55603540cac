"""The memorisation check (pdcbdm.metrics.memorisation) on seeded synthetic Gaussian features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdcbdm.metrics.memorisation import memorisation_floor, memorisation_share, memorised, nearest_neighbours

# A long-tailed toy set: K Gaussian classes (unit spread, means 3 sd apart on average) in D dimensions; 3 head
# classes with 600 training / 240 held-out images each, 3 tail classes with 30 / 10.
K, D = 6, 8
HEAD, TAIL = [0, 1, 2], [3, 4, 5]
TRAIN_COUNTS = [600] * 3 + [30] * 3
HELD_COUNTS = [240] * 3 + [10] * 3
GEN_COUNTS = [2 * n for n in HELD_COUNTS]  # the held-out composition: the overall shares are comparable

# |fresh share - floor| at these sizes, over 300 seeds: mean -0.002, sd 0.024, largest 0.069; head classes alone
# (what the tail-copy test compares) mean -0.001. 0.08 is above every one of the 300 and 3.4 sd: a fresh generator
# passes, and it still separates the floor (about 0.56, 0.51-0.60 over those seeds) from copies (1.0).
TOLERANCE = 0.08


def _draw(rng: np.random.Generator, means: np.ndarray, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(counts)), counts)
    return means[labels] + rng.normal(size=(len(labels), means.shape[1])), labels


def _world(seed: int):
    """(rng, class means, train features, train labels, held-out features, held-out labels)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, D)) * 3.0
    train, train_y = _draw(rng, means, TRAIN_COUNTS)
    held, held_y = _draw(rng, means, HELD_COUNTS)
    return rng, means, train, train_y, held, held_y


def _head_share(result: dict, counts: list[int]) -> float:
    """Share over the head classes' samples, from the per-class shares and each class's count."""
    shares = [result["memorisation_class"][c] for c in HEAD]
    return float(np.dot(shares, [counts[c] for c in HEAD]) / sum(counts[c] for c in HEAD))


def _brute_nearest(queries: np.ndarray, points: np.ndarray, exclude_self: bool = False):
    d = np.linalg.norm(queries[:, None, :] - points[None, :, :], axis=2)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    index = d.argmin(axis=1)
    return index, d[np.arange(len(queries)), index]


# ---------------------------------------------------------------- nearest neighbours

@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_blocked_nearest_neighbours_equal_brute_force(dtype, rtol):
    rng = np.random.default_rng(0)
    queries, points = rng.normal(size=(53, 5)) + 0.3, rng.normal(size=(41, 5)) * 1.2
    want_index, want_distance = _brute_nearest(queries, points)
    for block_rows in (7, None):  # 7: eight blocks, the last one partial; None: one block
        index, distance = nearest_neighbours(queries, points, block_rows=block_rows, dtype=dtype)
        assert index.dtype == np.int64 and distance.dtype == np.float64
        np.testing.assert_array_equal(index, want_index)
        np.testing.assert_allclose(distance, want_distance, rtol=rtol)


def test_exclude_self_finds_the_nearest_other_point():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    x[9] = x[5]  # a duplicate: its twin is its nearest other point, at distance exactly 0
    index, distance = nearest_neighbours(x, x)
    np.testing.assert_array_equal(distance[[0, 1, 2]], 0.0)
    assert set(index[[5, 9]]) <= {5, 9} and np.all(index[:5] == np.arange(5))

    index, distance = nearest_neighbours(x, x, exclude_self=True, block_rows=4)
    want_index, want_distance = _brute_nearest(x, x, exclude_self=True)
    assert np.all(index != np.arange(30))
    assert index[5] == 9 and index[9] == 5 and distance[5] == 0.0 and distance[9] == 0.0
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(distance, want_distance, rtol=1e-12)


def test_a_copy_is_at_distance_exactly_zero():
    # the one-matmul expansion leaves a rounding residue on the diagonal (float32, 256-d, spread 100: up to 1.0
    # squared); the returned distances are recomputed as ||q - p||, so a copy is at 0 in either dtype
    x = np.random.default_rng(8).normal(size=(50, 256)) * 100.0
    for dtype in (torch.float32, torch.float64):
        index, distance = nearest_neighbours(x.copy(), x, dtype=dtype)
        np.testing.assert_array_equal(index, np.arange(50))
        np.testing.assert_array_equal(distance, 0.0)


# ---------------------------------------------------------------- the rule, per sample

def test_memorised_follows_the_rule():
    rng = np.random.default_rng(2)
    train, held, gen = rng.normal(size=(80, 3)), rng.normal(size=(25, 3)), rng.normal(size=(60, 3))
    t, g_to_t = _brute_nearest(gen, train)
    _, radius = _brute_nearest(train, held)
    want = g_to_t < radius[t]
    assert 0 < want.sum() < len(want)  # both outcomes occur
    np.testing.assert_array_equal(memorised(gen, train, held, block_rows=9), want)


def test_floor_scores_each_heldout_image_leave_one_out():
    rng = np.random.default_rng(3)
    train, held = rng.normal(size=(70, 3)), rng.normal(size=(40, 3))
    t, h_to_t = _brute_nearest(held, train)
    d = np.linalg.norm(train[t][:, None, :] - held[None, :, :], axis=2)  # [H, H]: t(h) to every held-out image
    np.fill_diagonal(d, np.inf)  # ... other than h
    want = h_to_t < d.min(axis=1)
    # h itself as a competitor would never flag h (r(t) <= ||h - t||): leave-one-out is what makes these True
    assert 0 < want.sum() < len(want)
    # one class per held-out image: the per-class shares are the per-image flags
    floor = memorisation_floor(train, held, np.arange(40), num_classes=40, tail_classes=[], block_rows=6)
    np.testing.assert_array_equal(np.array(floor["memorisation_class"]), want.astype(float))
    assert floor["memorisation"] == pytest.approx(want.mean())
    assert floor["memorisation_tail"] is None


# ---------------------------------------------------------------- shares against the floor

def test_copies_of_training_images_are_all_memorised():
    rng, _, train, train_y, held, _ = _world(0)
    picked = rng.choice(len(train), size=300, replace=False)
    result = memorisation_share(train[picked].copy(), train_y[picked], train, held, num_classes=K, tail_classes=TAIL)
    assert result["memorisation"] == 1.0
    present = set(train_y[picked].tolist())
    assert all((share == 1.0) if c in present else (share is None)
               for c, share in enumerate(result["memorisation_class"]))
    assert result["memorisation_tail"] == (1.0 if present & set(TAIL) else None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fresh_draws_score_near_the_floor(seed):
    rng, means, train, _, held, held_y = _world(seed)
    gen, gen_y = _draw(rng, means, GEN_COUNTS)
    floor = memorisation_floor(train, held, held_y, num_classes=K, tail_classes=TAIL)
    share = memorisation_share(gen, gen_y, train, held, num_classes=K, tail_classes=TAIL)
    # fresh real images are flagged often (N/H = 2.5 here), yet far from the 1.0 of copies
    assert 0.3 < floor["memorisation"] < 0.8
    assert abs(share["memorisation"] - floor["memorisation"]) < TOLERANCE
    assert set(floor) == set(share) == {"memorisation", "memorisation_tail", "memorisation_class"}
    assert len(share["memorisation_class"]) == K and None not in share["memorisation_class"]


def test_copying_the_tail_raises_the_tail_share_only():
    rng, means, train, train_y, held, held_y = _world(4)
    fresh, gen_y = _draw(rng, means, GEN_COUNTS)
    copies = fresh.copy()
    for c in TAIL:  # each tail sample replaced by a copy of one of its class's 30 training images
        rows = np.flatnonzero(gen_y == c)
        copies[rows] = train[rng.choice(np.flatnonzero(train_y == c), size=len(rows))]
    floor = memorisation_floor(train, held, held_y, num_classes=K, tail_classes=TAIL)
    before = memorisation_share(fresh, gen_y, train, held, num_classes=K, tail_classes=TAIL)
    after = memorisation_share(copies, gen_y, train, held, num_classes=K, tail_classes=TAIL)
    assert before["memorisation_tail"] < 0.8
    assert after["memorisation_tail"] == 1.0
    assert after["memorisation_class"][3:] == [1.0, 1.0, 1.0]
    # the head samples are untouched: their flags, so their shares, are the fresh ones, near the floor
    assert after["memorisation_class"][:3] == before["memorisation_class"][:3]
    assert abs(_head_share(after, GEN_COUNTS) - _head_share(floor, HELD_COUNTS)) < TOLERANCE


def test_groups_without_samples_are_none():
    rng, means, train, _, held, _ = _world(5)
    gen, gen_y = _draw(rng, means, [20, 0, 20, 0, 0, 0])
    result = memorisation_share(gen, gen_y, train, held, num_classes=K, tail_classes=TAIL)
    assert result["memorisation_tail"] is None
    assert [share is None for share in result["memorisation_class"]] == [False, True, False, True, True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpu_flags():
    rng, means, train, _, held, _ = _world(6)
    gen, _ = _draw(rng, means, GEN_COUNTS)
    np.testing.assert_array_equal(memorised(gen, train, held, device="cuda"), memorised(gen, train, held))


# ---------------------------------------------------------------- bad input

def _bad_inputs():
    rng = np.random.default_rng(7)
    train, held, gen = rng.normal(size=(20, 3)), rng.normal(size=(10, 3)), rng.normal(size=(12, 3))
    gen_y, held_y = np.arange(12) % 3, np.arange(10) % 3
    nan, inf = gen.copy(), train.copy()
    nan[4, 1], inf[2, 0] = np.nan, np.inf

    def share(g=gen, y=gen_y, tr=train, h=held, k=3, tail=(2,)):
        return lambda: memorisation_share(g, y, tr, h, num_classes=k, tail_classes=tail)

    def floor(tr=train, h=held, y=held_y, k=3, tail=(2,)):
        return lambda: memorisation_floor(tr, h, y, num_classes=k, tail_classes=tail)

    return {
        "empty train": (share(tr=train[:0]), "train_features"),
        "empty held-out": (share(h=held[:0]), "heldout_features"),
        "empty generated": (share(g=gen[:0], y=gen_y[:0]), "gen_features"),
        "empty train, floor": (floor(tr=train[:0]), "train_features"),
        "one held-out, floor": (floor(h=held[:1], y=held_y[:1]), "heldout_features"),
        "generated dim": (share(g=gen[:, :2]), "gen_features"),
        "held-out dim": (share(h=held[:, :2]), "heldout_features"),
        "held-out dim, floor": (floor(h=held[:, :2]), "heldout_features"),
        "query dim": (lambda: nearest_neighbours(gen[:, :2], train), "queries"),
        "1-d features": (share(g=gen[:, 0]), "gen_features"),
        "labels too short": (share(y=gen_y[:-1]), "gen_labels"),
        "labels 2-d": (share(y=gen_y[:, None]), "gen_labels"),
        "labels negative": (share(y=np.r_[-1, gen_y[1:]]), "gen_labels"),
        "labels >= K": (share(y=np.r_[3, gen_y[1:]]), "gen_labels"),
        "labels float": (share(y=gen_y.astype(float)), "gen_labels"),
        "held-out labels >= K": (floor(y=np.r_[3, held_y[1:]]), "heldout_labels"),
        "held-out labels short": (floor(y=held_y[:-1]), "heldout_labels"),
        "NaN generated": (share(g=nan), "gen_features"),
        "inf train": (share(tr=inf), "train_features"),
        "NaN held-out, floor": (floor(h=np.where(np.eye(10, 3, dtype=bool), np.nan, held)), "heldout_features"),
        "tail class >= K": (share(tail=(3,)), "tail_classes"),
        "no classes": (floor(k=0, tail=()), "num_classes"),
        "block rows": (lambda: nearest_neighbours(gen, train, block_rows=0), "block_rows"),
        "exclude_self, two sets": (lambda: nearest_neighbours(gen, train, exclude_self=True), "exclude_self"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_naming_the_argument(case):
    call, name = _bad_inputs()[case]
    with pytest.raises(ValueError, match=name):
        call()
