"""Loss terms (Eq. 8-11) and the composed objective."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from pdcbdm.config import DiffusionConfig, LossConfig
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.labels import target_distribution
from pdcbdm.losses import cbdm_loss, dm_loss, gaussian_kl_same_var, pd_loss
from pdcbdm.training.step import Batch, compute_loss, pd_terms
from tests.toynet import ToyNet


def test_dm_loss_is_per_sample_mse():
    a, b = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert torch.allclose(dm_loss(a, b), ((a - b) ** 2).flatten(1).mean(1))


def test_cbdm_gradient_flow_matches_stop_gradients():
    """Eq. 9: the first term moves only eps(y), the second only eps(y')."""
    t = torch.tensor([499, 999])
    for gamma, expect_y, expect_yp in ((0.0, True, False), (1.0, True, True)):
        eps_y = torch.randn(2, 1, 4, 4, requires_grad=True)
        eps_yp = torch.randn(2, 1, 4, 4, requires_grad=True)
        cbdm_loss(eps_y, eps_yp, t, 1000, tau=1.0, gamma=gamma).sum().backward()
        assert (eps_y.grad.abs().sum() > 0) == expect_y
        assert (eps_yp.grad is not None and eps_yp.grad.abs().sum() > 0) == expect_yp
    # the second term alone: only eps(y') receives gradient, scaled by gamma
    eps_y = torch.randn(2, 1, 4, 4, requires_grad=True)
    eps_yp = torch.randn(2, 1, 4, 4, requires_grad=True)
    full = cbdm_loss(eps_y, eps_yp, t, 1000, tau=1.0, gamma=0.25).sum()
    g_y, g_yp = torch.autograd.grad(full, [eps_y, eps_yp])
    diff = (eps_y - eps_yp).detach()
    w = ((t.float() + 1) / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(g_y, w * 2 * diff / 16, atol=1e-6)
    assert torch.allclose(g_yp, -0.25 * w * 2 * diff / 16, atol=1e-6)


def test_cbdm_weight_grows_with_t():
    e1, e2 = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    vals = cbdm_loss(e1, e2, torch.tensor([0, 999]), 1000, tau=2.0, gamma=0.0)
    assert torch.allclose(vals, torch.tensor([2.0 / 1000, 2.0]))


def test_kl_matches_torch_distributions():
    mu_h, mu_l = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigma2 = torch.tensor([0.01, 0.1, 0.5]).view(-1, 1, 1, 1)
    ours = gaussian_kl_same_var(mu_h, mu_l, sigma2)
    std = sigma2.sqrt().expand_as(mu_h)
    ref = kl_divergence(Independent(Normal(mu_h, std), 3), Independent(Normal(mu_l, std), 3))
    assert torch.allclose(ours * mu_h[0].numel(), ref, rtol=1e-5)


def test_pd_loss_forms():
    kl = torch.tensor([0.0, 1.0, 1e6])
    assert torch.allclose(pd_loss(kl, 0.5, "plain"), -0.5 * kl)
    sat = pd_loss(kl, 0.5, "saturating", 1.0)
    assert sat[0] == 0 and torch.isclose(sat[1], torch.tensor(-0.25)) and sat[2] > -0.5
    assert bool((sat >= -0.5).all())


def test_distance_form_is_bounded_below_by_its_margin():
    """-lambda m d_ref [tanh(d / (m d_ref)) - tanh(1 / m)] >= -lambda m d_ref (1 - tanh(1 / m)) however far apart the
    network pushes the pair, and it is 0 at the true posteriors' separation d = d_ref."""
    kl_ref = torch.tensor([4.0, 0.01, 1e4])
    floor = -0.1 * 2.0 * kl_ref.sqrt() * (1 - torch.tanh(torch.tensor(0.5)))
    for kl in (torch.zeros(3), kl_ref, torch.full((3,), 1e12)):
        assert bool((pd_loss(kl, 0.1, "distance", 2.0, kl_ref) >= floor - 1e-6).all())
    assert torch.allclose(pd_loss(torch.full((3,), 1e12), 0.1, "distance", 2.0, kl_ref), floor, rtol=1e-4)
    assert torch.allclose(pd_loss(kl_ref, 0.1, "distance", 2.0, kl_ref), torch.zeros(3), atol=1e-6)
    # near d = 0 it acts as -lambda d, whatever the pair's true separation
    d = torch.full((3,), 1e-4, requires_grad=True)
    (g,) = torch.autograd.grad(pd_loss(d ** 2, 0.1, "distance", 2.0, kl_ref).sum(), d)
    assert torch.allclose(g, torch.full((3,), -0.1), atol=1e-4)
    with pytest.raises(ValueError, match="kl_ref"):
        pd_loss(kl_ref, 0.1, "distance")


def test_distance_form_gradient_in_noise_space_does_not_depend_on_t():
    """In noise units (Eq. 7) the pull on each eps prediction has the same size at every t, unlike the plain KL."""
    diff = GaussianDiffusion()
    cfg_d = LossConfig(pd_form="distance", pd_weight=1.0, pd_scale=1e6)
    cfg_p = LossConfig(pd_form="plain", pd_weight=1.0)
    torch.manual_seed(0)
    xh, xl = torch.rand(1, 1, 8, 8) * 2 - 1, torch.rand(1, 1, 8, 8) * 2 - 1
    eps = torch.randn(1, 1, 8, 8)
    norms = {"distance": [], "plain": []}
    for t_idx in (0, 300, 800):
        t = torch.tensor([t_idx])
        xh_t, xl_t = diff.q_sample(xh, t, eps), diff.q_sample(xl, t, eps)
        for name, cfg in (("distance", cfg_d), ("plain", cfg_p)):
            e_h = (eps + 0.1 * torch.randn_like(eps)).requires_grad_(True)
            pd, _ = pd_terms(diff, xh_t, xl_t, t, e_h, eps.clone(), cfg, eps)
            (g,) = torch.autograd.grad(pd.sum(), e_h)
            norms[name].append(float(g.norm()))
    assert max(norms["distance"]) / min(norms["distance"]) < 1.05
    assert max(norms["plain"]) / min(norms["plain"]) > 100


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_pd_is_finite_at_t_index_0(var_type):
    """fixedsmall's posterior variance is 0 at t index 0; it is clipped to the next entry as CBDM does."""
    diff = GaussianDiffusion(DiffusionConfig(var_type=var_type))
    assert float(diff.sigma2[0]) > 0 and float(diff.sigma2.min()) > 0
    torch.manual_seed(0)
    net = ToyNet(num_classes=4)
    xh, xl, eps = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    t = torch.zeros(2, dtype=torch.long)
    xh_t, xl_t = diff.q_sample(xh, t, eps), diff.q_sample(xl, t, eps)
    for form in ("distance", "plain", "saturating"):
        cfg = LossConfig(pd_form=form)
        pd, kl = pd_terms(diff, xh_t, xl_t, t, net(xh_t, t, torch.tensor([0, 1])), net(xl_t, t, torch.tensor([3, 2])),
                          cfg, eps)
        assert bool(torch.isfinite(pd).all()) and bool(torch.isfinite(kl).all())
        pd.sum().backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.grad is not None)
        net.zero_grad()


def _setup(cfg: LossConfig, seed: int = 0):
    torch.manual_seed(seed)
    net = ToyNet(num_classes=4)
    diff = GaussianDiffusion()
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 0, 1, 2, 3, 0])
    head = (torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([0, 0, 1]))
    tail = (torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([3, 2, 3]))
    probs = target_distribution([10, 5, 2, 1], "inverted")
    return net, diff, Batch(x0, y, head, tail), probs


