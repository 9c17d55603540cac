"""The paper's noise-error measure (Algorithm 2): noise prediction error with sampling stochasticity removed."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.progress import tqdm


@torch.no_grad()
def noise_error(
    net: nn.Module, diffusion: GaussianDiffusion, batches: Iterable[tuple[Tensor, Tensor]], *,
    stride: int = 1, metric: str = "mse", seed: int = 0, device: torch.device | str = "cpu", progress: bool = False,
) -> float:
    """Algorithm 2: for each data image draw eps once; for t = T..1 form x_t by Eq. 2 and compare
    eps_theta(x_t, t, y) with eps; return the mean per-pixel distance over images, timesteps and pixels.

    ``stride`` visits every stride-th timestep (T-1, T-1-stride, ...) to bound the cost (T forwards per image
    otherwise). ``metric`` is ``mse`` (squared difference; the paper names an L-norm whose index is lost in its
    text) or ``mae`` (absolute difference). ``batches`` yields (x0 in [-1, 1], labels).
    """
    if metric not in ("mse", "mae"):
        raise ValueError(f"noise_error metric must be 'mse' or 'mae', got {metric!r}")
    if stride < 1:
        raise ValueError(f"noise_error stride must be >= 1, got {stride}")
    generator = torch.Generator().manual_seed(seed)
    steps = list(range(diffusion.T - 1, -1, -stride))
    total, count = 0.0, 0
    for x0, y in tqdm(batches, desc="noise error", disable=not progress, leave=False):
        x0, y = x0.to(device), y.to(device)
        eps = torch.randn(x0.shape, generator=generator).to(device)
        for i in steps:
            t = torch.full((x0.shape[0],), i, device=device, dtype=torch.long)
            diff = net(diffusion.q_sample(x0, t, eps), t, y).float() - eps
            err = diff.pow(2) if metric == "mse" else diff.abs()
            total += float(err.sum())
            count += err.numel()
    if count == 0:
        raise ValueError("noise_error got no images")
    return total / count
