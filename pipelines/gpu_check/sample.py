"""The ``sample`` step: DDIM with the preset's steps and the paper's DDPM-1000 at the evaluation batch."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from pdcbdm.config import Config
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.evaluation import final_sampling
from pdcbdm.evaluation.settings import sampling_autocast
from pdcbdm.sampling import generate, uniform_labels
from pdcbdm.training import build_network
from pipelines.gpu_check.budget import fit
from pipelines.gpu_check.context import Check, result, timed


# ------------------------------------------------------------------------------------------------- sample
def step_sample(check: Check) -> dict[str, Any]:
    """DDIM with the preset's steps and the paper's DDPM-1000 at the evaluation batch (an untrained network:
    the cost is the same), each cut to a shorter schedule when the budget asks and extrapolated to the full one."""
    cfg = check.cfg()
    run = _sampler(check, cfg)
    _, warm = run(cfg.diffusion, sampler="ddim", steps=2, eta=cfg.sample.eta)
    per_step = warm / 2
    cap = check.sizes.sampler_steps
    ddim_full = cfg.sample.steps
    ddim_steps = fit(min(cap, ddim_full), per_step, check.left_in_step(0.35), least=2)
    ddim, ddim_s = run(cfg.diffusion, sampler="ddim", steps=ddim_steps, eta=cfg.sample.eta)
    final_cfg, settings = final_sampling(cfg)
    total = final_cfg.timesteps
    ddpm_steps = fit(min(cap, total), per_step, check.left_in_step(0.9), least=2)
    ddpm, ddpm_s = run(dataclasses.replace(final_cfg, timesteps=ddpm_steps), **settings)
    return _sample_result(check, cfg, ddim, ddpm, (ddim_steps, ddim_full, ddim_s), (ddpm_steps, total, ddpm_s),
                          settings["sampler"])


def _sampler(check: Check, cfg: Config) -> Callable[..., tuple[torch.Tensor, float]]:
    """A timed ``generate`` of one evaluation batch with the preset's guidance, on an untrained network."""
    torch.manual_seed(0)
    net = build_network(cfg, 10, (3, 32, 32)).to(check.device).eval()
    labels = uniform_labels(cfg.eval.batch_size, 10).to(check.device)
    autocast = sampling_autocast(cfg, check.device) or contextlib.nullcontext

    def run(diffusion_cfg: Any, **settings: Any) -> tuple[torch.Tensor, float]:
        return timed(check, lambda: generate(net, GaussianDiffusion(diffusion_cfg), labels, (3, 32, 32),
                                             guidance=cfg.sample.guidance, null_label=10,
                                             batch_size=cfg.eval.batch_size, seed=0, autocast=autocast, **settings))
    return run


def _sample_result(check: Check, cfg: Config, ddim: torch.Tensor, ddpm: torch.Tensor, ddim_run: tuple,
                   ddpm_run: tuple, final_sampler: str) -> dict[str, Any]:
    batch = cfg.eval.batch_size
    (k_ddim, n_ddim, s_ddim), (k_ddpm, n_ddpm, s_ddpm) = ddim_run, ddpm_run
    ddim_image = s_ddim / k_ddim * n_ddim / batch
    ddpm_step = s_ddpm / k_ddpm
    ddpm_image = ddpm_step * n_ddpm / batch
    final_s = math.ceil(cfg.eval.num_samples / batch) * n_ddpm * ddpm_step
    check.facts["final_sampling_s"] = final_s
    ok = all(x.dtype == torch.uint8 and tuple(x.shape) == (batch, 3, 32, 32) and x.float().std() > 0
             for x in (ddim, ddpm))
    cut = [f"{name} timed over {k} of {n} steps" for name, k, n in (("DDIM", k_ddim, n_ddim), ("DDPM", k_ddpm, n_ddpm))
           if k < n]
    return result("PASS" if ok else "FAIL",
                  f"batch {batch}, w={cfg.sample.guidance:g}: DDIM-{n_ddim} {ddim_image * 1e3:.2f} ms/image, "
                  f"{final_sampler.upper()}-{n_ddpm} (paper protocol) {ddpm_image * 1e3:.1f} ms/image; one guidance "
                  f"value's {cfg.eval.num_samples:,} samples: {final_s / 60:.1f} min"
                  + (f" ({'; '.join(cut)}, extrapolated)" if cut else "")
                  + ("" if ok else "; the samples are not uint8 images of the right shape"),
                  batch=batch, guidance=cfg.sample.guidance, ddim_steps=n_ddim, ddim_steps_timed=k_ddim,
                  ddim_s_per_image=ddim_image, ddpm_steps=n_ddpm, ddpm_steps_timed=k_ddpm, ddpm_step_s=ddpm_step,
                  ddpm_s_per_image=ddpm_image, final_samples=cfg.eval.num_samples, final_sampling_s=final_s)
