"""Samplers as plain functions over (network, diffusion, labels, steps, guidance): DDPM ancestral and DDIM."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from pdcbdm.diffusion import GaussianDiffusion, extract
from pdcbdm.progress import tqdm

SAMPLERS = ("ddpm", "ddim")  # sample.sampler: ancestral DDPM over all T steps, or DDIM over ``steps``


def uniform_labels(n: int, num_classes: int) -> Tensor:
    """Evaluation labels spread uniformly over classes: 0, 1, ..., K-1, 0, 1, ... (equal counts when K divides n)."""
    return torch.arange(n) % num_classes


def guided_eps(net: nn.Module, x: Tensor, t: Tensor, y: Tensor, guidance: float, null_label: int) -> Tensor:
    """Classifier-free guidance: eps~ = (1 + w) eps(x, t, y) - w eps(x, t, null).

    With w = 0 only the conditional pass runs; otherwise both passes share one batched forward.
    """
    if guidance == 0:
        return net(x, t, y).float()
    both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)])).float()
    cond, uncond = both.chunk(2)
    return (1.0 + guidance) * cond - guidance * uncond


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of a batch of ``total`` samples that this worker generates.

    Every random draw is made for the whole batch (one shared generator) and sliced, so that each sample gets the
    same noise whichever worker generates it and however many workers share the batch."""

    start: int
    stop: int
    total: int

    @classmethod
    def all(cls, n: int) -> "Rows":
        return cls(0, n, n)

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
        """Noise of shape [stop - start, *shape], this worker's rows of a draw for all ``total`` rows, drawn where
        ``generator`` lives (a generator on ``device`` draws without an upload)."""
        where = generator.device if generator is not None else device
        return torch.randn((self.total, *shape), generator=generator, device=where)[self.start:self.stop].to(device)


def share_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s rows [start, stop) of n rows split as evenly as possible over ``world`` workers."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank}")
    return n * rank // world, n * (rank + 1) // world


