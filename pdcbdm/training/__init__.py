"""Ray-free training: the loss step, the trainer (optimiser, EMA, precision) and checkpoints."""

from pdcbdm.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pdcbdm.training.step import Batch, compute_loss
from pdcbdm.training.trainer import (
    EMA, NonFiniteLossError, Trainer, build_network, ema_decay_at, ema_ready_step, load_model, native_bf16,
    network_levels, resolve_device, resolve_precision,
)

__all__ = [
    "Batch", "CheckpointError", "EMA", "NonFiniteLossError", "Trainer", "build_network", "compute_loss", "ema_decay_at",
    "ema_ready_step", "network_levels",
    "load_checkpoint", "load_model", "native_bf16", "resolve_device", "resolve_precision", "save_checkpoint",
]
