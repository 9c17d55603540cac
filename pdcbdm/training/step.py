"""One PD-CBDM training objective evaluation (Eq. 8-11), with every network pass batched into one forward."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from pdcbdm.config import LossConfig
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.labels import sample_labels
from pdcbdm.losses import cbdm_loss, dm_loss, gaussian_kl_same_var, pd_loss
from pdcbdm.training.syncs import host_value


@dataclass
class Batch:
    """A training batch: the main images/labels, and optional head/tail pairs for the PD loss (Eq. 10)."""

    x0: Tensor
    y: Tensor
    head: tuple[Tensor, Tensor] | None = None
    tail: tuple[Tensor, Tensor] | None = None


@dataclass(frozen=True)
class Shard:
    """This worker's part of a global batch: random draws are made for all ``world`` workers alike (one shared
    seed) and each keeps rows [rank * n, (rank + 1) * n), so training does not depend on the number of workers."""

    rank: int = 0
    world: int = 1

    def take(self, draw: Callable[[int], Tensor], n_local: int) -> Tensor:
        return draw(n_local * self.world)[self.rank * n_local:(self.rank + 1) * n_local]


def _randn(shape: torch.Size | tuple[int, ...], like: Tensor, generator: torch.Generator | None,
           shard: Shard) -> Tensor:
    # drawn where the generator lives: a device generator draws without a host round trip
    where = generator.device if generator is not None else like.device
    out = shard.take(lambda n: torch.randn((n, *shape[1:]), generator=generator, device=where), shape[0])
    return out.to(like.device, like.dtype)


def _uniform(generator: torch.Generator | None) -> float:
    """A draw that decides the step's control flow: read on the host, so its generator must live there."""
    return host_value(torch.rand((), generator=generator))


