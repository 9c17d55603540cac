"""Where a pipeline's network comes from, shared by ``pipelines.evaluate`` and ``pipelines.generate``: a checkpoint
file of ``pdcbdm.train`` or an MLflow model URI (``runs:/ID/model``, read by ``tune.mlflow_model``'s safe loader,
which never runs code from the run), and the device it runs on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pdcbdm.config import Config
from pdcbdm.training import CheckpointError, load_model, resolve_device

__all__ = ["UsageError", "pick_device", "load_network", "source_name"]


class UsageError(ValueError):
    """A command-line value is invalid; the message names the option."""


def pick_device(spec: str) -> torch.device:
    """``auto``/``cpu``/``cuda[:N]`` to a torch.device; UsageError when CUDA is asked for but absent."""
    device = resolve_device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec} asks for CUDA, but torch sees no CUDA device")
    return device


def load_network(checkpoint: str | os.PathLike, which: str) -> tuple[nn.Module, Config, dict[str, Any]]:
    """(network, config, checkpoint data) of a checkpoint file or of an MLflow model URI (EMA weights only)."""
    from tune.mlflow_model import ModelLoadError, is_model_uri, load_logged_model

    if not is_model_uri(checkpoint):
        return load_model(checkpoint, which=which, device="cpu")
    if which != "ema":
        raise UsageError(f"--which {which}: an MLflow model holds only the EMA network; use --which ema")
    try:
        return load_logged_model(str(checkpoint), device="cpu")
    except ModelLoadError as exc:
        raise CheckpointError(str(exc)) from None


def source_name(checkpoint: str | os.PathLike) -> str:
    """An MLflow model URI as given, a checkpoint file as its absolute path."""
    return str(checkpoint) if ":/" in str(checkpoint) else str(Path(checkpoint).resolve())
