"""Performance benchmark of PD-CBDM: training throughput and memory, component costs, samplers and metrics.

    python -m pipelines.benchmark --quick                      # under two minutes on 2 idle CPU cores
    python -m pipelines.benchmark                              # full: about 30 to 40 minutes on 2 CPU cores
    python -m pipelines.benchmark --device cuda --out bench-gpu.json
    python -m pipelines.benchmark --sections train --cifar-batch 8 --small-batch 16 --steps 10 --precisions fp32 \
        --variants ddpm+cfg,+cbdm,cbdm+tsa,cbdm+pd,all        # the grid over CBDM: smoke's and cifar's steps

Sections (``--sections``, default all three):
  train     the real ``Trainer.advance`` (loss, backward, gradient clipping, Adam, EMA) on synthetic long-tailed
            data of each network's shape, for each variant -- ``ddpm+cfg`` (L_DM only, Eq. 8), ``+cbdm`` (adds
            L_DA's second label pass, Eq. 9), ``+pd`` (adds the head/tail pairs, Eq. 10-11), ``+tsa`` (TSA at the
            network's resolution, Eq. 13-14) and ``all`` (PD-CBDM) -- in fp32 and bf16 autocast (``cbdm+pd`` and
            ``cbdm+tsa`` on request). Networks and batches: small at 64 (and 16, the ``smoke`` config's batch, in
            the full run), cifar at 8 (and 32 in the full run). Reports the median step time, images/s
            (main-batch images), the peak memory, the cost relative to ``ddpm+cfg`` fp32, that cost divided by
            the extra network work (images through the network per step / batch), and the issues' targets as
            ratios. ``--quick`` leaves out cifar's +cbdm and +pd (both precisions) and +tsa in bf16: their costs
            come from the small network there (``--full-grid`` keeps them).
  sampling  the small network at batch 64: one guided forward with cond+uncond batched (``guided_eps``) against
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
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pdcbdm.io import write_json_atomic
from pipelines.bench_data import run_data_section
from pipelines.benchmark.metrics import run_metrics_section
from pipelines.benchmark.quality import run_quality_section
from pipelines.benchmark.report import _jobs, machine_info, print_report
from pipelines.benchmark.runner import JobRunner
from pipelines.benchmark.sampling import run_sampling_section
from pipelines.benchmark.settings import (DEFAULT_VARIANTS, NETWORKS, OPT_IN_SECTIONS, PRECISIONS, QUICK_SKIP,
                                          SECTIONS, VARIANTS, BenchSettings)
from pipelines.benchmark.train import run_train_section


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
    p.add_argument("--presets", type=_csv(str, NETWORKS), default=NETWORKS,
                   help="networks trained (model.network: small,cifar; not a --preset of the other commands)")
    p.add_argument("--variants", type=_csv(str, tuple(VARIANTS)), default=None,
                   help=f"training variants, from {','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--precisions", type=_csv(str, PRECISIONS), default=None, help="fp32,bf16 (default both)")
    p.add_argument("--small-batch", type=_csv(_positive), default=None, help="training batch(es) of the small "
                   "network, comma-separated (64 / 16,64; 16 is the smoke config's batch)")
    p.add_argument("--cifar-batch", type=_csv(_positive), default=None, help="training batch(es) of the cifar "
                   "network, comma-separated (8 / 8,32)")
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
    import torch  # deferred: torch (1.7 s); --help and the checks of bad input answer without it

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
    sections = {"train": run_train_section, "sampling": run_sampling_section, "metrics": run_metrics_section,
                "quality": run_quality_section, "data": run_data_section}
    for name in (*SECTIONS, *OPT_IN_SECTIONS):
        if name in s.sections:
            report[name] = sections[name](runner, s)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["wall_s"] = time.perf_counter() - started
    report["jobs_cpu_s"] = sum(job.get("job_cpu_s", 0.0) for job in _jobs(report))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (None: sys.argv[1:]); returns 0, or 1 when a job failed."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    report = run_benchmark(settings)
    write_json_atomic(args.out, report)
    print_report(report)
    print(f"\nwrote {Path(args.out).resolve()}")
    return 1 if any("error" in job for job in _jobs(report)) else 0
