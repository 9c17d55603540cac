"""Loss terms, each returning one value per sample; the training step weights and averages them once."""

from __future__ import annotations

from torch import Tensor


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


def pd_loss(kl: Tensor, weight: float, form: str = "saturating", scale: float = 1.0) -> Tensor:
    """The perceptual-distinguish term of Eq. 10, to be added to L_DM + L_DA, per sample.

    ``plain``: -lambda * KL, exactly Eq. 10; unbounded below, so a network can lower the loss without limit by
    pushing the head and tail means apart, which diverges in practice.
    ``saturating`` (default): -lambda * KL / (KL + scale). It agrees with the plain form to first order for
    KL << scale (gradient -lambda/scale * dKL), is bounded below by -lambda, and its pull fades once a pair is
    already well separated, so L_DM stays in charge of image quality.
    """
    if form == "plain":
        return -weight * kl
    if form == "saturating":
        return -weight * kl / (kl + scale)
    raise ValueError(f"pd_loss form must be 'saturating' or 'plain', got {form!r}")