def test_all_extras_off_is_exactly_ddpm_cfg():
    cfg = LossConfig(cbdm_tau=0.0, pd_weight=0.0, p_uncond=0.1)
    for seed in range(5):
        net, diff, batch, probs = _setup(cfg)
        loss, terms = compute_loss(net, diff, batch, cfg, label_probs=probs, null_label=4,
                                   generator=torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, 1000, (6,), generator=g)
        eps = torch.randn(batch.x0.shape, generator=g)
        uncond = float(torch.rand((), generator=g)) < 0.1
        y = torch.full_like(batch.y, 4) if uncond else batch.y
        ref = ((net(diff.q_sample(batch.x0, t, eps), t, y) - eps) ** 2).mean()
        assert torch.allclose(loss, ref, atol=1e-6)
        assert terms["cbdm"] == 0 and terms["pd"] == 0


def test_pd_off_is_exactly_cbdm():
    cfg = LossConfig(cbdm_tau=1.0, cbdm_gamma=0.25, pd_weight=0.0, p_uncond=0.0)
    net, diff, batch, probs = _setup(cfg)
    loss, terms = compute_loss(net, diff, batch, cfg, label_probs=probs, null_label=4,
                               generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(batch.x0.shape, generator=g)
    yp = torch.multinomial(probs.float(), 6, replacement=True, generator=g)
    x_t = diff.q_sample(batch.x0, t, eps)
    e_y, e_yp = net(x_t, t, batch.y), net(x_t, t, yp)
    w = ((t.float() + 1) / 1000).view(-1, 1, 1, 1)
    ref = ((e_y - eps) ** 2).mean() + (w * ((e_y - e_yp) ** 2 + 0.25 * (e_y - e_yp) ** 2)).mean()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert terms["pd"] == 0 and terms["cbdm"] > 0


def test_pd_term_pushes_head_and_tail_apart():
    cfg = LossConfig(cbdm_tau=0.0, pd_weight=1.0, pd_form="plain", p_uncond=0.0)
    net, diff, batch, probs = _setup(cfg)
    _, terms = compute_loss(net, diff, batch, cfg, label_probs=probs, null_label=4,
                            generator=torch.Generator().manual_seed(0))
    assert terms["pd_kl"] > 0 and torch.isclose(terms["pd"], -terms["pd_kl"])
    (xh, yh), (xl, yl) = batch.head, batch.tail
    t, eps = torch.tensor([100, 500, 900]), torch.randn(xh.shape)
    xh_t, xl_t = diff.q_sample(xh, t, eps), diff.q_sample(xl, t, eps)

    def kl_now():
        pd, kl = pd_terms(diff, xh_t, xl_t, t, net(xh_t, t, yh), net(xl_t, t, yl), cfg, eps)
        return pd, kl

    before = kl_now()[1].mean().item()
    opt = torch.optim.SGD(net.label.parameters(), lr=0.01)
    for _ in range(10):
        opt.zero_grad()
        kl_now()[0].mean().backward()
        opt.step()
    assert kl_now()[1].mean().item() > before
