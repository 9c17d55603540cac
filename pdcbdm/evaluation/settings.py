"""How an evaluation is set up from a config: the head/tail split it scores, its feature network, its samplers and
the autocast it samples under."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import torch

from pdcbdm.config import Config, DiffusionConfig
from pdcbdm.data import HeadTailSplit, head_tail_split
from pdcbdm.metrics import FeatureExtractor, build_extractor
from pdcbdm.training import resolve_precision

__all__ = ["PROTOCOLS", "evaluation_split", "feature_extractor", "judge_network", "sampler_settings",
           "final_sampling", "sampling_autocast"]


def evaluation_split(cfg: Config, counts: Sequence[int]) -> HeadTailSplit:
    """The head/tail classes every evaluation scores (head/tail FID, tail proxy FID, tail-to-head confusion).

    Computed from the data set's class counts with ``eval.split_ratio`` (with ``loss.split_mode`` and
    ``data.seed``), never with the searched ``loss.split_ratio`` of the PD loss, so that the scores of runs
    with different loss splits measure the same classes.
    """
    return head_tail_split(counts, cfg.eval.split_ratio, mode=cfg.loss.split_mode, seed=cfg.data.seed)


def feature_extractor(cfg: Config, device: torch.device | str = "cpu",
                      cache_dir: str | os.PathLike | None = None) -> FeatureExtractor:
    """``eval.extractor`` as this config resolves it: Inception with ``eval.inception_weights``, the digits CNN, or
    the domain CNN of the prepared folder ``data.root`` (each trained networks read from ``cache_dir``)."""
    root = cfg.data.root if cfg.eval.extractor == "domain" else None
    return build_extractor(cfg.eval.extractor, weights_path=cfg.eval.inception_weights, device=device,
                           cache_dir=cache_dir, data_root=root)


def judge_network(cfg: Config, device: torch.device | str = "cpu",
                  cache_dir: str | os.PathLike | None = None) -> FeatureExtractor | None:
    """The network that judges classes when it is not ``eval.extractor`` (``eval.judge=cnn`` with another
    extractor than the domain CNN: the domain CNN of data.root, read from ``cache_dir``); None: the extractor
    judges (its own logits, or a linear probe on its features)."""
    if cfg.eval.judge != "cnn" or cfg.eval.extractor == "domain":
        return None
    return build_extractor("domain", device=device, cache_dir=cache_dir, data_root=cfg.data.root)


def sampler_settings(cfg: Config) -> dict[str, Any]:
    """The config's own sampler (``sample.*``): what proxies, grids and ``eval.protocol=fast`` use."""
    s = cfg.sample
    return {"sampler": s.sampler, "steps": s.steps, "eta": s.eta, "clip_x0": True}


PROTOCOLS = ("fast", "paper")  # eval.protocol: final_sampling


def final_sampling(cfg: Config) -> tuple[DiffusionConfig, dict[str, Any]]:
    """(diffusion config, sampler settings) of a final evaluation.

    ``eval.protocol=paper`` is CBDM's reference evaluation, which the PD-CBDM paper follows ("same as baseline"):
    1000-step ancestral DDPM with the fixedlarge variance and the mean of Eq. 7 taken before any clipping of x0,
    so that CIFAR scores compare with the paper's. ``fast`` uses the config's own sampler (``sample.*``).
    """
    if cfg.eval.protocol == "paper":
        return (dataclasses.replace(cfg.diffusion, var_type="fixedlarge"),
                {"sampler": "ddpm", "steps": cfg.diffusion.timesteps, "eta": 1.0, "clip_x0": False})
    return cfg.diffusion, sampler_settings(cfg)


def sampling_autocast(cfg: Config, device: torch.device) -> Callable[[], Any] | None:
    """bf16 autocast for sampling when the run's train.precision resolves to bf16 on this device (as the trainer
    samples), else None."""
    if resolve_precision(cfg.train.precision, device) != "bf16":
        return None
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
