"""The benchmark's grid (sections, networks, variants, precisions) and ``BenchSettings``, every resolved option
of one run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SECTIONS = ("train", "sampling", "metrics")
OPT_IN_SECTIONS = ("quality", "data")  # minutes, gigabytes of disk: run only when named in --sections
NETWORKS = ("small", "cifar")  # model.network values (pdcbdm.models.NETWORKS) the train section times
PRECISIONS = ("fp32", "bf16")
# name -> (cbdm_tau, pd_weight, use TSA at the network's resolution)
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
NETWORK_SHAPES = {"small": (1, 16, 16), "cifar": (3, 32, 32)}
NETWORK_TSA = {"small": "8", "cifar": "16"}
NUM_CLASSES = 10
# Images/s of the CBDM reference U-Net, measured on this project's 2-core AMD EPYC (avx512_bf16) machine at the
# cifar config, batch 32, fp32, 2 threads; only comparable on that machine.
REFERENCE_CPU = {"batch": 32, "ddpm+cfg": 4.7, "+cbdm": 2.4}
# --quick keeps to about two minutes by timing CBDM's and PD's costs on the small network only, and bf16 on the
# cifar network only for ddpm+cfg and all (--full-grid runs them all).
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
        presets, variants, precisions: the training grid (``presets``: networks, ``model.network``; the name is
            the --presets flag's and the JSON's).
        small_batches, cifar_batches: training batch sizes of each network (small at 16 is the ``smoke`` config's).
        steps, warmup: timed and untimed iterations per training job.
        sample_batch, ddim_steps, ddpm_probe_steps, sample_repeats, guidance: the sampling section.
        metric_n, feature_dim, prd_clusters, prd_runs, prd_n_init: precision/recall and PRD sizes.
        feature_images, inception_images, extractors: the feature-extractor throughput jobs.
        job_timeout: seconds after which a job is stopped and recorded as an error.
        skip: training jobs left out, as "network/precision/variant" (see QUICK_SKIP).
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
