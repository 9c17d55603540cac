"""Performance benchmark of PD-CBDM: training throughput and memory, component costs, samplers and metrics.

    python -m pipelines.benchmark --quick                      # under two minutes on 2 idle CPU cores
    python -m pipelines.benchmark                              # full: about 30 to 40 minutes on 2 CPU cores
    python -m pipelines.benchmark --device cuda --out bench-gpu.json
    python -m pipelines.benchmark --sections train --cifar-batch 8 --small-batch 16 --steps 10 --precisions fp32 \
        --variants ddpm+cfg,+cbdm,cbdm+tsa,cbdm+pd,all        # issue 3's grid: smoke's and cifar's steps

Sections (``--sections``, default all three):
  train     the real ``Trainer.advance`` (loss, backward, gradient clipping, Adam, EMA) on synthetic long-tailed
            data of each preset's shape, for each variant -- ``ddpm+cfg`` (L_DM only, Eq. 8), ``+cbdm`` (adds
            L_DA's second label pass, Eq. 9), ``+pd`` (adds the head/tail pairs, Eq. 10-11), ``+tsa`` (TSA at the
            preset's resolution, Eq. 13-14) and ``all`` (PD-CBDM) -- in fp32 and bf16 autocast (``cbdm+pd`` and
            ``cbdm+tsa`` on request). Presets and batches: small at 64 (and 16, the ``smoke`` config's batch, in
            the full run), cifar at 8 (and 32 in the full run). Reports the median step time, images/s
            (main-batch images), the peak memory, the cost relative to ``ddpm+cfg`` fp32, that cost divided by
            the extra network work (images through the network per step / batch), and the issues' targets as
            ratios. ``--quick`` leaves out cifar's +cbdm and +pd (both precisions) and +tsa in bf16: their costs
            come from the small preset there (``--full-grid`` keeps them).
  sampling  the small preset at batch 64: one guided forward with cond+uncond batched (``guided_eps``) against
            two separate forwards and against an unguided one; full DDIM runs of S steps (both guidance modes);
            DDPM ancestral steps (timed on a short schedule, whose steps cost what a T=1000 step costs, and
            extrapolated to T = 1000).
  quality   (opt-in: ``--sections quality``, tens of minutes) ``pipelines.quality`` on the digits preset: each
            variant's time-to-quality curve (FID, head consistency and reject rate every ``eval_every`` steps, each
            beside its real-vs-real floor; the first step and training seconds at which head consistency reaches
            0.9 and FID 3x its floor) and the samplers compared on its last network (FID, reject rate, seconds
            per sample), with pictures in ``--quality-out``.
  data      (opt-in: ``--sections data``; writes ``--data-images`` x ``--data-size`` px, 1.2 GB + PNG at the default
            100k x 64) memory and start-up of workers on a prepared data set: the data load, each of
            ``--data-workers`` concurrent workers' private memory against 10% of the array, the digest from
            _meta.json against hashing the array (``pipelines.bench_data``).
  metrics   features/s of the digits CNN and, when its weights are on disk, the FID Inception (no download is
            tried); improved precision/recall (k = 5) and PRD (F_8, F_1/8) on random 2048-d features, 10k x 10k
            (``--quick``: 2k x 2k), with their time and peak memory; FID of n against a 5 x n reference per
            evaluation, with the reference's statistics kept, from scratch, and by scipy's sqrtm; every metric of
            one evaluation (FID against the kept statistics, precision/recall, KID, PRD) on the device, timed one
            by one, for n seeded low-rank class-mixture features against 5 x n (10k x 50k, ``--quick`` 2k x 10k).

Method. Every measurement runs in a fresh process forked from a "forkserver" that has imported torch and pdcbdm
once (so a job costs no import time, and CUDA is initialised only inside the job). Each job does its set-up,
records a memory baseline, runs warm-up iterations, then times each iteration (``torch.cuda.synchronize`` around
it on CUDA) and reports the median, with the median process CPU time beside it: on a machine shared with other
jobs the CPU time (at ``--threads 1`` especially) stays close to the idle machine's wall time while wall times
do not, so the relative costs are given from both. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on the CPU the process's peak resident set (``VmHWM`` of /proc/self/status, reset by
writing 5 to /proc/self/clear_refs and anyway fresh in a new process). ``peak_mb`` is that peak; ``growth_mb`` is
the peak minus the memory at the baseline, i.e. what the measured work itself needed (for training: gradients,
Adam moments, activations; the network and its EMA copy are in the baseline).

Choices. Label dropout is set to p_uncond = 0 while timing: a dropped-label step skips CBDM's y' pass, which
would make step times bimodal, and the dropout itself costs nothing. PD pairs per step are ``loss.pd_pairs``'s
default (half the batch), so ``+pd`` sends twice the batch through the network. Each step includes drawing its
batch from the in-memory data set, as training does. Synthetic data: random uint8 images, 10 classes with
long-tailed counts (rho = 10), so the 7:3 head/tail split holds. No timing here is a test assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_VARIANTS", "SECTIONS", "VARIANTS", "BenchSettings", "JobRunner", "PeakMemory", "Timing", "build_parser",
    "format_table", "machine_info", "main", "network_images_per_step", "run_benchmark", "settings_from_args",
    "time_call", "timed_median", "train_plan", "variant_config",
]

SECTIONS = ("train", "sampling", "metrics")
OPT_IN_SECTIONS = ("quality", "data")  # minutes, gigabytes of disk: run only when named in --sections
PRESETS = ("small", "cifar")
PRECISIONS = ("fp32", "bf16")
# name -> (cbdm_tau, pd_weight, use TSA at the preset's resolution)
VARIANTS: dict[str, tuple[float, float, bool]] = {
    "ddpm+cfg": (0.0, 0.0, False),
    "+cbdm": (1.0, 0.0, False),
    "+pd": (0.0, 0.01, False),
    "+tsa": (0.0, 0.0, True),
    "all": (1.0, 0.01, True),
    # not run by default: with "+cbdm" and "all" they make the 2 x 2 grid over CBDM (with/without TSA and PD)
    "cbdm+pd": (1.0, 0.01, False),
    "cbdm+tsa": (1.0, 0.0, True),
}
DEFAULT_VARIANTS = ("ddpm+cfg", "+cbdm", "+pd", "+tsa", "all")
PRESET_SHAPES = {"small": (1, 16, 16), "cifar": (3, 32, 32)}
PRESET_TSA = {"small": "8", "cifar": "16"}
NUM_CLASSES = 10
# Issue 3: the CBDM reference U-Net at the cifar config, batch 32, fp32, 2 threads, on the 2-core AMD EPYC
# (avx512_bf16) machine; only comparable on that machine.
REFERENCE_CPU = {"batch": 32, "ddpm+cfg": 4.7, "+cbdm": 2.4}
# --quick keeps to about two minutes by timing CBDM's and PD's costs on the small preset only, and bf16 on the
# cifar preset only for ddpm+cfg and all (--full-grid runs them all).
QUICK_SKIP = tuple(f"cifar/{p}/{v}" for p, v in [("fp32", "+cbdm"), ("fp32", "+pd"), ("bf16", "+cbdm"),
                                                  ("bf16", "+pd"), ("bf16", "+tsa")])
FORKSERVER_PRELOAD = ["torch", "numpy", "pdcbdm.training", "pdcbdm.sampling", "pdcbdm.metrics"]


@dataclass(frozen=True)
class BenchSettings:
    """Every resolved option of one benchmark run (written to the JSON as ``settings``).

    Args:
        quick: the short preset of sizes (used to fill the defaults below).
        device: "cpu" or "cuda[:N]" (resolved from "auto").
        threads: torch intra-op threads in each job (0 = torch's default).
        sections: which of SECTIONS run.
        presets, variants, precisions: the training grid.
        small_batches, cifar_batches: training batch sizes of each preset (small at 16 is the ``smoke`` config's).
        steps, warmup: timed and untimed iterations per training job.
        sample_batch, ddim_steps, ddpm_probe_steps, sample_repeats, guidance: the sampling section.
        metric_n, feature_dim, prd_clusters, prd_runs, prd_n_init: precision/recall and PRD sizes.
        feature_images, inception_images, extractors: the feature-extractor throughput jobs.
        job_timeout: seconds after which a job is stopped and recorded as an error.
        skip: training jobs left out, as "preset/precision/variant" (see QUICK_SKIP).
        quality_*: the opt-in quality section (``pipelines.quality``): variants, training steps, steps between
            curve points, samples per score, samplers compared and the folder for its pictures.
        data_*: the opt-in data section (``pipelines.bench_data``): images and side of the synthetic prepared
            set, concurrent workers, Trainer steps and batch per worker, the folder (None: a temporary one).
    """

    quick: bool
    device: str
    threads: int
    sections: tuple[str, ...]
    presets: tuple[str, ...]
    variants: tuple[str, ...]
    precisions: tuple[str, ...]
    small_batches: tuple[int, ...]
    cifar_batches: tuple[int, ...]
    steps: int
    warmup: int
    sample_batch: int
    ddim_steps: tuple[int, ...]
    ddpm_probe_steps: int
    sample_repeats: int
    guidance: float
    metric_n: int
    feature_dim: int
    prd_clusters: int
    prd_runs: int
    prd_n_init: int
    feature_images: int
    inception_images: int
    extractors: tuple[str, ...]
    job_timeout: float
    skip: tuple[str, ...] = ()
    quality_variants: tuple[str, ...] = ("ddpm", "pd-cbdm")
    quality_steps: int | None = None
    quality_every: int | None = None
    quality_samples: int | None = None
    quality_samplers: tuple[str, ...] = ("ddim:20:1", "ddim:20:0", "ddim:50:1", "ddpm:1000")
    quality_out: str = "runs/bench-quality"
    data_images: int = 100_000
    data_size: int = 64
    data_workers: int = 4
    data_steps: int = 3
    data_batch: int = 16
    data_dir: str | None = None
    data_decode: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers (run inside the jobs)
# ---------------------------------------------------------------------------------------------------------------
def _proc_status_mb(key: str, path: str = "/proc/self/status") -> float | None:
    """A "Key: N kB" line of a /proc file (``VmHWM``/``VmRSS`` of /proc/self/status, ``MemTotal`` of
    /proc/meminfo) in MiB, or None where /proc is missing."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the work between ``start()`` and ``stop()``.

    Args:
        device: the torch device of the work; CUDA uses the caching allocator's counters, anything else the
            process's resident set (see the module docstring).
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.device = device
        self.baseline: float | None = None

    def start(self) -> None:
        """Record the baseline and reset the peak counter."""
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            gc.collect()  # garbage of earlier work, freed during this work, would lower the RSS and hide its growth
            _reset_cpu_peak()
            self.baseline = _proc_status_mb("VmRSS")

    def stop(self) -> dict[str, float | None]:
        """``{"peak_mb": peak since start, "growth_mb": peak - baseline}`` (None where unmeasurable)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            peak: float | None = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _proc_status_mb("VmHWM")
        growth = None if peak is None or self.baseline is None else max(peak - self.baseline, 0.0)
        return {"peak_mb": peak, "growth_mb": growth}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of one call of ``fn``, the device's queued work finished before
    and after. CPU seconds (all threads) are reported besides wall time because on a shared machine they are far
    less disturbed by other processes' load."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass(frozen=True)
class Timing:
    """Median wall seconds, every timed wall time, and median CPU seconds of repeated calls."""

    median_s: float
    all_s: list[float]
    cpu_median_s: float


def timed_median(fn: Callable[[], Any], device: str, *, warmup: int, repeats: int) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed."""
    for _ in range(warmup):
        fn()
    pairs = [time_call(fn, device) for _ in range(repeats)]
    walls = [w for w, _ in pairs]
    return Timing(statistics.median(walls), walls, statistics.median(c for _, c in pairs))


# ---------------------------------------------------------------------------------------------------------------
# training jobs
# ---------------------------------------------------------------------------------------------------------------
def variant_config(preset: str, variant: str, precision: str, batch: int) -> Any:
    """The ``pdcbdm.config.Config`` of one training variant (see VARIANTS and the module docstring).

    Args:
        preset: "small" or "cifar" (``model.preset``).
        variant: a key of VARIANTS; sets ``loss.cbdm_tau`` (Eq. 9), ``loss.pd_weight`` (lambda, Eq. 10) and
            ``model.tsa_resolutions`` (Eq. 13-14; the preset's default resolution or none).
        precision: "fp32" or "bf16" (``train.precision``).
        batch: ``train.batch_size``.
    """
    from pdcbdm.config import Config, LossConfig, ModelConfig, TrainConfig

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {list(VARIANTS)}")
    if preset not in PRESET_SHAPES:
        raise ValueError(f"unknown preset {preset!r}; valid: {list(PRESET_SHAPES)}")
    tau, pd_weight, tsa = VARIANTS[variant]
    return Config(
        model=ModelConfig(preset=preset, tsa_resolutions=PRESET_TSA[preset] if tsa else ""),
        loss=LossConfig(p_uncond=0.0, cbdm_tau=tau, pd_weight=pd_weight),
        train=TrainConfig(batch_size=batch, precision=precision, seed=0),
    )


def network_images_per_step(cfg: Any) -> int:
    """Images sent through the network per step: the batch, plus its y' copy when L_DA is on (Eq. 9), plus the
    head and tail pairs when the PD loss is on (Eq. 10); p_uncond is 0 in this benchmark."""
    batch = cfg.train.batch_size
    pairs = cfg.loss.pd_pairs or batch // 2
    return batch * (2 if cfg.loss.cbdm_tau > 0 else 1) + (2 * pairs if cfg.loss.pd_weight > 0 else 0)


def synthetic_dataset(preset: str, seed: int = 0) -> Any:
    """Random uint8 images of the preset's shape with long-tailed counts (10 classes, rho = 10, 100 down to 10)."""
    import torch

    from pdcbdm.data import ImageDataset, longtail_counts

    counts = longtail_counts(100, NUM_CLASSES, 10.0)
    labels = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(counts)])
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(labels), *PRESET_SHAPES[preset]), dtype=torch.uint8, generator=gen)
    return ImageDataset(images, labels, [f"c{k}" for k in range(NUM_CLASSES)], hflip=preset == "cifar")


