"""CUDA-only checks (skipped where torch sees no CUDA device; the machines the `device` tool lends run them)."""

from __future__ import annotations

import pytest
import torch

from pdcbdm.data import build_dataset
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.presets import preset
from pdcbdm.sampling import generate
from pdcbdm.training import Trainer
from pdcbdm.training.trainer import build_network

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_each_rank_keeps_the_cuda_rng_its_worker_seeded():
    """The worker seeds train.seed + rank; building the Trainer (whose weights are seeded with train.seed alone)
    must leave that CUDA RNG alone, or every DDP rank would draw the same dropout masks."""
    cfg = preset("smoke")
    data = build_dataset(cfg.data.dataset)
    states = []
    for rank in (0, 1):
        torch.manual_seed(cfg.train.seed + rank)
        before = torch.cuda.get_rng_state()
        Trainer(cfg, data, device="cuda", rank=rank, world_size=2)
        assert torch.equal(torch.cuda.get_rng_state(), before)
        states.append(before)
    assert not torch.equal(states[0], states[1])


def test_a_training_window_does_not_sync_the_gpu():
    """The steps of a window (the gradient diagnostics included) make no host round trip; CUDA's own
    sync check raises at the first one. The data set lives on the GPU."""
    from pdcbdm.config import apply_overrides

    cfg = apply_overrides(preset("smoke"), ["train.log_every=4", "loss.p_uncond=0.5", "train.precision=bf16"])
    trainer = Trainer(cfg, build_dataset(cfg.data.dataset), device="cuda")
    assert trainer.feed.images.is_cuda
    trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.advance()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert "pd_grad_share" in trainer.take_window()


def test_prd_kmeans_and_feature_statistics_run_on_cuda():
    """PRD's k-means on the GPU: exact on separated clusters, one clustering per seed, and F-scores as the CPU's
    (float32 sums in another order may move a point or two); the feature statistics in float64 there."""
    import numpy as np

    from pdcbdm.metrics import feature_statistics, prd_f_scores
    from pdcbdm.metrics.prd import kmeans

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 64)) * 30.0
    blobs = np.repeat(np.arange(8), 50)
    x = centres[blobs] + rng.standard_normal((400, 64))
    points = torch.tensor(x, dtype=torch.float32, device="cuda")
    out = kmeans(points, 8, seed=0, n_init=3)
    labels = out.labels.tolist()
    assert out.labels.device.type == "cuda" and len(set(labels)) == len(set(zip(labels, blobs.tolist()))) == 8
    again = kmeans(points, 8, seed=0, n_init=3)
    assert torch.equal(out.labels, again.labels) and torch.equal(out.centres, again.centres)
    y = centres[blobs] + rng.standard_normal((400, 64))
    on_gpu = prd_f_scores(x, y, num_clusters=40, num_runs=3, device="cuda")
    on_cpu = prd_f_scores(x, y, num_clusters=40, num_runs=3, device="cpu")
    assert np.allclose(on_gpu, on_cpu, atol=0.03) and min(on_gpu) > 0.9
    mu, sigma = feature_statistics(x, device="cuda")
    assert np.allclose(mu, x.mean(axis=0)) and np.allclose(sigma, np.cov(x, rowvar=False))


# ---------------------------------------------------------------- the MLflow model's pt2 archive on CUDA

SHAPE, NUM_CLASSES, DEVICE = (1, 16, 16), 10, "cuda"


def _export_on_the_cpu(path) -> torch.nn.Module:
    """The smoke network (seeded), exported as ``tune.mlflow_model.log_ema_model`` has MLflow do it
    (``mlflow.pytorch.log_model(..., serialization_format="pt2")``: ``torch.export.export`` on the CPU with the
    batch dimension ``Dim.AUTO``, then ``torch.export.save``), without MLflow, which the GPU machines lack."""
    from torch.export import Dim

    torch.manual_seed(0)
    net = build_network(preset("smoke"), NUM_CLASSES, SHAPE).eval()
    example = (torch.zeros(2, *SHAPE), torch.zeros(2, dtype=torch.long), torch.tensor([0, NUM_CLASSES]))
    torch.export.save(torch.export.export(net, example, dynamic_shapes=[{0: Dim.AUTO}] * 3), path)
    return net


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t, t, y of n samples on DEVICE, the null label among the labels."""
    y = torch.arange(n) % (NUM_CLASSES + 1)
    return torch.randn(n, *SHAPE).to(DEVICE), torch.linspace(0, 999, n).long().to(DEVICE), y.to(DEVICE)


@pytest.mark.parametrize("move", ["module_to", "move_to_device_pass"])
def test_the_pt2_model_exported_on_the_cpu_loads_and_samples_on_cuda(move, tmp_path):
    """The logged model's graph names no device, so the archive traced on the CPU runs on CUDA once its module is
    moved there (``Module.to``, or torch.export's own ``move_to_device_pass`` on the program): the outputs of the
    network on CUDA, and the sampler's batch sizes (8, and 16 with guidance) run through its dynamic batch."""
    net = _export_on_the_cpu(tmp_path / "model.pt2").to(DEVICE)
    program = torch.export.load(tmp_path / "model.pt2")
    if move == "module_to":
        graph = program.module().to(DEVICE)
    else:
        from torch.export.passes import move_to_device_pass

        graph = move_to_device_pass(program, DEVICE).module()
    x, t, y = _inputs(4)
    with torch.no_grad():
        assert torch.allclose(graph(x, t, y), net(x, t, y), atol=1e-4)
        labels = torch.arange(NUM_CLASSES, device=DEVICE).repeat(2)
        images = generate(graph, GaussianDiffusion(preset("smoke").diffusion), labels, SHAPE, steps=3,
                          guidance=1.0, null_label=NUM_CLASSES, batch_size=8)
    assert images.shape == (20, *SHAPE) and images.dtype == torch.uint8


def test_the_safe_loaders_network_runs_on_cuda(tmp_path):
    """``pipelines.evaluate --device auto`` on a GPU machine: the safe loader reads the CPU archive's raw weights,
    rebuilds the network and moves it to CUDA, where it computes what the exported graph computes there."""
    pytest.importorskip("yaml")  # tune.mlflow_model reads MLmodel files with it
    from tune.mlflow_model import _read_pt2_weights, _rebuild

    _export_on_the_cpu(tmp_path / "model.pt2")
    meta = {"config": preset("smoke").to_dict(), "num_classes": NUM_CLASSES, "image_shape": list(SHAPE)}
    net, _ = _rebuild(meta, _read_pt2_weights(tmp_path / "model.pt2", "model.pt2"), "model.pt2")
    graph = torch.export.load(tmp_path / "model.pt2").module().to(DEVICE)
    x, t, y = _inputs(3)
    with torch.no_grad():
        assert torch.allclose(net.to(DEVICE)(x, t, y), graph(x, t, y), atol=1e-4)