def pd_terms(
    diffusion: GaussianDiffusion, x_h: Tensor, x_l: Tensor, t: Tensor, eps_h: Tensor, eps_l: Tensor,
    cfg: LossConfig, eps_true: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Eq. 10-11 for paired head/tail noisy images x_h, x_l at shared t and shared noise ``eps_true``: returns
    (per-pair loss, per-pair KL). The ``distance`` form also needs the KL of the true posterior means (Eq. 11 with
    eps_theta = eps_true), which depends on the data only."""
    sigma2 = diffusion.variance(t, x_h.float())
    mu_h = diffusion.mean_from_eps(x_h.float(), t, eps_h.float())
    mu_l = diffusion.mean_from_eps(x_l.float(), t, eps_l.float())
    kl = gaussian_kl_same_var(mu_h, mu_l, sigma2)
    if cfg.pd_form != "distance":
        return pd_loss(kl, cfg.pd_weight, cfg.pd_form, cfg.pd_scale), kl
    if eps_true is None:
        raise ValueError("pd_form 'distance' needs the pairs' shared noise eps_true")
    e = eps_true.float()
    kl_ref = gaussian_kl_same_var(diffusion.mean_from_eps(x_h.float(), t, e),
                                  diffusion.mean_from_eps(x_l.float(), t, e), sigma2)
    units = diffusion.noise_units(t, kl).view(-1)
    return pd_loss(kl * units, cfg.pd_weight, cfg.pd_form, cfg.pd_scale, kl_ref * units), kl


TimestepDraw = Callable[[int, "torch.Generator | None"], Tensor]


def loss_terms(
    net: nn.Module | Callable[..., Tensor],
    diffusion: GaussianDiffusion,
    batch: Batch,
    cfg: LossConfig,
    *,
    label_probs: Tensor,
    null_label: int,
    generator: torch.Generator | None = None,
    autocast: Callable[[], object] = nullcontext,
    shard: Shard = Shard(),
    draw_t: TimestepDraw | None = None,
    host_generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The terms of Eq. 8, 9 and 10 as scalars that keep their graph: ``dm``, ``cbdm``, ``pd`` and ``pd_kl``.

    - With probability ``cfg.p_uncond`` the whole batch's labels become ``null_label`` (classifier-free guidance);
      L_DA is zero on such steps.
    - L_DA draws one y' per sample from ``label_probs`` (Eq. 12's q) and reuses x_t, t and eps.
    - The PD pairs share t and eps ("under a given noise") and always keep their labels.
    The main, y' and head/tail inputs go through the network in one batched forward. ``shard`` says which part
    of the global batch this worker holds (every random draw is made globally and sliced). ``draw_t(n, generator)``
    replaces the uniform timestep draw (diagnostics measure one band of t at a time). The tensors are drawn from
    ``generator`` (on the device: no host round trip) and the guidance-dropout coin, which decides which passes
    run, from ``host_generator`` (default ``generator``, which must then live on the CPU).
    """
    draw_t = draw_t or (lambda k, g: diffusion.sample_t(k, x0.device, g))
    x0, y = batch.x0, batch.y
    n = x0.shape[0]
    t = shard.take(lambda k: draw_t(k, generator), n).to(x0.device)
    eps = _randn(x0.shape, x0, generator, shard)
    x_t = diffusion.q_sample(x0, t, eps)
    uncond = cfg.p_uncond > 0 and _uniform(host_generator or generator) < cfg.p_uncond
    y_in = torch.full_like(y, null_label) if uncond else y

    xs, ts, ys = [x_t], [t], [y_in]
    use_cbdm = cfg.cbdm_tau > 0 and not uncond
    if use_cbdm:
        y_prime = shard.take(lambda k: sample_labels(label_probs, k, generator), n).to(y.device)
        xs.append(x_t), ts.append(t), ys.append(y_prime)
    use_pd = cfg.pd_weight > 0 and batch.head is not None and batch.tail is not None
    if use_pd:
        (xh0, yh), (xl0, yl) = batch.head, batch.tail
        m = min(xh0.shape[0], xl0.shape[0])
        xh0, yh, xl0, yl = xh0[:m], yh[:m], xl0[:m], yl[:m]
        tp = shard.take(lambda k: draw_t(k, generator), m).to(x0.device)
        eps_p = _randn(xh0.shape, xh0, generator, shard)
        xh_t, xl_t = diffusion.q_sample(xh0, tp, eps_p), diffusion.q_sample(xl0, tp, eps_p)
        xs += [xh_t, xl_t]
        ts += [tp, tp]
        ys += [yh, yl]

    with autocast():
        out = net(torch.cat(xs), torch.cat(ts), torch.cat(ys))
    parts = out.float().split([a.shape[0] for a in xs])
    eps_main = parts[0]  # eps_theta(x_t, t, y): L_DM's prediction, and L_DA's eps(y)

    terms: dict[str, Tensor] = {"dm": dm_loss(eps_main, eps).mean()}
    zero = terms["dm"].new_zeros(())
    terms["cbdm"], terms["pd"], terms["pd_kl"] = zero, zero, zero
    if use_cbdm:
        eps_prime = parts[1]  # eps_theta(x_t, t, y'), Eq. 9
        terms["cbdm"] = cbdm_loss(eps_main, eps_prime, t, diffusion.T, cfg.cbdm_tau, cfg.cbdm_gamma).mean()
    if use_pd:
        eps_head, eps_tail = parts[-2], parts[-1]  # the head and tail pairs' predictions, Eq. 10-11
        pd, kl = pd_terms(diffusion, xh_t, xl_t, tp, eps_head, eps_tail, cfg, eps_p)
        terms["pd"], terms["pd_kl"] = pd.mean(), kl.mean()
    return terms


def compute_loss(
    net: nn.Module | Callable[..., Tensor],
    diffusion: GaussianDiffusion,
    batch: Batch,
    cfg: LossConfig,
    **kwargs: object,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_DM + L_DA - lambda * KL (Eq. 8, 9, 10), each term a per-sample mean, averaged once (see
    ``loss_terms`` for the draws and keyword arguments).

    Returns the scalar loss and detached per-term means (``dm``, ``cbdm``, ``pd``, ``pd_kl``, ``loss``).
    """
    terms = loss_terms(net, diffusion, batch, cfg, **kwargs)
    total = terms["dm"] + terms["cbdm"] + terms["pd"]
    out = {k: v.detach() for k, v in terms.items()}
    out["loss"] = total.detach()
    return total, out
