"""Checkpoints: written atomically, read with ``weights_only=True``, validated before use."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pdcbdm.io import atomic_write

FORMAT = "pdcbdm-checkpoint-v1"
REQUIRED = ("format", "config", "num_classes", "step", "net", "ema")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what it is loaded into."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Save ``payload`` (tensors, numbers, strings, nested dicts/lists) through a temp file and ``os.replace``,
    so a killed writer never leaves a half-written file under ``path``."""
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint written by ``save_checkpoint``; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a pdcbdm checkpoint "
                              f"({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return data


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                      path: str | os.PathLike) -> None:
    """``load_state_dict`` with an error that names the checkpoint and the mismatching keys or shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{name}: {keys[:5]}{' ...' if len(keys) > 5 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
            if keys
        )
        raise CheckpointError(f"checkpoint {path}: {what} does not match the configured network ({detail})")
    module.load_state_dict(state)


# Fields a run may change when it continues a checkpoint: the budget, and where and how fast it runs.
RESUMABLE_FIELDS = ("train.steps", "train.device", "train.threads")


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       resumable: tuple[str, ...] = RESUMABLE_FIELDS) -> list[str]:
    """The fields (``section.field: saved -> current``) in which a checkpoint's config (``Config.to_dict``) and the
    current one differ, beyond ``resumable``: continuing the checkpoint under such a config would record the new
    values for steps trained with the old ones."""
    def flat(cfg: dict[str, Any]) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, section in cfg.items() if isinstance(section, dict) for k, v in section.items()}

    old, new = flat(saved), flat(current)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in resumable and old.get(k) != new.get(k)]
