"""Target-label distributions (Eq. 9, 12)."""

from __future__ import annotations

import pytest
import torch

from pdcbdm.config import ConfigError
from pdcbdm.labels import from_spec, sample_labels, target_distribution

COUNTS = [500, 200, 50, 10, 5]


def test_inverted_is_proportional_to_inverse_counts_and_sums_to_one():
    q = target_distribution(COUNTS, "inverted")
    inv = 1.0 / torch.tensor(COUNTS, dtype=torch.float64)
    assert torch.allclose(q, inv / inv.sum())
    assert abs(float(q.sum()) - 1) < 1e-12
    assert q.argmax() == 4  # the rarest class is drawn most


def test_cbdm_is_frequency_and_uniform_is_flat():
    n = torch.tensor(COUNTS, dtype=torch.float64)
    assert torch.allclose(target_distribution(COUNTS, "cbdm"), n / n.sum())
    assert torch.allclose(target_distribution(COUNTS, "uniform"), torch.full((5,), 0.2, dtype=torch.float64))


def test_power_family_interpolates():
    assert torch.allclose(target_distribution(COUNTS, "power", 1.0), target_distribution(COUNTS, "inverted"))
    assert torch.allclose(target_distribution(COUNTS, "power", -1.0), target_distribution(COUNTS, "cbdm"))
    assert torch.allclose(from_spec(COUNTS, "power:0.5"), target_distribution(COUNTS, "power", 0.5))


def test_zero_count_class_gets_zero_probability():
    q = target_distribution([10, 0, 5], "inverted")
    assert q[1] == 0 and abs(float(q.sum()) - 1) < 1e-12


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown target distribution"):
        target_distribution(COUNTS, "zipf")
    with pytest.raises(ValueError, match="counts"):
        target_distribution([], "cbdm")
    with pytest.raises(ConfigError, match="label_dist"):
        from_spec(COUNTS, "power:x")


def test_seeded_sampling_is_reproducible_and_follows_q():
    q = target_distribution(COUNTS, "inverted")
    a = sample_labels(q, 20000, torch.Generator().manual_seed(1))
    b = sample_labels(q, 20000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=5).double() / 20000
    assert torch.allclose(freq, q, atol=0.02)