def train_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``Trainer.advance`` (the training loops' step; each timed call waits for the device) for one
    (preset, variant, precision, batch); see the module docstring."""
    from pdcbdm.training import Trainer

    cfg = variant_config(spec["preset"], spec["variant"], spec["precision"], spec["batch"])
    trainer = Trainer(cfg, synthetic_dataset(spec["preset"]), device=spec["device"])
    memory = PeakMemory(spec["device"])
    memory.start()
    timing = timed_median(trainer.advance, spec["device"], warmup=spec["warmup"], repeats=spec["steps"])
    work = network_images_per_step(cfg)
    return {
        "preset": spec["preset"], "variant": spec["variant"], "precision": spec["precision"],
        "batch": spec["batch"], "tsa_resolutions": cfg.model.tsa_resolutions, "cbdm_tau": cfg.loss.cbdm_tau,
        "pd_weight": cfg.loss.pd_weight, "params": trainer.net.count_parameters(),
        "network_images_per_step": work, "work_ratio": work / cfg.train.batch_size,
        "step_s": timing.median_s, "step_s_all": timing.all_s, "step_cpu_s": timing.cpu_median_s,
        "images_per_s": cfg.train.batch_size / timing.median_s,
        **memory.stop(),
    }


# ---------------------------------------------------------------------------------------------------------------
# sampling job
# ---------------------------------------------------------------------------------------------------------------
def _two_forwards(net: Any) -> Any:
    """Wrap ``net`` so a guidance batch [cond; uncond] goes through as two forwards of half size (the unbatched
    classifier-free guidance baseline), with the same result as one batched forward."""
    import torch
    from torch import nn

    class TwoForwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if x.shape[0] % 2:
                return self.net(x, t, y)
            h = x.shape[0] // 2
            return torch.cat([self.net(x[:h], t[:h], y[:h]), self.net(x[h:], t[h:], y[h:])])

    return TwoForwards().eval()


def _forward_rows(net: Any, labels: Any, shape: tuple[int, ...], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One eps evaluation three ways: unguided (one pass), guided batched (``guided_eps``), guided in two passes."""
    import torch

    from pdcbdm.sampling import guided_eps

    device, w, null = spec["device"], spec["guidance"], net.null_label
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((labels.shape[0], *shape), generator=gen).to(device)
    t = torch.randint(0, 1000, (labels.shape[0],), generator=gen).to(device)
    two = _two_forwards(net)
    modes = {"unguided (w=0)": (net, 0.0), "guided, batched": (net, w), "guided, two forwards": (two, w)}
    rows = []
    for mode, (model, weight) in modes.items():
        with torch.no_grad():
            timing = timed_median(lambda: guided_eps(model, x, t, labels, weight, null), device, warmup=1,
                                  repeats=max(3, spec["repeats"]))
        rows.append({"what": f"eps forward, {mode}", "seconds": timing.median_s, "cpu_s": timing.cpu_median_s,
                     "images_per_s": labels.shape[0] / timing.median_s})
    return rows


def _sampler_rows(net: Any, labels: Any, shape: tuple[int, ...], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Full DDIM runs (guidance batched and in two forwards) and DDPM steps extrapolated to T = 1000."""
    import torch

    from pdcbdm.config import DiffusionConfig
    from pdcbdm.diffusion import GaussianDiffusion
    from pdcbdm.sampling import ddim_sample, ddpm_sample

    device, w, n = spec["device"], spec["guidance"], labels.shape[0]
    diffusion = GaussianDiffusion(DiffusionConfig())
    rows = []
    for steps in spec["ddim_steps"]:
        for mode, model in (("batched", net), ("two forwards", _two_forwards(net))):
            run = lambda: ddim_sample(model, diffusion, labels, shape, steps=steps, guidance=w,  # noqa: E731
                                      null_label=net.null_label, generator=torch.Generator().manual_seed(0))
            timing = timed_median(run, device, warmup=0, repeats=spec["repeats"])
            sec = timing.median_s
            rows.append({"what": f"DDIM {steps} steps, guidance {mode}", "seconds": sec, "images_per_s": n / sec,
                         "seconds_per_step": sec / steps, "cpu_s": timing.cpu_median_s})
    probe = GaussianDiffusion(DiffusionConfig(timesteps=spec["ddpm_probe_steps"]))
    run = lambda: ddpm_sample(net, probe, labels, shape, guidance=w, null_label=net.null_label,  # noqa: E731
                              generator=torch.Generator().manual_seed(0))
    timing = timed_median(run, device, warmup=0, repeats=spec["repeats"])
    per_step, scale = timing.median_s / spec["ddpm_probe_steps"], 1000 / spec["ddpm_probe_steps"]
    rows.append({"what": "DDPM 1000 steps, guidance batched (extrapolated)", "seconds": per_step * 1000,
                 "images_per_s": n / (per_step * 1000), "seconds_per_step": per_step, "extrapolated": True,
                 "measured_steps": spec["ddpm_probe_steps"], "cpu_s": timing.cpu_median_s * scale})
    return rows


def sampling_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Sampler throughput of the preset's PD-CBDM network (TSA on) at ``spec["batch"]`` images (fp32)."""
    import torch

    from pdcbdm.models import build_unet
    from pdcbdm.sampling import uniform_labels

    preset = spec["preset"]
    torch.manual_seed(0)
    net = build_unet(preset, NUM_CLASSES, tsa_resolutions=PRESET_TSA[preset]).to(spec["device"]).eval()
    labels = uniform_labels(spec["batch"], NUM_CLASSES).to(spec["device"])
    shape = PRESET_SHAPES[preset]
    memory = PeakMemory(spec["device"])
    memory.start()
    rows = _forward_rows(net, labels, shape, spec) + _sampler_rows(net, labels, shape, spec)
    return {"preset": preset, "batch": spec["batch"], "guidance": spec["guidance"], "tsa_resolutions":
            PRESET_TSA[preset], "params": net.count_parameters(), "rows": rows, **memory.stop()}


# ---------------------------------------------------------------------------------------------------------------
# metric jobs
# ---------------------------------------------------------------------------------------------------------------
def _build_extractor(kind: str, device: str) -> tuple[Any, tuple[int, int, int], str]:
    """(extractor, input image shape, note). The digits CNN is built with fresh weights: its cost does not
    depend on them, and training it would dominate the job. Inception weights come only from disk (no download);
    FileNotFoundError when there are none."""
    if kind == "digits":
        from pdcbdm.metrics.digits_net import DigitsExtractor, DigitsNet

        return DigitsExtractor(DigitsNet(), accuracy=0.0, device=device), (1, 16, 16), "untrained weights"
    if kind == "inception":
        from pdcbdm.metrics.inception import InceptionExtractor, resolve_inception_weights

        weights = resolve_inception_weights(allow_download=False)
        return InceptionExtractor(weights, device), (3, 32, 32), f"weights: {weights.source}"
    raise ValueError(f"unknown extractor {kind!r}; valid: digits, inception")


def features_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Features/s of one extractor over ``spec["images"]`` random uint8 images, in batches of ``spec["batch"]``."""
    import torch

    from pdcbdm.metrics import extract_all

    try:
        extractor, shape, note = _build_extractor(spec["extractor"], spec["device"])
    except FileNotFoundError as err:
        return {"extractor": spec["extractor"], "skipped": str(err).splitlines()[0]}
    images = torch.randint(0, 256, (spec["images"], *shape), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    memory = PeakMemory(spec["device"])
    memory.start()
    extractor.extract(images[:min(spec["batch"], spec["images"])])  # warm-up
    sec, cpu = time_call(lambda: extract_all(extractor, images, batch_size=spec["batch"], progress=False),
                         spec["device"])
    return {"extractor": spec["extractor"], "name": extractor.name, "note": note, "images": spec["images"],
            "image_shape": list(shape), "batch": spec["batch"], "feature_dim": extractor.feature_dim,
            "seconds": sec, "cpu_s": cpu, "features_per_s": spec["images"] / sec, **memory.stop()}


def _random_features(n: int, dim: int, seed: int) -> tuple[Any, Any]:
    """Reference and generated features [n, dim]: two independent float32 draws of one standard Gaussian (the
    metrics' cost depends on the sizes only)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim), dtype=np.float32), rng.standard_normal((n, dim), dtype=np.float32)


def precision_recall_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and peak memory of improved precision/recall (k = 5) at n x n random features."""
    from pdcbdm.metrics import improved_precision_recall

    ref, gen = _random_features(spec["n"], spec["dim"], 0)
    memory = PeakMemory(spec["device"])
    memory.start()
    out: dict[str, Any] = {}
    run = lambda: out.update(zip(("precision", "recall"),  # noqa: E731
                                 improved_precision_recall(ref, gen, k=5, device=spec["device"])))
    sec, cpu = time_call(run, spec["device"])
    return {"metric": "precision_recall", "n_ref": spec["n"], "n_gen": spec["n"], "dim": spec["dim"], "k": 5,
            "seconds": sec, "cpu_s": cpu, **out, **memory.stop()}


def fid_job(spec: dict[str, Any]) -> dict[str, Any]:
    """FID of n generated features against a reference 5 x n, as each evaluation paid for it before the reference
    statistics were kept (both covariances and scipy's sqrtm of their product), computed from scratch with the
    eigendecomposition (both covariances, the reference's root), and with the reference's statistics kept: the
    first evaluation (the reference's covariance and root, once) and every later one."""
    import numpy as np
    import scipy.linalg

    from pdcbdm.metrics import ReferenceStatistics, feature_statistics, fid_from_features, fid_to_reference

    n, dim = spec["n"], spec["dim"]
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((5 * n, dim), dtype=np.float32).astype(np.float64)
    gen = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float64)
    labels = np.zeros(len(ref), dtype=np.int64)

    def sqrtm_path() -> float:
        (m1, s1), (m2, s2) = feature_statistics(gen), feature_statistics(ref)
        root = scipy.linalg.sqrtm(s1 @ s2).real
        return float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))

    values: dict[str, float] = {}
    stats = ReferenceStatistics(ref, labels)
    timed = {}
    for key, call in (("sqrtm_s", sqrtm_path), ("uncached_s", lambda: fid_from_features(gen, ref)),
                      ("first_s", lambda: (stats.of().root, fid_to_reference(gen, stats))[1]),
                      ("cached_s", lambda: fid_to_reference(gen, stats))):
        timed[key], _ = time_call(lambda c=call, k=key: values.__setitem__(k, c()), "cpu")
    return {"metric": "fid", "n_gen": n, "n_ref": 5 * n, "dim": dim, **timed,
            "fid": values["cached_s"], "fid_sqrtm": values["sqrtm_s"]}


def prd_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and peak memory of PRD's (F_8, F_1/8) at n x n random features (the torch k-means, on the device)."""
    from pdcbdm.metrics import prd_f_scores

    ref, gen = _random_features(spec["n"], spec["dim"], 1)
    memory = PeakMemory(spec["device"])
    memory.start()
    out: dict[str, Any] = {}
    run = lambda: out.update(zip(("f_8", "f_1_8"), prd_f_scores(  # noqa: E731
        gen, ref, num_clusters=spec["clusters"], num_runs=spec["runs"], n_init=spec["n_init"],
        device=spec["device"])))
    sec, cpu = time_call(run, spec["device"])
    return {"metric": "prd", "n_ref": spec["n"], "n_gen": spec["n"], "dim": spec["dim"],
            "num_clusters": spec["clusters"], "num_runs": spec["runs"], "n_init": spec["n_init"],
            "device": spec["device"], "seconds": sec, "cpu_s": cpu, **out, **memory.stop()}


def _mixture_features(n: int, dim: int, seed: int, *, shift: float = 0.0, classes: int = 10,
                      rank: int = 64) -> tuple[Any, Any]:
    """[n, dim] float32 features and their labels (balanced over ``classes``) with the shape of real network
    features: a class mixture on a ``rank``-dimensional subspace (class means and a decaying within-class spectrum
    on one basis, the same for every draw), plus small isotropic noise, passed through a softplus (pool features
    are non-negative). ``shift`` moves each class mean by about that many leading within-class standard deviations
    in a fixed random direction: a generated set close to, but not, the reference. The draw's own randomness comes
    from ``seed`` and ``n``, so sets of different sizes are independent draws."""
    import numpy as np

    family = np.random.default_rng(1234)  # one basis and one set of class means for every draw
    basis = family.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    means = 3.0 * family.standard_normal((classes, rank)).astype(np.float32)
    moves = family.standard_normal((classes, rank)).astype(np.float32)
    scales = (1.0 / np.sqrt(np.arange(1, rank + 1))).astype(np.float32)  # a decaying spectrum, as Inception's
    rng = np.random.default_rng([seed, n])
    labels = np.arange(n) % classes
    latent = means[labels] + shift * moves[labels] / np.sqrt(rank) + rng.standard_normal((n, rank),
                                                                                         dtype=np.float32) * scales
    x = latent @ basis + 0.1 * rng.standard_normal((n, dim), dtype=np.float32)
    return np.logaddexp(0.0, x).astype(np.float32), labels


def metrics_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Every feature metric of one evaluation, timed one by one, for ``spec["n"]`` generated features against a
    ``5 x n`` reference (10k x 50k at 2,048-d: CIFAR's evaluation): the reference's statistics once (mean,
    covariance, root: ``first_s``), then per evaluation FID against them, improved precision/recall (k = 5)
    against the whole reference, KID against a seeded KID_MAX_REFERENCE subsample of it, and PRD on equal-size
    sets, each as ``evaluate_features`` calls it, on ``spec["device"]``. ``total_s``: the per-evaluation sum."""
    import numpy as np

    from pdcbdm.metrics import ReferenceStatistics, fid_to_reference, improved_precision_recall, kid_from_features
    from pdcbdm.metrics import prd_f_scores
    from pdcbdm.metrics.scoring import KID_MAX_REFERENCE

    n, dim, device = spec["n"], spec["dim"], spec["device"]
    ref, ref_labels = _mixture_features(5 * n, dim, 0)
    gen, gen_labels = _mixture_features(n, dim, 1, shift=0.5)
    kid_rows = np.sort(np.random.default_rng(0).choice(len(ref), size=min(KID_MAX_REFERENCE, len(ref)),
                                                       replace=False))
    stats = ReferenceStatistics(ref, ref_labels)
    calls = {
        "first_s": lambda: stats.of(device=device).root,
        "fid_s": lambda: fid_to_reference(gen, stats, device=device),
        "precision_recall_s": lambda: improved_precision_recall(ref, gen, k=5, device=device),
        "kid_s": lambda: kid_from_features(gen, ref[kid_rows], gen_labels=gen_labels,
                                           ref_labels=ref_labels[kid_rows], device=device),
        "prd_s": lambda: prd_f_scores(gen, ref, num_clusters=spec["clusters"], num_runs=spec["runs"],
                                      n_init=spec["n_init"], device=device),
    }
    memory = PeakMemory(device)
    memory.start()
    timed: dict[str, float] = {}
    values: dict[str, Any] = {}
    for key, call in calls.items():
        timed[key], timed[key[:-2] + "_cpu_s"] = time_call(
            lambda c=call, k=key: values.__setitem__(k, c()), device)
        _log(f"[metrics]   {key[:-2]}: {timed[key]:.3g} s")
    precision, recall = values["precision_recall_s"]
    f_8, f_1_8 = values["prd_s"]
    return {"metric": "metrics", "n_gen": n, "n_ref": 5 * n, "n_kid_ref": len(kid_rows), "dim": dim,
            "device": device, "num_clusters": spec["clusters"], "num_runs": spec["runs"], "n_init": spec["n_init"],
            **timed, "total_s": sum(timed[k] for k in ("fid_s", "precision_recall_s", "kid_s", "prd_s")),
            "fid": values["fid_s"], "precision": precision, "recall": recall, "kid": values["kid_s"],
            "f_8": f_8, "f_1_8": f_1_8, **memory.stop()}


def quality_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Time-to-quality of the default preset's variants and the samplers on their last networks
    (``pipelines.quality``; pictures into ``spec["out"]``)."""
    from pathlib import Path as _Path

    from pdcbdm.config import apply_overrides, preset
    from pipelines.quality import VARIANTS as QUALITY_VARIANTS
    from pipelines.quality import parse_sampler, run_quality

    base = preset("digits")
    if spec["steps"]:
        base = apply_overrides(base, {"train.steps": spec["steps"]})
    cfgs = {v: apply_overrides(base, QUALITY_VARIANTS[v]) for v in spec["variants"]}
    return run_quality(cfgs, [parse_sampler(x) for x in spec["samplers"]], _Path(spec["out"]),
                       every=spec["every"], samples=spec["samples"])


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "train": train_job, "sampling": sampling_job, "features": features_job,
    "precision_recall": precision_recall_job, "prd": prd_job, "fid": fid_job, "metrics": metrics_job,
    "quality": quality_job,
}


# ---------------------------------------------------------------------------------------------------------------
# running jobs in fresh processes
# ---------------------------------------------------------------------------------------------------------------
def _job_entry(kind: str, spec: dict[str, Any], conn: Any) -> None:
    """Body of a job process: set the thread count, run the job, send ("ok", result) or ("error", text).

    A thread count limits torch and, through threadpoolctl, numpy's BLAS and scikit-learn's OpenMP pools too (PRD's
    k-means would otherwise use every core)."""
    try:
        import torch
        from threadpoolctl import threadpool_limits

        wall, cpu = time.perf_counter(), time.process_time()
        limits: Any = contextlib.nullcontext()
        if spec.get("threads", 0) > 0:
            torch.set_num_threads(spec["threads"])
            limits = threadpool_limits(limits=spec["threads"])
        with limits:
            result = JOBS[kind](spec)
        result.update(threads=torch.get_num_threads(), job_wall_s=time.perf_counter() - wall,
                      job_cpu_s=time.process_time() - cpu)
        conn.send(("ok", result))
    except BaseException as err:  # reported to the parent, which records it and goes on
        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"))
    finally:
        conn.close()


class JobRunner:
    """Runs each job in a new process forked from a forkserver that preloaded torch and pdcbdm.

    Args:
        timeout: seconds a job may run before it is terminated and recorded as an error.
    """

    def __init__(self, timeout: float) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
        self.timeout = timeout

    def run(self, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The job's result dict, or ``{"error": message, **spec}`` when it failed, died or timed out."""
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_job_entry, args=(kind, spec, send), daemon=True)
        proc.start()
        send.close()
        try:
            if recv.poll(self.timeout):
                status, payload = recv.recv()
            else:
                status, payload = "error", f"timed out after {self.timeout:g} s"
        except EOFError:
            status, payload = "error", "the job process died without a result (out of memory?)"
        proc.join(5)
        if proc.is_alive():
            proc.terminate()
            proc.join()
        if status == "ok":
            return payload
        return {**{k: v for k, v in spec.items() if k not in ("device", "threads")}, "error": payload}


# ---------------------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _base_spec(s: BenchSettings) -> dict[str, Any]:
    return {"device": s.device, "threads": s.threads}


def train_plan(s: BenchSettings) -> list[dict[str, Any]]:
    """One job spec per (preset, batch, precision, variant) not in ``s.skip``, ``ddpm+cfg`` fp32 first."""
    plan = []
    for preset in s.presets:
        batches = s.small_batches if preset == "small" else s.cifar_batches
        for batch in batches:
            for precision in s.precisions:
                for variant in s.variants:
                    if f"{preset}/{precision}/{variant}" not in s.skip:
                        plan.append({**_base_spec(s), "preset": preset, "batch": batch, "precision": precision,
                                     "variant": variant, "steps": s.steps, "warmup": s.warmup})
    return plan


def _find(rows: list[dict[str, Any]], preset: str, batch: int, variant: str, precision: str) -> dict[str, Any] | None:
    """The measured row of one training configuration, or None (absent or failed)."""
    for row in rows:
        if (row.get("preset"), row.get("batch"), row.get("variant"), row.get("precision")) == \
                (preset, batch, variant, precision) and "step_s" in row:
            return row
    return None


def add_relative_costs(rows: list[dict[str, Any]]) -> None:
    """Add ``relative_cost`` (step time / ddpm+cfg fp32 step time at the same preset and batch) and
    ``cost_per_work`` (relative cost / network work ratio: 1.0 means the variant costs exactly its extra passes),
    from wall time, and the same two from CPU time (``*_cpu``: robust to other processes' load)."""
    for row in rows:
        base = _find(rows, row.get("preset"), row.get("batch"), "ddpm+cfg", "fp32")
        if "step_s" in row and base is not None:
            row["relative_cost"] = row["step_s"] / base["step_s"]
            row["cost_per_work"] = row["relative_cost"] / row["work_ratio"]
            row["relative_cost_cpu"] = row["step_cpu_s"] / base["step_cpu_s"]
            row["cost_per_work_cpu"] = row["relative_cost_cpu"] / row["work_ratio"]


# variant -> the variant without that component (same precision, preset and batch)
TSA_TWINS = {"+tsa": "ddpm+cfg", "cbdm+tsa": "+cbdm", "all": "cbdm+pd"}
PD_TWINS = {"+pd": "ddpm+cfg", "cbdm+pd": "+cbdm", "all": "cbdm+tsa"}
CBDM_TWINS = {"+cbdm": "ddpm+cfg"}


def _ratio_check(row: dict[str, Any], twin: dict[str, Any], base: dict[str, Any], check: str, *,
                 extra_work: float | None) -> dict[str, Any]:
    """A check comparing ``row`` with its ``twin`` (the same without one component), from wall and CPU times.

    With ``extra_work`` None: the overhead step(row) / step(twin) - 1. Otherwise the component's cost per unit of
    the network work it adds: (step(row) - step(twin)) / (step(base) * extra_work), base being ddpm+cfg.
    """
    values = []
    for key in ("step_s", "step_cpu_s"):
        if extra_work is None:
            values.append(row[key] / twin[key] - 1.0)
        else:
            values.append((row[key] - twin[key]) / (base[key] * extra_work))
    return {"preset": row["preset"], "batch": row["batch"], "variant": row["variant"],
            "precision": row["precision"], "check": check, "value": values[0], "value_cpu": values[1]}


def _row_checks(row: dict[str, Any], rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The checks one training row contributes: {preset, batch, variant, precision, check, value, value_cpu}
    (value from wall time, value_cpu from CPU time; twins and ddpm+cfg taken at the row's own precision)."""
    find = lambda variant, precision=row["precision"]: _find(  # noqa: E731
        rows, row["preset"], row["batch"], variant, precision)
    base, out, batch = find("ddpm+cfg"), [], row["batch"]
    if (twin := find(TSA_TWINS.get(row["variant"], ""))) is not None:
        out.append(_ratio_check(row, twin, base, f"TSA overhead vs {twin['variant']} (target <= 0.10)",
                                extra_work=None))
    if (twin := find(PD_TWINS.get(row["variant"], ""))) is not None and base is not None:
        pd_work = (row["network_images_per_step"] - twin["network_images_per_step"]) / batch
        out.append(_ratio_check(row, twin, base, f"PD cost / its extra passes vs {twin['variant']} (target <= 1)",
                                extra_work=pd_work))
    if (twin := find(CBDM_TWINS.get(row["variant"], ""))) is not None and base is not None:
        out.append(_ratio_check(row, twin, base, "CBDM cost / its extra pass (target <= 1)", extra_work=1.0))
    key = {k: row[k] for k in ("preset", "batch", "variant", "precision")}
    if row["precision"] == "bf16" and (twin := find(row["variant"], "fp32")) is not None:
        out.append({**key, "check": "bf16 speed-up over fp32", "value": twin["step_s"] / row["step_s"],
                    "value_cpu": twin["step_cpu_s"] / row["step_cpu_s"]})
    if device == "cpu" and row["preset"] == "cifar" and row["variant"] in ("ddpm+cfg", "+cbdm"):
        ref = REFERENCE_CPU[row["variant"]]
        out.append({**key, "check": f"images/s / reference's {ref} (fp32, batch {REFERENCE_CPU['batch']}; "
                    "target fp32 >= 1, bf16 >= 1.8)", "value": row["images_per_s"] / ref, "value_cpu": None})
    return out


def train_checks(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The issues' targets as measured ratios: TSA overhead, CBDM/PD cost per unit of extra network work, bf16
    speed-up and, on the CPU for the cifar preset, throughput over the reference implementation's (issue 3; that
    figure was measured on the 2-core AMD EPYC machine and compares only there)."""
    return [check for row in rows if "step_s" in row for check in _row_checks(row, rows, device)]


def run_train_section(runner: JobRunner, s: BenchSettings) -> dict[str, Any]:
    """Run every training job; returns rows, parameter counts per preset and the target checks."""
    plan = train_plan(s)
    rows = []
    for i, spec in enumerate(plan, 1):
        _log(f"[train {i}/{len(plan)}] {spec['preset']} batch {spec['batch']} {spec['precision']} {spec['variant']}")
        rows.append(runner.run("train", spec))
    add_relative_costs(rows)
    params: dict[str, dict[str, int]] = {}
    for row in rows:
        if "params" in row:
            params.setdefault(row["preset"], {})["with_tsa" if row["tsa_resolutions"] else "without_tsa"] = \
                row["params"]
    return {"rows": rows, "params": params, "num_classes": NUM_CLASSES, "checks": train_checks(rows, s.device)}


def run_sampling_section(runner: JobRunner, s: BenchSettings) -> dict[str, Any]:
    """The sampling job on the small preset."""
    _log(f"[sampling] small batch {s.sample_batch}, DDIM {list(s.ddim_steps)}, DDPM probe {s.ddpm_probe_steps}")
    spec = {**_base_spec(s), "preset": "small", "batch": s.sample_batch, "guidance": s.guidance,
            "ddim_steps": list(s.ddim_steps), "ddpm_probe_steps": s.ddpm_probe_steps, "repeats": s.sample_repeats}
    return runner.run("sampling", spec)


def run_quality_section(runner: JobRunner, s: BenchSettings) -> dict[str, Any]:
    """The opt-in quality job: time-to-quality curves and the sampler comparison (``pipelines.quality``)."""
    _log(f"[quality] digits preset, {', '.join(s.quality_variants)}; samplers {', '.join(s.quality_samplers)}")
    spec = {**_base_spec(s), "variants": list(s.quality_variants), "steps": s.quality_steps,
            "every": s.quality_every, "samples": s.quality_samples, "samplers": list(s.quality_samplers),
            "out": s.quality_out}
    return runner.run("quality", spec)


def run_metrics_section(runner: JobRunner, s: BenchSettings) -> dict[str, Any]:
    """Extractor throughput, then precision/recall and PRD at metric_n x metric_n, FID at metric_n x 5 metric_n,
    and every metric of one evaluation at metric_n x 5 metric_n (``metrics_job``)."""
    features = []
    for kind in s.extractors:
        _log(f"[metrics] features/s of {kind}")
        images = s.feature_images if kind == "digits" else s.inception_images
        features.append(runner.run("features", {**_base_spec(s), "extractor": kind, "images": images,
                                                "batch": min(250 if kind == "digits" else 50, images)}))
    n, dim = s.metric_n, s.feature_dim
    _log(f"[metrics] precision/recall at {n} x {n}")
    pr = runner.run("precision_recall", {**_base_spec(s), "n": n, "dim": dim})
    _log(f"[metrics] PRD at {n} x {n}")
    prd = runner.run("prd", {**_base_spec(s), "n": n, "dim": dim, "clusters": s.prd_clusters, "runs": s.prd_runs,
                             "n_init": s.prd_n_init})
    _log(f"[metrics] FID at {n} x {5 * n}")
    fid = runner.run("fid", {**_base_spec(s), "n": n, "dim": dim})
    _log(f"[metrics] every metric of one evaluation at {n} x {5 * n} on {s.device}")
    suite = runner.run("metrics", {**_base_spec(s), "n": n, "dim": dim, "clusters": s.prd_clusters,
                                   "runs": s.prd_runs, "n_init": s.prd_n_init})
    return {"features": features, "precision_recall": pr, "prd": prd, "fid": fid, "metrics": suite}


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: a title line, a header, a rule, one line per row (values formatted with 3 digits)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.rjust(w) if i else v.ljust(w)  # noqa: E731
                                    for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([title, line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _error_cell(row: dict[str, Any]) -> str:
    return "error: " + str(row["error"]).splitlines()[0][:80]


def train_tables(section: dict[str, Any]) -> list[str]:
    """The training table, the parameter counts and the checks."""
    headers = ["preset", "batch", "prec", "variant", "step s", "cpu s", "images/s", "rel cost", "rel cpu",
               "cost/work", "growth MB"]
    rows = []
    for r in section["rows"]:
        head = [r.get("preset"), r.get("batch"), r.get("precision"), r.get("variant")]
        if "error" in r:
            rows.append(head + [_error_cell(r), "", "", "", "", "", ""])
        else:
            rows.append(head + [r["step_s"], r["step_cpu_s"], r["images_per_s"], r.get("relative_cost"),
                                r.get("relative_cost_cpu"), r.get("cost_per_work"), r.get("growth_mb")])
    params = [[p, c.get("without_tsa"), c.get("with_tsa")] for p, c in section["params"].items()]
    checks = [[c["preset"], c["batch"], c["precision"], c["variant"], c["check"], c["value"], c["value_cpu"]]
              for c in section["checks"]]
    title = ("Training step (median; rel cost/cpu: wall/CPU time over ddpm+cfg fp32's; cost/work: rel cost / "
             "network work)")
    return [format_table(title, headers, rows),
            format_table(f"Parameters ({section['num_classes']} classes)", ["preset", "without TSA", "with TSA"],
                         params),
            format_table("Targets (measured ratios, from wall and from CPU time)",
                         ["preset", "batch", "prec", "variant", "check", "wall", "cpu"], checks)]


def sampling_tables(section: dict[str, Any]) -> list[str]:
    """The sampling table (or the job's error)."""
    if "error" in section:
        return [f"Sampling: {_error_cell(section)}"]
    rows = [[r["what"], r["seconds"], r.get("cpu_s"), r.get("seconds_per_step"), r["images_per_s"]]
            for r in section["rows"]]
    title = (f"Sampling ({section['preset']} preset with TSA, batch {section['batch']}, "
             f"guidance w={section['guidance']:g}, fp32)")
    return [format_table(title, ["what", "seconds", "cpu s", "s/step", "images/s"], rows)]


def quality_tables(section: dict[str, Any]) -> list[str]:
    """The sampler comparison and the time-to-quality lines (or the job's error)."""
    if "error" in section:
        return [f"Quality: {_error_cell(section)}"]
    from pipelines.quality import reached_lines, sampler_table

    return ["Samplers on the last network of each variant (score (real-vs-real floor at the same N))\n"
            + sampler_table(section["samplers"]), "Time to quality\n" + "\n".join(reached_lines(section))]


def metrics_tables(section: dict[str, Any]) -> list[str]:
    """One table: extractor throughput, precision/recall and PRD (errors and skips on their own rows)."""
    rows = []
    for f in section["features"]:
        what = f"features: {f.get('extractor')}"
        if "error" in f or "skipped" in f:
            rows.append([what, _error_cell(f) if "error" in f else "skipped: " + f["skipped"][:80], "", "", "", ""])
        else:
            rows.append([what + f" ({f['images']} images {f['image_shape']})", f["seconds"], f["cpu_s"],
                         f["features_per_s"], f.get("growth_mb"), str(f.get("note"))[:60]])
    for key in ("precision_recall", "prd"):
        m = section[key]
        if "error" in m:
            rows.append([key, _error_cell(m), "", "", "", ""])
        else:
            extra = f"P={m['precision']:.3f} R={m['recall']:.3f}" if key == "precision_recall" else \
                f"F_8={m['f_8']:.3f} F_1/8={m['f_1_8']:.3f} ({m['num_clusters']} clusters, {m['num_runs']} runs)"
            rows.append([f"{key} {m['n_gen']} x {m['n_ref']} x {m['dim']}-d", m["seconds"], m["cpu_s"], "",
                         m.get("growth_mb"), extra])
    fid = section.get("fid") or {}
    if "error" in fid:
        rows.append(["fid", _error_cell(fid), "", "", "", ""])
    elif fid:
        rows.append([f"fid {fid['n_gen']} x {fid['n_ref']} x {fid['dim']}-d, per evaluation", fid["cached_s"], "", "",
                     "", f"reference kept (first {fid['first_s']:.3g} s); from scratch {fid['uncached_s']:.3g} s, "
                         f"with scipy sqrtm {fid['sqrtm_s']:.3g} s"])
    return [format_table("Metrics", ["what", "seconds", "cpu s", "features/s", "growth MB", "note"], rows),
            *suite_tables(section.get("metrics"))]


def suite_tables(suite: dict[str, Any] | None) -> list[str]:
    """The per-metric times of one evaluation (``metrics_job``), or its error; nothing when it did not run."""
    if not suite:
        return []
    if "error" in suite:
        return [f"Metrics of one evaluation: {_error_cell(suite)}"]
    rows = [["reference statistics (once)", suite["first_s"], suite["first_cpu_s"], "mean, covariance, root"],
            ["FID", suite["fid_s"], suite["fid_cpu_s"], f"{suite['fid']:.4g}"],
            ["precision/recall (k = 5)", suite["precision_recall_s"], suite["precision_recall_cpu_s"],
             f"P={suite['precision']:.3f} R={suite['recall']:.3f}"],
            ["KID", suite["kid_s"], suite["kid_cpu_s"], f"{suite['kid']:.4g} against {suite['n_kid_ref']:,}"],
            ["PRD", suite["prd_s"], suite["prd_cpu_s"], f"F_8={suite['f_8']:.3f} F_1/8={suite['f_1_8']:.3f} "
             f"({suite['num_clusters']} clusters, {suite['num_runs']} runs, n_init {suite['n_init']})"],
            ["total per evaluation", suite["total_s"], None, "FID + P/R + KID + PRD"]]
    peak = suite.get("peak_mb")
    title = (f"Metrics of one evaluation: {suite['n_gen']:,} x {suite['n_ref']:,} x {suite['dim']}-d on "
             f"{suite['device']}" + ("" if peak is None else f" (peak {peak:,.0f} MB)"))
    return [format_table(title, ["metric", "seconds", "cpu s", "value"], rows)]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return set()


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """CPU model, cores, memory, load, torch version, device name and threads of this machine."""
    import torch

    flags = _cpu_flags()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_bf16": sorted(f for f in flags if "bf16" in f or f == "amx_tile"),
        "memory_total_mb": _proc_status_mb("MemTotal", "/proc/meminfo"), "load_average_start": list(os.getloadavg()),
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "device": device, "threads": threads or torch.get_num_threads(),
    }
    info["device_name"] = torch.cuda.get_device_name(device) if device.startswith("cuda") else info["cpu_model"]
    if device.startswith("cuda"):
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def _csv(kind: Callable[[str], Any], valid: Sequence[Any] | None = None) -> Callable[[str], tuple[Any, ...]]:
    """argparse type: a comma-separated list of ``kind`` values, each in ``valid`` when given."""
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
        bad = [v for v in values if valid is not None and v not in valid]
        if bad or not values:
            choices = ", ".join(map(str, valid or []))
            raise argparse.ArgumentTypeError(f"invalid value(s) {bad or text!r}; choose from {choices}")
        return values
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every option explains itself in --help. Unset sizes take the --quick or full
    defaults (shown as quick/full)."""
    p = argparse.ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a run of about two minutes on 2 idle cores")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--threads", type=int, default=0, help="threads per job for torch, BLAS and scikit-learn (0: "
                   "their defaults); on a machine shared with other jobs use 1: two OpenMP threads competing with "
                   "other processes ran some steps tens of times slower there")
    p.add_argument("--out", default="bench.json", help="JSON file written atomically (default bench.json)")
    p.add_argument("--sections", type=_csv(str, SECTIONS + OPT_IN_SECTIONS), default=SECTIONS,
                   help="comma-separated subset of train,sampling,metrics,quality (default train,sampling,metrics; "
                        "quality, tens of minutes, trains the digits preset's variants and runs only when named)")
    p.add_argument("--quality-variants", type=_csv(str, ("ddpm", "cbdm", "pd-cbdm")), default=("ddpm", "pd-cbdm"),
                   help="quality section: variants trained (ddpm,pd-cbdm)")
    p.add_argument("--quality-steps", type=_positive, default=None,
                   help="quality section: training steps (default: the digits preset's)")
    p.add_argument("--quality-every", type=_positive, default=None,
                   help="quality section: steps between curve points (default: train.eval_every)")
    p.add_argument("--quality-samples", type=_positive, default=None,
                   help="quality section: samples per score (default: eval.num_samples)")
    p.add_argument("--quality-samplers", type=_csv(str), default=("ddim:20:1", "ddim:20:0", "ddim:50:1", "ddpm:1000"),
                   help="quality section: samplers compared, ddim:STEPS:ETA or ddpm:T")
    p.add_argument("--quality-out", default="runs/bench-quality", help="quality section: folder for its pictures")
    p.add_argument("--presets", type=_csv(str, PRESETS), default=PRESETS, help="training presets (small,cifar)")
    p.add_argument("--variants", type=_csv(str, tuple(VARIANTS)), default=None,
                   help=f"training variants, from {','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--precisions", type=_csv(str, PRECISIONS), default=None, help="fp32,bf16 (default both)")
    p.add_argument("--small-batch", type=_csv(_positive), default=None, help="training batch(es) of the small "
                   "preset, comma-separated (64 / 16,64; 16 is the smoke config's batch)")
    p.add_argument("--cifar-batch", type=_csv(_positive), default=None, help="training batch(es) of the cifar "
                   "preset, comma-separated (8 / 8,32)")
    p.add_argument("--steps", type=_positive, default=None, help="timed training steps per job; the median is "
                   "reported (2 / 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps first (1 / 2)")
    p.add_argument("--sample-batch", type=_positive, default=64, help="sampling batch (64)")
    p.add_argument("--ddim-steps", type=_csv(_positive), default=None, help="DDIM step counts timed (10 / 10,50)")
    p.add_argument("--ddpm-probe-steps", type=_positive, default=None, help="DDPM steps actually run to time one "
                   "step, extrapolated to T=1000 (5 / 20)")
    p.add_argument("--sample-repeats", type=_positive, default=None, help="full sampler runs timed, median (1 / 3)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance strength w while sampling (1.0)")
    p.add_argument("--metric-n", type=_positive, default=None, help="features per set for precision/recall and PRD "
                   "(2000 / 10000)")
    p.add_argument("--feature-dim", type=_positive, default=2048, help="feature dimension (2048, Inception's)")
    p.add_argument("--prd-clusters", type=_positive, default=200,
                   help="PRD k-means clusters (200 = 20 x 10 classes; at most --metric-n / 10)")
    p.add_argument("--prd-runs", type=_positive, default=None, help="PRD clusterings averaged (2 / 10, paper: 10)")
    p.add_argument("--prd-n-init", type=_positive, default=None, help="k-means initialisations per PRD run "
                   "(2 / 10, Sajjadi et al.: 10)")
    p.add_argument("--feature-images", type=_positive, default=None, help="images for the digits CNN (2000 / 10000)")
    p.add_argument("--inception-images", type=_positive, default=None, help="images for Inception (16 / 200)")
    p.add_argument("--extractors", type=_csv(str, ("digits", "inception")), default=("digits", "inception"),
                   help="feature networks timed (digits,inception; Inception is skipped when no weights are on disk)")
    p.add_argument("--full-grid", action="store_true", help="with --quick, also run the cifar variants --quick "
                   "leaves out (+cbdm, +pd in both precisions, +tsa in bf16); they are implied by --variants or "
                   "--precisions")
    p.add_argument("--job-timeout", type=float, default=3600.0, help="seconds before a job is stopped (3600)")
    p.add_argument("--data-images", type=_positive, default=100_000, help="data section: images (100000)")
    p.add_argument("--data-size", type=int, choices=(32, 64, 128), default=64, help="data section: side (64)")
    p.add_argument("--data-workers", type=_positive, default=4, help="data section: concurrent workers (4)")
    p.add_argument("--data-dir", default=None, help="data section: folder of the prepared set, kept and reused "
                   "(default: a temporary folder, removed)")
    p.add_argument("--data-no-decode", action="store_true", help="data section: skip timing the PNG decode that "
                   "the memory-mapped array replaces")
    return p


def _pick(value: Any, quick: bool, quick_default: Any, full_default: Any) -> Any:
    return value if value is not None else (quick_default if quick else full_default)


def resolve_device(spec: str) -> str:
    """``auto`` -> "cuda" when available, else "cpu"; other values are checked (ValueError names the value)."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {spec!r}")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {spec!r} was asked for but CUDA is not available")
    return spec


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Resolve the command line into BenchSettings (quick/full defaults for unset sizes)."""
    q = args.quick
    warmup, metric_n = _pick(args.warmup, q, 1, 2), _pick(args.metric_n, q, 2000, 10000)
    for flag, value, ok in [("--threads", args.threads, args.threads >= 0), ("--warmup", warmup, warmup >= 0),
                            ("--guidance", args.guidance, args.guidance >= 0),
                            ("--job-timeout", args.job_timeout, args.job_timeout > 0),
                            ("--metric-n", metric_n, metric_n > 5),
                            ("--prd-clusters", args.prd_clusters, args.prd_clusters <= metric_n // 10)]:
        if not ok:
            raise ValueError(f"{flag} got {value}: must be >= 0 (--threads, --warmup, --guidance), > 0 "
                             "(--job-timeout), > 5 = k (--metric-n), <= --metric-n / 10 (--prd-clusters)")
    explicit_grid = args.variants is not None or args.precisions is not None
    return BenchSettings(
        quick=q, device=resolve_device(args.device), threads=args.threads, sections=tuple(args.sections),
        presets=tuple(args.presets), variants=tuple(args.variants or DEFAULT_VARIANTS),
        precisions=tuple(args.precisions or PRECISIONS),
        small_batches=tuple(_pick(args.small_batch, q, (64,), (16, 64))),
        cifar_batches=tuple(_pick(args.cifar_batch, q, (8,), (8, 32))),
        steps=_pick(args.steps, q, 2, 10), warmup=warmup, sample_batch=args.sample_batch,
        ddim_steps=tuple(_pick(args.ddim_steps, q, (10,), (10, 50))),
        ddpm_probe_steps=_pick(args.ddpm_probe_steps, q, 5, 20), sample_repeats=_pick(args.sample_repeats, q, 1, 3),
        guidance=args.guidance, metric_n=metric_n, feature_dim=args.feature_dim,
        prd_clusters=args.prd_clusters, prd_runs=_pick(args.prd_runs, q, 2, 10),
        prd_n_init=_pick(args.prd_n_init, q, 2, 10), feature_images=_pick(args.feature_images, q, 2000, 10000),
        inception_images=_pick(args.inception_images, q, 16, 200), extractors=tuple(args.extractors),
        job_timeout=args.job_timeout, skip=QUICK_SKIP if q and not (explicit_grid or args.full_grid) else (),
        quality_variants=tuple(args.quality_variants), quality_steps=args.quality_steps,
        quality_every=args.quality_every, quality_samples=args.quality_samples,
        quality_samplers=tuple(args.quality_samplers), quality_out=args.quality_out,
        data_images=args.data_images, data_size=args.data_size, data_workers=args.data_workers,
        data_dir=args.data_dir, data_decode=not args.data_no_decode,
    )


def run_benchmark(s: BenchSettings) -> dict[str, Any]:
    """Run the selected sections and return the report (``machine``, ``settings``, one key per section)."""
    started = time.perf_counter()
    report: dict[str, Any] = {"schema": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine_info(s.device, s.threads), "settings": s.to_dict()}
    runner = JobRunner(s.job_timeout)
    from pipelines.bench_data import run_data_section

    sections = {"train": run_train_section, "sampling": run_sampling_section, "metrics": run_metrics_section,
                "quality": run_quality_section, "data": run_data_section}
    for name in (*SECTIONS, *OPT_IN_SECTIONS):
        if name in s.sections:
            report[name] = sections[name](runner, s)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["wall_s"] = time.perf_counter() - started
    report["jobs_cpu_s"] = sum(job.get("job_cpu_s", 0.0) for job in _jobs(report))
    return report


def print_report(report: dict[str, Any]) -> None:
    """Print one table per section run, and the machine line."""
    m = report["machine"]
    print(f"{m['device_name']} | {m['usable_cpus']} CPUs | torch {m['torch']} | threads {m['threads']} | "
          f"load {m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f} | {report['wall_s']:.0f} s wall, "
          f"{report['jobs_cpu_s']:.0f} s CPU in jobs")
    from pipelines.bench_data import data_tables

    tables = {"train": train_tables, "sampling": sampling_tables, "metrics": metrics_tables,
              "quality": quality_tables, "data": data_tables}
    for name, make in tables.items():
        if name in report:
            for table in make(report[name]):
                print()
                print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (None: sys.argv[1:]); returns 0, or 1 when a job failed."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    from pdcbdm.config import write_json_atomic

    report = run_benchmark(settings)
    write_json_atomic(args.out, report)
    print_report(report)
    print(f"\nwrote {Path(args.out).resolve()}")
    return 1 if any("error" in job for job in _jobs(report)) else 0


def _jobs(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every job result of a report (training rows, the sampling job, the metric jobs)."""
    found = list(report.get("train", {}).get("rows", []))
    found += [report["sampling"]] if "sampling" in report else []
    metrics = report.get("metrics", {})
    found += list(metrics.get("features", [])) + [metrics[k] for k in ("precision_recall", "prd", "metrics")
                                                  if k in metrics]
    found += [report["quality"]] if "quality" in report else []
    return found


if __name__ == "__main__":
    sys.exit(main())
