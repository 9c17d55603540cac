"""Named run presets: a :class:`~pdcbdm.config.Config` for each use (``smoke``, ``digits``, the paper's
``cifar10-lt`` / ``cifar100-lt``, and ``own32`` / ``own64`` / ``own128`` for a user's own data). A preset is a set
of ``section.field`` overrides of the defaults; the command lines take ``--preset NAME`` and ``--set`` on top."""

from __future__ import annotations

from typing import Any

from pdcbdm.config import PREPARED, Config, ConfigError, apply_overrides


def preset(name: str) -> Config:
    """Named presets: ``smoke`` (a plumbing check sized for a CPU; its time: docs/results.md, "The test suite and
    the default search"), ``digits`` (the embedded default), ``cifar10-lt`` and ``cifar100-lt`` (the paper's
    network, schedule and optimiser settings; for GPUs), and ``own32``, ``own64``, ``own128`` for a user's own data
    prepared at that side (``--set data.root=D``; the U-Net of the same name)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return apply_overrides(Config(), PRESETS[name])


_CIFAR = {
    "model.network": "cifar", "model.tsa_resolutions": "16",
    "train.steps": 500_000, "train.batch_size": 64, "train.warmup": 5000, "train.ema_decay": 0.9999,
    "train.eval_every": 10_000, "train.log_every": 100, "train.precision": "bf16",
    "eval.extractor": "inception", "eval.protocol": "paper", "eval.num_samples": 10_000, "eval.proxy_samples": 1000,
    "eval.guidance_grid": "0.8,1.0,1.2,1.4,1.6", "eval.batch_size": 500,
    "sample.steps": 100, "sample.guidance": 1.2, "eval.proxy_guidance": 1.2, "loss.pd_weight": 0.1,
}

# A user's own data (``data.dataset=parquet``): the folder is a default to override (--set data.root=D; a missing
# folder says how to prepare one), the domain CNN scores (trained once per data digest), attention and TSA at 16x16
# in every own U-Net. Starting points, not tuned settings: a search tunes the loss knobs on the user's data.
_OWN = {
    "data.dataset": PREPARED, "data.root": "data/own", "eval.extractor": "domain", "model.tsa_resolutions": "16",
    "train.precision": "auto", "loss.pd_weight": 0.025, "eval.guidance_grid": "0,0.5,1,2", "eval.proxy_guidance": 1.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    # a plumbing check, not a model (every Ray test trial runs it): the narrowest network that still trains
    "smoke": {
        "data.dataset": "digits-lt", "data.imbalance": 10.0, "model.ch": 16,
        "train.steps": 60, "train.batch_size": 16, "train.warmup": 10, "train.ema_decay": 0.9,
        "train.log_every": 10, "train.eval_every": 30,
        "sample.steps": 5, "sample.eta": 1.0, "eval.num_samples": 40, "eval.proxy_samples": 20,
        "eval.guidance_grid": "0,1",
        "eval.noise_error_images": 4, "eval.noise_error_stride": 250,
    },
    # the embedded default, chosen on a CPU: width, lambda, proxy w and the native 8x8 side are each the best
    # measured within its budget (docs/results.md, "The digits preset's network and budget")
    "digits": {
        "data.dataset": "digits-lt", "data.imbalance": 8.0, "data.image_size": 8,
        "model.ch": 24, "model.dropout": 0.0, "model.tsa_resolutions": "4",
        "train.steps": 1800, "train.batch_size": 16, "train.lr": 1e-3, "train.warmup": 50, "train.ema_decay": 0.99,
        "train.log_every": 100, "train.eval_every": 300, "train.precision": "auto",
        "loss.pd_weight": 0.025, "loss.pd_pairs": 4,
        "sample.steps": 20, "sample.eta": 1.0, "eval.num_samples": 200, "eval.proxy_samples": 100,
        "eval.guidance_grid": "0,0.5,1,2", "eval.proxy_guidance": 0.5,
    },
    "cifar10-lt": {**_CIFAR, "data.dataset": "cifar10-lt", "data.imbalance": 100.0, "train.steps": 800_000},
    "cifar100-lt": {**_CIFAR, "data.dataset": "cifar100-lt", "data.imbalance": 100.0, "sample.guidance": 1.4,
                    "eval.proxy_guidance": 1.4},
    **{name: {**_OWN, **sizes} for name, sizes in {
        # a CPU can train it (its size and step cost: docs/results.md, "Your own data: Fashion-MNIST-LT")
        "own32": {"model.network": "own32", "train.steps": 6000, "train.batch_size": 32, "train.lr": 5e-4,
                  "train.warmup": 200, "train.ema_decay": 0.999, "train.eval_every": 1000, "train.log_every": 100,
                  "sample.steps": 20, "sample.eta": 1.0, "eval.num_samples": 500, "eval.proxy_samples": 200},
        # GPU nets (their CPU step is far too slow: the same table): CIFAR-like schedules
        "own64": {"model.network": "own64", "train.steps": 200_000, "train.batch_size": 64, "train.warmup": 2000,
                  "train.ema_decay": 0.9999, "train.eval_every": 10_000, "train.log_every": 100,
                  "sample.steps": 50, "eval.num_samples": 2000, "eval.proxy_samples": 500},
        "own128": {"model.network": "own128", "train.steps": 300_000, "train.batch_size": 32, "train.warmup": 5000,
                   "train.ema_decay": 0.9999, "train.eval_every": 10_000, "train.log_every": 100,
                   "sample.steps": 50, "eval.num_samples": 2000, "eval.proxy_samples": 500},
    }.items()},
}
