"""The Gaussian diffusion process (Eq. 1-8). It takes the network as an argument and never owns it, so Ray's
``prepare_model``, DDP and EMA wrap only the network."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from pdcbdm.config import DiffusionConfig

# the fixed reverse variances sigma_t^2 (diffusion.var_type; docs/method.md, "Diffusion"): beta_t or the posterior's
VAR_TYPES = ("fixedlarge", "fixedsmall")


def extract(buffer: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """Gather ``buffer[t]`` (float64 schedule) and shape it [B, 1, 1, 1] in ``like``'s dtype and device. The
    buffer should already live there (``GaussianDiffusion.to``): an upload per call is a host round trip."""
    out = buffer.to(like.device)[t].to(like.dtype if like.is_floating_point() else torch.float32)
    return out.view(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """Linear-beta DDPM schedule with float64 buffers.

    Timesteps are 0-based indices ``t in {0..T-1}``; index t is the paper's step t+1. Attributes follow the
    DDPM paper: ``betas``, ``alphas``, ``alphas_bar`` (abar_t), ``alphas_bar_prev``, ``posterior_variance``
    (betatilde_t) and ``sigma2`` (the fixed reverse variance chosen by ``var_type``).
    """

    def __init__(self, cfg: DiffusionConfig | None = None) -> None:
        cfg = cfg or DiffusionConfig()
        self.cfg = cfg
        self.T = cfg.timesteps
        self.betas = torch.linspace(cfg.beta_1, cfg.beta_T, cfg.timesteps, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_bar = torch.cumprod(self.alphas, dim=0)
        self.alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_bar[:-1]])
        self.posterior_variance = self.betas * (1.0 - self.alphas_bar_prev) / (1.0 - self.alphas_bar)
        if cfg.var_type == "fixedlarge":
            # CBDM's default: beta_t, with the first step's variance taken from the posterior (betatilde_1 > 0).
            self.sigma2 = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
        else:
            # betatilde at index 0 is 0 (abar_prev = 1); CBDM clips it to the next entry, so that Eq. 11's
            # KL and log-likelihoods stay finite at t index 0
            self.sigma2 = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        self.eps_coef = self.betas / torch.sqrt(1.0 - self.alphas_bar)
        # what the steps gather every call, formed once (each would be a kernel launch per call on a GPU)
        self.sqrt_alphas_bar = self.alphas_bar.sqrt()
        self.sqrt_one_minus_alphas_bar = (1.0 - self.alphas_bar).sqrt()
        self.sqrt_alphas = self.alphas.sqrt()
        self.posterior_coef_x0 = self.betas * self.alphas_bar_prev.sqrt() / (1.0 - self.alphas_bar)
        self.posterior_coef_xt = (1.0 - self.alphas_bar_prev) * self.sqrt_alphas / (1.0 - self.alphas_bar)
        self.noise_unit = 2.0 * self.sigma2 * self.alphas * (1.0 - self.alphas_bar) / self.betas ** 2
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> "GaussianDiffusion":
        """This schedule with every buffer on ``device`` (itself when they are there already): the sampling and
        training steps then gather from it without an upload per step."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(moved, name, value.to(device))
        moved.device = device
        return moved

    def sample_t(self, batch: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """Uniform timesteps for L_DM (Eq. 8), drawn where ``generator`` lives (so that a seeded draw does not
        depend on where the result goes) and placed on ``device``."""
        where = generator.device if generator is not None else torch.device(device)
        return torch.randint(0, self.T, (batch,), device=where, generator=generator).to(device)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Forward process, Eq. 2: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return extract(self.sqrt_alphas_bar, t, x0) * x0 + extract(self.sqrt_one_minus_alphas_bar, t, x0) * eps

    def mean_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Reverse mean, Eq. 4/7: mu = (x_t - beta_t / sqrt(1 - abar_t) * eps) / sqrt(alpha_t)."""
        return (x_t - extract(self.eps_coef, t, x_t) * eps) / extract(self.sqrt_alphas, t, x_t)

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert Eq. 2 for x0 given a noise estimate."""
        return (x_t - extract(self.sqrt_one_minus_alphas_bar, t, x_t) * eps) / extract(self.sqrt_alphas_bar, t, x_t)

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x0); equals Eq. 7 when x0 comes from ``x0_from_eps`` unclipped."""
        return extract(self.posterior_coef_x0, t, x_t) * x0 + extract(self.posterior_coef_xt, t, x_t) * x_t

    def noise_units(self, t: Tensor, like: Tensor) -> Tensor:
        """2 sigma_t^2 alpha_t (1 - abar_t) / beta_t^2, shaped [B, 1, 1, 1]: times a KL between two reverse
        Gaussians (Eq. 11) it gives the squared distance of the means in noise units, since
        mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) (Eq. 7). DDPM's L_simple drops the same factor
        from L_t (Ho et al. 2020, Eq. 12 to 14)."""
        return extract(self.noise_unit, t, like)

    def variance(self, t: Tensor, like: Tensor) -> Tensor:
        """The fixed reverse variance sigma_t^2 ("fixedlarge" or "fixedsmall"), shaped [B, 1, 1, 1]."""
        return extract(self.sigma2, t, like)
