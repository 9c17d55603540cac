"""Loss terms, each returning one value per sample; the training step weights and averages them once."""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=64)
def _tanh_in(x: float, dtype: torch.dtype) -> float:
    """tanh(x) rounded as ``dtype`` computes it, as a Python number: a constant of the loss that is not uploaded
    to the device at every step."""
    return float(torch.tanh(torch.tensor(x, dtype=dtype)))


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


def dm_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """L_DM, Eq. 8: mean over elements of (eps - eps_theta(x_t, t, y))^2, per sample."""
    return _per_sample_mean((eps.float() - eps_pred.float()) ** 2)


def cbdm_loss(eps_y: Tensor, eps_yp: Tensor, t: Tensor, T: int, tau: float, gamma: float) -> Tensor:
    """CBDM's distribution-adjustment regulariser L_DA, Eq. 9, per sample.

    w_t [ (eps(y) - sg(eps(y')))^2 + gamma (sg(eps(y)) - eps(y'))^2 ] with w_t = tau * t / T, where t in 1..T is the
    paper's step (index + 1). The first term moves only eps(y), the second only eps(y'); sg = detach.
    """
    eps_y, eps_yp = eps_y.float(), eps_yp.float()
    pull = _per_sample_mean((eps_y - eps_yp.detach()) ** 2)
    push = _per_sample_mean((eps_y.detach() - eps_yp) ** 2)
    weight = tau * (t.float() + 1.0) / T
    return weight * (pull + gamma * push)


def gaussian_kl_same_var(mu_h: Tensor, mu_l: Tensor, sigma2: Tensor) -> Tensor:
    """Eq. 11: KL(N(mu_h, s^2 I) || N(mu_l, s^2 I)) per element = (mu_h - mu_l)^2 / (2 s^2), averaged per sample.

    The constant C of Eq. 11 is zero for equal variances. ``sigma2`` broadcasts against the means ([B,1,1,1]).
    """
    return _per_sample_mean((mu_h.float() - mu_l.float()) ** 2 / (2.0 * sigma2.float()))


PD_FORMS = ("distance", "plain", "saturating")


def pd_loss(kl: Tensor, weight: float, form: str = "distance", scale: float = 2.0,
            kl_ref: Tensor | None = None) -> Tensor:
    """The perceptual-distinguish term of Eq. 10, to be added to L_DM + L_DA, per sample (pair).

    ``kl`` is Eq. 11 per pair as a per-element mean (``gaussian_kl_same_var``), not the sum over the D dimensions
    the paper's KL is: the paper's KL is D times ours, so a paper-plain lambda is ours / D.

    ``distance`` (default): -lambda * m * d_ref * [tanh(d / (m * d_ref)) - tanh(1 / m)], where d = sqrt(``kl``),
    d_ref = sqrt(``kl_ref``) (the separation the true posteriors have, eps_theta = eps; no gradient) and
    m = ``scale``. The caller passes both KLs in noise units (``GaussianDiffusion.noise_units``, the factor DDPM's
    L_simple drops from L_t), so d is the RMS over elements of (eps_theta_h - eps_theta_l) - (the same for the
    true posteriors), and the term's gradient on each noise prediction has norm lambda / sqrt(D) at every t.
    Why this form (docs/method.md, "The readings the code takes"): the KL is dominated by
    sqrt(abar_t)(x0_h - x0_l), which the network cannot change, and its gradient grows with the distance and with
    beta_t / sigma_t, so the ``plain`` form puts nearly all of its pull on the smallest t and any bound fixed in KL
    units (``saturating``) is saturated exactly there. Training logs the term's share of L_DM's parameter-gradient
    norm (``pd_grad_share``; pipelines/pd_gradients.py measures it per band of t).
    The offset makes the term 0 at d = d_ref and changes no gradient. The term rewards separating a pair up to
    about m times its true separation and is bounded below by -lambda m d_ref (1 - tanh(1 / m)), a constant of
    the data, so training cannot run away.
    ``plain``: -lambda * KL, exactly Eq. 10; unbounded below.
    ``saturating``: -lambda * KL / (KL + scale); bounded by -lambda but saturated wherever KL >> scale (its
    gradient is then a vanishing share of L_DM's): kept to reproduce runs made with it.
    """
    if form == "plain":
        return -weight * kl
    if form == "saturating":
        return -weight * kl / (kl + scale)
    if form == "distance":
        if kl_ref is None:
            raise ValueError("pd_loss form 'distance' needs kl_ref, the KL of the true posterior means")
        d_ref = kl_ref.detach().clamp_min(1e-12).sqrt()
        bound = scale * d_ref
        # offset so that the term is 0 where the pair is as far apart as the true posteriors (d = d_ref): the
        # logged loss then reads as L_DM + L_DA plus what the separation gains, not plus a constant of the data
        at_truth = _tanh_in(1.0 / scale, kl.dtype)
        return -weight * bound * (torch.tanh(kl.clamp_min(1e-12).sqrt() / bound) - at_truth)
    raise ValueError(f"pd_loss form must be one of {', '.join(PD_FORMS)}, got {form!r}")
