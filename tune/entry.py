"""The training function each trial hands to its TorchTrainer, in a module that imports nothing heavy.

Ray pickles the function by reference, so every process that unpickles it imports its module: the Train
controller as well as the workers. The controller never trains; importing ``tune.worker`` there (evaluation,
scikit-learn, MLflow, pandas) would only delay the worker group's start."""

from __future__ import annotations

from typing import Any


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop: ``tune.worker.train_loop``, imported on the worker only."""
    # deferred: the Train controller unpickles this function too and never trains (module docstring)
    from tune.worker import train_loop as run

    run(config)
