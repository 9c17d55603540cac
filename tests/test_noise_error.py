"""The noise-error measure (Algorithm 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pdcbdm.diffusion import GaussianDiffusion, extract
from pdcbdm.noise_error import noise_error
from tests.toynet import ToyNet


class Oracle(nn.Module):
    """Knows the clean images, so it recovers the exact noise from x_t (Eq. 2 inverted)."""

    def __init__(self, x0: torch.Tensor, diffusion: GaussianDiffusion) -> None:
        super().__init__()
        self.x0, self.d = x0, diffusion

    def forward(self, x_t, t, y):
        a = extract(self.d.alphas_bar.sqrt(), t, x_t)
        s = extract((1 - self.d.alphas_bar).sqrt(), t, x_t)
        return (x_t - a * self.x0) / s


def test_oracle_has_zero_noise_error_and_a_real_net_does_not():
    d = GaussianDiffusion()
    x0 = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.arange(4)
    assert noise_error(Oracle(x0, d), d, [(x0, y)], stride=10) < 1e-12
    torch.manual_seed(0)
    err = noise_error(ToyNet(num_classes=4).double(), d, [(x0, y)], stride=100, metric="mae")
    assert err > 0.1


def test_noise_error_is_deterministic_and_validates():
    d = GaussianDiffusion()
    net = ToyNet(num_classes=4)
    data = [(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))]
    assert noise_error(net, d, data, stride=200, seed=3) == noise_error(net, d, data, stride=200, seed=3)
    with pytest.raises(ValueError, match="metric"):
        noise_error(net, d, data, metric="l3")
    with pytest.raises(ValueError, match="no images"):
        noise_error(net, d, [], stride=500)
