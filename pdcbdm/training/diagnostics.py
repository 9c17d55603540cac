"""Gradient diagnostics: how much of the update each loss term (Eq. 8, 9, 10) drives.

The parameter-gradient norm of each term, taken separately on the same batch, says whether a weight such as
lambda of Eq. 10 makes its term act at all: the earlier bounded PD form had 1e-6 to 1e-4 of L_DM's gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pdcbdm.config import LossConfig
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.training.step import Batch, TimestepDraw, loss_terms

TERMS = ("dm", "cbdm", "pd")


def term_gradient_norm_tensors(
    net: nn.Module, diffusion: GaussianDiffusion, batch: Batch, cfg: LossConfig, *, label_probs: Tensor,
    null_label: int, generator: torch.Generator | None = None, draw_t: TimestepDraw | None = None,
    autocast: Callable[[], Any] | None = None,
) -> dict[str, Tensor]:
    """The L2 norm over all parameters of each term's gradient (``grad_dm``, ``grad_cbdm``, ``grad_pd``) and
    ``pd_grad_share`` = grad_pd / grad_dm, on one batch with labels kept (no label dropout, so L_DA counts), as
    0-d tensors on the network's device (nothing is read back to the host).

    ``net`` must be a plain module (not DDP: it does not support ``torch.autograd.grad``); the global RNG is left
    as it was, so calling this does not change a seeded training run.
    """
    cfg = dataclasses.replace(cfg, p_uncond=0.0)
    params = [p for p in net.parameters() if p.requires_grad]
    kw = {"autocast": autocast} if autocast else {}
    with torch.random.fork_rng(devices=[]):
        terms = loss_terms(net, diffusion, batch, cfg, label_probs=label_probs, null_label=null_label,
                           generator=generator, draw_t=draw_t, **kw)
        zero = terms["dm"].detach().new_zeros(())
        out = {f"grad_{k}": zero for k in TERMS}
        live = [k for k in TERMS if terms[k].requires_grad]
        for j, key in enumerate(live):
            grads = torch.autograd.grad(terms[key], params, retain_graph=j + 1 < len(live), allow_unused=True)
            out[f"grad_{key}"] = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads if g is not None]))
    dm = out["grad_dm"]
    out["pd_grad_share"] = torch.where(dm > 0, out["grad_pd"] / dm.clamp_min(1e-30), zero)
    return out


def term_gradient_norms(net: nn.Module, diffusion: GaussianDiffusion, batch: Batch, cfg: LossConfig,
                        **kwargs: Any) -> dict[str, float]:
    """``term_gradient_norm_tensors`` read back as floats (one transfer)."""
    values = term_gradient_norm_tensors(net, diffusion, batch, cfg, **kwargs)
    return dict(zip(values, torch.stack(list(values.values())).tolist()))
