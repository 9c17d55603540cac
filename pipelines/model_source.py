"""Where a pipeline's network comes from, shared by ``pipelines.evaluate`` and ``pipelines.generate``: a checkpoint
file of ``pdcbdm.train`` or an MLflow model URI, and the device it runs on.

MLflow model URIs: a trial's ``runs:/ID/model``, a logged model's ``models:/m-ID``, or a registered version
``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (``tune.registry``: ``models:/pdcbdm-SEARCH@best`` is a search's
winner). A registry URI is pinned to its version first (an alias moves; the results name the version), and every
form is read by ``tune.mlflow_model``'s safe loader: files copied and checked, raw float32 weights, nothing of the
model imported or unpickled, whoever registered it."""

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
    """(network, config, checkpoint data) of a checkpoint file or of an MLflow model URI (EMA weights only). A
    registry URI's data says which version it was: ``source`` is ``models:/NAME/VERSION`` and ``registered`` the
    version's record (``tune.registry.Pinned``)."""
    # deferred: both import MLflow (1.3 s); the --help of pipelines.evaluate and pipelines.generate answers without it
    from tune.mlflow_model import ModelLoadError, is_model_uri, load_logged_model
    from tune.registry import RegistryError, is_registry_uri, pin

    if not is_model_uri(checkpoint):
        return load_model(checkpoint, which=which, device="cpu")
    if which != "ema":
        raise UsageError(f"--which {which}: an MLflow model holds only the EMA network; use --which ema")
    try:
        pinned = pin(str(checkpoint)) if is_registry_uri(checkpoint) else None
        net, cfg, data = load_logged_model(pinned.uri if pinned else str(checkpoint), device="cpu")
    except (ModelLoadError, RegistryError) as exc:
        raise CheckpointError(str(exc)) from None
    if pinned is not None:
        data["registered"] = pinned.record()
    return net, cfg, data


def source_name(checkpoint: str | os.PathLike, data: dict[str, Any] | None = None) -> str:
    """A checkpoint file as its absolute path; an MLflow model URI as given, but a registry URI as the version it
    named when loaded (``data["source"]``: ``models:/NAME/VERSION``), which an alias's later move does not
    change."""
    if data and data.get("registered"):
        return str(data["source"])
    return str(checkpoint) if ":/" in str(checkpoint) else str(Path(checkpoint).resolve())