def share_indices(n: int, batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
    """Global indices of the samples ``generate(..., rank=rank, world=world)`` returns, in its order: each batch of
    ``batch_size`` is split over the workers."""
    out = []
    for first in range(0, n, batch_size):
        lo, hi = share_bounds(min(batch_size, n - first), rank, world)
        out.append(torch.arange(first + lo, first + hi))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _rows(rows: Rows | None, labels: Tensor) -> Rows:
    rows = rows or Rows.all(labels.shape[0])
    if rows.stop - rows.start != labels.shape[0]:
        raise ValueError(f"rows [{rows.start}, {rows.stop}) do not match the {labels.shape[0]} labels")
    return rows


def _steps_bar(steps: list[int], progress: bool, desc: str) -> Any:
    return tqdm(steps, desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def ddpm_sample(
    net: nn.Module, diffusion: GaussianDiffusion, labels: Tensor, shape: tuple[int, int, int], *,
    guidance: float = 0.0, null_label: int, generator: torch.Generator | None = None, clip_x0: bool = True,
    progress: bool = False, autocast: Callable[[], Any] = nullcontext, rows: Rows | None = None,
) -> Tensor:
    """Ancestral sampling over all T steps: x_{t-1} = mu_theta(x_t, t, y) + sigma_t z (Eq. 4/7, fixed variance).

    The mean is the posterior mean at the predicted x0, which equals Eq. 7 when ``clip_x0`` is False; clipping x0 to
    [-1, 1] is the usual safeguard. ``rows``: these labels are rows of a larger batch whose noise is drawn whole
    (``Rows``; default: the labels are the batch). Returns images in [-1, 1], shape [N, *shape].
    """
    device, rows = labels.device, _rows(rows, labels)
    diffusion = diffusion.to(device)
    x = rows.noise(shape, generator, device)
    for i in _steps_bar(list(range(diffusion.T - 1, -1, -1)), progress, "DDPM"):
        t = torch.full((labels.shape[0],), i, device=device, dtype=torch.long)
        with autocast():
            eps = guided_eps(net, x, t, labels, guidance, null_label)
        x0 = diffusion.x0_from_eps(x, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean = diffusion.posterior_mean(x0, x, t)
        x = mean + diffusion.variance(t, x).sqrt() * rows.noise(shape, generator, device) if i > 0 else mean
    return x.clamp(-1, 1)


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """Evenly spaced timestep indices from T-1 down to 0 (``steps`` of them)."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in [1, {T}], got {steps}")
    return sorted({int(round(v)) for v in np.linspace(0, T - 1, steps)}, reverse=True)


@torch.no_grad()
def ddim_sample(
    net: nn.Module, diffusion: GaussianDiffusion, labels: Tensor, shape: tuple[int, int, int], *,
    steps: int = 50, guidance: float = 0.0, eta: float = 0.0, null_label: int,
    generator: torch.Generator | None = None, clip_x0: bool = True, progress: bool = False,
    autocast: Callable[[], Any] = nullcontext, rows: Rows | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021) over ``steps`` timesteps; eta = 0 is deterministic given the initial noise.

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z, with s = eta * sqrt((1-abar_prev)/(1-abar)
    * (1 - abar/abar_prev)). ``rows`` as in ``ddpm_sample``. Returns images in [-1, 1].
    """
    device, rows = labels.device, _rows(rows, labels)
    diffusion = diffusion.to(device)
    seq = ddim_timesteps(diffusion.T, steps)
    x = rows.noise(shape, generator, device)
    for j, i in enumerate(_steps_bar(seq, progress, "DDIM")):
        t = torch.full((labels.shape[0],), i, device=device, dtype=torch.long)
        prev = seq[j + 1] if j + 1 < len(seq) else -1
        with autocast():
            eps = guided_eps(net, x, t, labels, guidance, null_label)
        x0 = diffusion.x0_from_eps(x, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = ((x - extract(diffusion.sqrt_alphas_bar, t, x) * x0)
                   / extract(diffusion.sqrt_one_minus_alphas_bar, t, x))
        abar = extract(diffusion.alphas_bar, t, x)
        abar_prev = extract(diffusion.alphas_bar, torch.full_like(t, prev), x) if prev >= 0 else torch.ones_like(abar)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and prev >= 0:
            x = x + sigma * rows.noise(shape, generator, device)
    return x.clamp(-1, 1)


def generate(
    net: nn.Module, diffusion: GaussianDiffusion, labels: Tensor, shape: tuple[int, int, int], *,
    sampler: str = "ddim", steps: int = 50, guidance: float = 0.0, eta: float = 0.0, null_label: int,
    batch_size: int = 256, seed: int = 0, progress: bool = False, autocast: Callable[[], Any] = nullcontext,
    clip_x0: bool = True, rank: int = 0, world: int = 1,
) -> Tensor:
    """Sample images for ``labels`` in batches, deterministic for a seed; returns uint8 [N, C, H, W] on the CPU.

    ``steps`` and ``eta`` apply to DDIM; DDPM runs all T steps. ``clip_x0`` clips the predicted x0 to [-1, 1]
    before the mean is formed (False: the mean of Eq. 7 as is, CBDM's evaluation).

    With ``world`` > 1 this worker generates only its share of each batch (``share_bounds``): the samples of
    ``labels[share_indices(len(labels), batch_size, rank, world)]``, the very images one worker would draw for
    them (the noise is drawn for the whole batch and sliced), up to floating-point differences of batch size.
    The noise is drawn on the labels' device: a seed gives the same images on every CPU, and other images (of the
    same distribution) on a GPU."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    # on the labels' device: the noise of every step is drawn there, without an upload per step
    generator = torch.Generator(labels.device).manual_seed(seed)
    out = [torch.zeros((0, *shape), dtype=torch.uint8)]
    chunks = labels.split(batch_size)
    for chunk in tqdm(chunks, desc=f"sampling w={guidance:g}", disable=not progress or len(chunks) < 2, leave=False):
        lo, hi = share_bounds(chunk.shape[0], rank, world)
        # an empty share still runs: its draws keep the shared generator in step with the other workers'
        kw = dict(guidance=guidance, null_label=null_label, generator=generator, autocast=autocast, clip_x0=clip_x0,
                  rows=Rows(lo, hi, chunk.shape[0]))
        if sampler == "ddim":
            x = ddim_sample(net, diffusion, chunk[lo:hi], shape, steps=steps, eta=eta, progress=progress, **kw)
        else:
            x = ddpm_sample(net, diffusion, chunk[lo:hi], shape, progress=progress, **kw)
        out.append(to_uint8(x).cpu())
    return torch.cat(out)


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats to uint8 pixels, rounding to nearest."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
