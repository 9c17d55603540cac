"""The ``pt2_graph`` step (the network's ``torch.export`` graph run on the device) and the ``pt2_logged``
step (a model logged through MLflow, loaded as ``pipelines.evaluate`` loads it and sampled)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from pdcbdm.config import Config
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.evaluation.settings import sampling_autocast
from pdcbdm.sampling import generate, uniform_labels
from pdcbdm.training import build_network
from pipelines.gpu_check.context import Check, result, skip_for_packages, timed
from pipelines.gpu_check.options import no_tf32


# ---------------------------------------------------------------------------------------------------- pt2
def step_pt2_graph(check: Check) -> dict[str, Any]:
    """``torch.export`` of the network on the CPU with a dynamic batch, as MLflow's pt2 format exports it, and its
    graph moved to the device and run there against the network itself: whoever serves the archive runs that
    graph, which must name no device (the project's own loader rebuilds the network and never reads it)."""
    cfg = check.cfg()
    torch.manual_seed(0)
    net = build_network(cfg, 10, (3, 32, 32)).eval()
    example = (torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), torch.tensor([0, 10]))
    batch_dim = [{0: torch.export.Dim.AUTO}] * 3
    with torch.no_grad():
        exported, export_s = timed(check, lambda: torch.export.export(net, example, dynamic_shapes=batch_dim))
    graph = exported.module().to(check.device)
    x = torch.randn(3, 3, 32, 32, device=check.device)
    t = torch.tensor([0, 500, 999], device=check.device)
    y = torch.tensor([0, 9, 10], device=check.device)
    with torch.no_grad(), no_tf32():  # TF32 would let the two differ by the kernels each picks
        err = float((graph(x, t, y) - net.to(check.device)(x, t, y)).abs().max())
    ok = err < 1e-3
    return result("PASS" if ok else "FAIL", f"exported on the CPU in {export_s:.1f}s, runs on {check.device} at batch "
                  f"3 (traced at 2); largest difference to the network {err:.2g}", export_s=export_s, max_abs_diff=err)


def step_pt2_logged(check: Check) -> dict[str, Any]:
    """A model logged by ``log_ema_model`` into a local store, loaded as ``pipelines.evaluate`` loads it (on the
    CPU, through the safe loader), moved to the device and sampled there."""
    skipped = skip_for_packages(("mlflow",), "the model is logged and read through MLflow: tune/mlflow_model.py")
    if skipped:
        return skipped
    # deferred: MLflow is optional here (this step skips without it); these log and load through it
    import mlflow
    from mlflow.tracking import MlflowClient
    from pipelines.model_source import load_network
    from tune.mlflow_model import log_ema_model, model_uri_of_run

    cfg = check.cfg()
    torch.manual_seed(0)
    net = build_network(cfg, 10, (3, 32, 32)).eval()
    uri = f"sqlite:///{check.work / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("gpu-check", artifact_location=(check.work / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    before = mlflow.get_tracking_uri()
    try:
        _, log_s = timed(check, lambda: log_ema_model(uri, run_id, net, _payload(check, cfg)))
        mlflow.set_tracking_uri(uri)
        loaded, loaded_cfg, _ = load_network(model_uri_of_run(run_id), "ema")
    finally:
        mlflow.set_tracking_uri(before)
        client.set_terminated(run_id)
    same = all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    images, sample_s = _sample_logged(check, loaded.to(check.device), loaded_cfg)
    ok = same and tuple(images.shape) == (cfg.eval.batch_size, 3, 32, 32)
    return result("PASS" if ok else "FAIL", f"logged in {log_s:.1f}s, loaded with the same weights: {same}; sampled "
                  f"{images.shape[0]} images on {check.device} in {sample_s:.1f}s", log_s=log_s, same_weights=same,
                  sample_s=sample_s)


def _payload(check: Check, cfg: Config) -> dict[str, Any]:
    """The sampling payload ``log_ema_model`` takes, for the fake data set."""
    data = check.dataset()
    return {"config": cfg.to_dict(), "num_classes": 10, "class_counts": list(data.counts()),
            "image_shape": [3, 32, 32], "class_names": list(data.class_names), "step": 0}


def _sample_logged(check: Check, net: torch.nn.Module, cfg: Config) -> tuple[torch.Tensor, float]:
    labels = uniform_labels(cfg.eval.batch_size, 10).to(check.device)
    autocast = sampling_autocast(cfg, check.device) or contextlib.nullcontext
    return timed(check, lambda: generate(net, GaussianDiffusion(cfg.diffusion), labels, (3, 32, 32), sampler="ddim",
                                         steps=3, guidance=cfg.sample.guidance, null_label=10,
                                         batch_size=cfg.eval.batch_size, autocast=autocast))
