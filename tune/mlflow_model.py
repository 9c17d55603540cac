"""The EMA network of a trial as an MLflow model: ``mlflow.pytorch.log_model`` in the "pt2" format, and the loader
that ``pipelines.evaluate --checkpoint runs:/RUN_ID/model`` samples from.

Why "pt2" (``torch.export``) and never "pickle": a checkpoint is untrusted input, and a pickled model runs code on
load. The pt2 archive is a traced graph whose weights are plain tensors; the loader sets
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` so that MLflow checks the archive holds no pickle payload before it
loads it. The graph is traced at one example batch, with the batch dimension declared dynamic (``-1`` in the
signature): the sampler calls the network at several batch sizes (the last batch, guidance's doubled batch).
Image size, channels and dtypes are fixed, as they are for the network anyway.

What sampling and scoring need besides the network (config, class counts and names, image shape, step) is stored
in the model's MLmodel file under ``metadata["pdcbdm"]``.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pdcbdm.config import Config

MODEL_NAME = "model"
METADATA_KEY = "pdcbdm"
_META_FIELDS = ("config", "num_classes", "class_counts", "image_shape", "class_names", "step")
EXAMPLE_BATCH = 2  # > 1: torch.export keeps a size-1 dimension static


class ModelLoadError(ValueError):
    """A model URI that cannot be loaded as a pdcbdm network; the message names the URI and the cause."""


def _signature(image_shape: tuple[int, int, int]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    import numpy as np

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *image_shape), "x"),
                     TensorSpec(np.dtype(np.int64), (-1,), "t"), TensorSpec(np.dtype(np.int64), (-1,), "y")])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *image_shape))]))


def _example(image_shape: tuple[int, int, int], num_classes: int) -> tuple[torch.Tensor, ...]:
    """x_t, t and y of EXAMPLE_BATCH samples (one labelled, one with the null label: both embedding rows)."""
    return (torch.zeros(EXAMPLE_BATCH, *image_shape), torch.zeros(EXAMPLE_BATCH, dtype=torch.long),
            torch.tensor([0, num_classes] * (EXAMPLE_BATCH // 2), dtype=torch.long))


def model_metadata(payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of a sampling payload (``Trainer.sampling_payload``) that evaluation needs."""
    meta = {k: payload[k] for k in _META_FIELDS}
    meta["image_shape"] = [int(s) for s in meta["image_shape"]]
    return meta


def log_ema_model(uri: str, run_id: str, net: nn.Module, payload: dict[str, Any]) -> str:
    """Log ``net`` (the EMA network, in eval mode, on the CPU) as the run's model ``MODEL_NAME``; returns its
    model URI. ``payload`` is the trainer's sampling payload (its config, classes, image shape and step go into
    the MLmodel metadata; its tensors do not: the graph holds them)."""
    import copy

    import mlflow
    from mlflow.tracking import MlflowClient

    meta = model_metadata(payload)
    shape = tuple(meta["image_shape"])
    # a copy: exporting must not move or retrace the network training goes on with (a DDP or compiled wrapper)
    cpu_net = copy.deepcopy(net).to("cpu").eval()
    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    mlflow.set_tracking_uri(uri)
    # the logged model belongs to the active experiment, and runs:/ID/model finds it only in the run's own
    mlflow.set_experiment(experiment_id=experiment_id)
    with torch.no_grad():
        info = mlflow.pytorch.log_model(
            cpu_net, name=MODEL_NAME, run_id=run_id, serialization_format="pt2", signature=_signature(shape),
            input_example=_example(shape, int(meta["num_classes"])), metadata={METADATA_KEY: meta},
            pip_requirements=[],  # nothing to infer (inference would load the model once more): pdcbdm's env
            step=int(meta["step"]))
    return info.model_uri


def is_model_uri(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names an MLflow model (runs:/..., models:/...) rather than a checkpoint file."""
    return str(spec).startswith(("runs:/", "models:/"))


@contextmanager
def _no_pickle() -> Iterator[None]:
    """MLflow refuses a pt2 archive that holds pickle payloads while this is set (its default allows them)."""
    key = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def load_logged_model(model_uri: str, device: torch.device | str = "cpu") -> tuple[nn.Module, Config, dict[str, Any]]:
    """(network, config, metadata) of a model logged by ``log_ema_model``: the same triple as
    ``pdcbdm.training.load_model`` gives for a checkpoint file, so that evaluation treats both alike.

    The tracking store is MLflow's current one (``MLFLOW_TRACKING_URI`` or ``mlflow.set_tracking_uri``).
    Raises ModelLoadError naming the URI when it is missing, not a pdcbdm model, or not a pickle-free pt2 archive.
    """
    import mlflow
    from mlflow.models import Model

    try:
        with tempfile.TemporaryDirectory(prefix="pdcbdm-model-") as tmp, _no_pickle():
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
            meta = (Model.load(local).metadata or {}).get(METADATA_KEY)
            if not meta:
                raise ModelLoadError(f"{model_uri} is an MLflow model but not a pdcbdm network (no "
                                     f"metadata['{METADATA_KEY}'] in its MLmodel)")
            net = mlflow.pytorch.load_model(local)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing or refused model
        raise ModelLoadError(f"cannot load the MLflow model {model_uri} ({type(exc).__name__}: {exc})") from None
    try:
        cfg = Config.from_dict(meta["config"])
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{model_uri}: its metadata holds no valid config ({exc})") from None
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device), cfg, {**meta, "weights": "ema", "source": model_uri}


def model_uri_of_run(run_id: str) -> str:
    """The URI ``pipelines.evaluate --checkpoint`` takes for a trial's model."""
    return f"runs:/{run_id}/{MODEL_NAME}"

