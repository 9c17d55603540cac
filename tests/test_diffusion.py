"""The diffusion process (Eq. 1-8) and the samplers."""

from __future__ import annotations

import pytest
import torch

from pdcbdm.config import DiffusionConfig
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.sampling import ddim_sample, ddim_timesteps, generate, guided_eps, to_uint8, uniform_labels
from tests.toynet import ToyNet


def test_schedule_is_float64_linear():
    d = GaussianDiffusion()
    assert d.betas.dtype == torch.float64
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(d.alphas_bar, torch.cumprod(1 - d.betas, 0))
    assert d.sigma2[0] == d.posterior_variance[1] and torch.equal(d.sigma2[1:], d.betas[1:])
    small = GaussianDiffusion(DiffusionConfig(var_type="fixedsmall"))
    # betatilde at index 0 is 0; clipped to the next entry as CBDM does
    assert small.posterior_variance[0] == 0 and small.sigma2[0] == small.posterior_variance[1]
    assert torch.equal(small.sigma2[1:], small.posterior_variance[1:])


def test_q_sample_and_x0_inverse():
    d = GaussianDiffusion()
    torch.manual_seed(0)  # x0 error at t = 999 is float32 error / sqrt(abar) = 1/160: seeded, not left to chance
    x0, eps, t = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, eps)
    ab = d.alphas_bar[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)
    assert torch.allclose(d.x0_from_eps(x_t, t, eps), x0, atol=1e-3)


def test_eq7_mean_equals_posterior_mean_of_predicted_x0():
    d = GaussianDiffusion()
    x_t, eps, t = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([1, 300, 999])
    mu = d.mean_from_eps(x_t, t, eps)
    assert torch.allclose(mu, d.posterior_mean(d.x0_from_eps(x_t, t, eps), x_t, t), atol=1e-9)


def test_guidance_zero_is_the_conditional_prediction_and_w_combines():
    torch.manual_seed(0)
    net = ToyNet(num_classes=3)
    x, t, y = torch.randn(5, 1, 4, 4), torch.randint(0, 1000, (5,)), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        assert torch.equal(guided_eps(net, x, t, y, 0.0, 3), net(x, t, y))
        w = 1.5
        ref = (1 + w) * net(x, t, y) - w * net(x, t, torch.full_like(y, 3))
        assert torch.allclose(guided_eps(net, x, t, y, w, 3), ref, atol=1e-6)


def test_ddim_is_deterministic_for_a_seed_and_changes_with_it():
    torch.manual_seed(0)
    net, d = ToyNet(num_classes=3), GaussianDiffusion()
    y = uniform_labels(6, 3)
    a = ddim_sample(net, d, y, (1, 4, 4), steps=5, guidance=1.0, null_label=3, generator=torch.Generator().manual_seed(7))
    b = ddim_sample(net, d, y, (1, 4, 4), steps=5, guidance=1.0, null_label=3, generator=torch.Generator().manual_seed(7))
    c = ddim_sample(net, d, y, (1, 4, 4), steps=5, guidance=1.0, null_label=3, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_ddim_timesteps_and_generate_uint8():
    assert ddim_timesteps(1000, 1) == [0]
    seq = ddim_timesteps(1000, 10)
    assert seq[0] == 999 and seq[-1] == 0 and len(seq) == 10
    with pytest.raises(ValueError, match="DDIM steps"):
        ddim_timesteps(1000, 0)
    torch.manual_seed(0)
    net, d = ToyNet(num_classes=2), GaussianDiffusion(DiffusionConfig(timesteps=20))
    imgs = generate(net, d, uniform_labels(5, 2), (1, 4, 4), sampler="ddpm", null_label=2, batch_size=2, seed=1)
    assert imgs.dtype == torch.uint8 and imgs.shape == (5, 1, 4, 4)
    again = generate(net, d, uniform_labels(5, 2), (1, 4, 4), sampler="ddpm", null_label=2, batch_size=2, seed=1)
    assert torch.equal(imgs, again)


def test_uniform_labels_balanced():
    assert torch.bincount(uniform_labels(100, 10)).tolist() == [10] * 10


def test_paper_protocol_is_unclipped_ancestral_ddpm_with_fixedlarge():
    """eval.protocol=paper (the cifar presets' default): 1000-step ancestral DDPM, fixedlarge, the mean of Eq. 7
    before any x0 clipping, as CBDM's evaluation; proxies keep the config's sampler."""
    from pdcbdm.config import apply_overrides
    from pdcbdm.evaluation import final_sampling, sampler_settings
    from pdcbdm.presets import preset

    for name in ("cifar10-lt", "cifar100-lt"):
        cfg = apply_overrides(preset(name), ["diffusion.var_type=fixedsmall"])
        assert cfg.eval.protocol == "paper"
        diff_cfg, kw = final_sampling(cfg)
        assert diff_cfg.var_type == "fixedlarge" and kw["sampler"] == "ddpm" and kw["clip_x0"] is False
        assert sampler_settings(cfg)["sampler"] == "ddim"
    fast = preset("digits")
    assert fast.eval.protocol == "fast" and final_sampling(fast) == (fast.diffusion, sampler_settings(fast))

    # unclipped DDPM is exactly x_{t-1} = mu_theta (Eq. 7) + sigma_t z
    diff = GaussianDiffusion(DiffusionConfig(timesteps=20))
    torch.manual_seed(0)
    net = ToyNet(num_classes=3)
    labels = torch.tensor([0, 2])
    got = generate(net, diff, labels, (1, 8, 8), sampler="ddpm", guidance=0.0, null_label=3, seed=5, clip_x0=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x = torch.randn((2, 1, 8, 8), generator=g)
        for i in range(19, -1, -1):
            t = torch.full((2,), i, dtype=torch.long)
            mean = diff.mean_from_eps(x, t, net(x, t, labels))
            x = mean + diff.variance(t, x).sqrt() * torch.randn(x.shape, generator=g) if i > 0 else mean
    assert torch.equal(got, to_uint8(x))
