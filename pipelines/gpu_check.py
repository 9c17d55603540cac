"""Is this machine ready to train and evaluate PD-CBDM? One command, no internet, PASS/FAIL/SKIP lines and a JSON.

    python -m pipelines.gpu_check                         # every GPU step in about 9 minutes (--minutes)
    python -m pipelines.gpu_check --device cpu --quick    # tiny sizes on the CPU, about a minute (the test suite)
    python -m pipelines.gpu_check --only train,options --steps 400 --out runs/gpu-check.json

Steps, in order (``--only`` picks some; each needs nothing from another, the data are written when first needed):
  env         torch, CUDA, cuDNN, NCCL, the GPUs, their dense bf16 peak, the driver, which optional packages import.
  data        fake CIFAR-10 files in torchvision's layout at the real size (50,000 + 10,000 images), read back as
              cifar10-lt (rho 100: 12,406 images) through the project's reader.
  train       the ``cifar10-lt`` preset's network and loss in its precision (bf16 on a GPU): ``Trainer.advance`` timed
              over ``--steps`` steps (about 200) with one synchronisation at the end: training img/s, peak memory,
              FLOPs per step (``FlopCounterMode``) and their share of the card's bf16 peak, host round trips per
              step (``HostSyncCounter``; on CUDA also the device's own count, ``set_sync_debug_mode``).
  options     ``train.gpu_options``: no option, each one and all together, each timed in short spans, in rounds
              of alternating order when time allows (one span is one measurement; the rounds give a spread), with
              each variant's loss over the spans beside no option's (same data and draws: bf16_groupnorm's cost).
  rng         per-rank RNG: two ranks simulated in one process keep their own seeded dropout stream through the
              Trainer's construction and share the batch draws.
  sample      DDIM-100 (the preset's sampler) and the paper's DDPM-1000 at the evaluation batch: seconds per image,
              and the sampling time of one guidance value's final evaluation (10k samples).
  pt2_graph   the network exported with ``torch.export`` on the CPU (the graph an MLflow pt2 model holds), moved to
              the device and run there: the graph must name no device.
  pt2_logged  (MLflow) a model logged by ``tune.mlflow_model.log_ema_model``, loaded as ``pipelines.evaluate``
              loads it, sampled on the device.
  metrics     every metric of one final evaluation at its real size (10k x 2048 features against 50k,
              ``pipelines.benchmark.metrics_job``) and the Inception features of the samples (torch-fidelity).
  search      (Ray, MLflow, Optuna) a 1-trial ``tune/search.py`` on the GPU, and a 2-worker nccl trial where two GPUs
              exist; on the CPU with ``--quick`` only with ``--search`` (it takes minutes).
  targets     the issue's targets, judged on an H100/H200 in bf16 without ``--quick``: training >= 2,000 img/s;
              one guidance value's paper-protocol evaluation (sampling, features, metrics) under 15 minutes.

Rules. A step whose packages do not import is SKIPped, saying which. A step that raises is a FAIL with its error,
and the next step runs. Each step gets a share of the time budget (``--minutes``) and scales its work down to fit
(fewer steps, a shorter schedule extrapolated to the full one: the JSON says when). The exit status is 0 when no
step FAILed, else 1. The JSON (``--out``, written atomically) has every step's figures; a summary of it is printed.
Optional packages (Ray, MLflow, Optuna, torch-fidelity) are imported only inside the steps that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pdcbdm.config import GPU_OPTIONS, Config, apply_overrides, preset
from pdcbdm.io import write_json_atomic

__all__ = ["STEPS", "build_parser", "main", "peak_bf16_tflops", "run_check"]

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "data", "train", "options", "rng", "sample", "pt2_graph", "pt2_logged", "metrics", "search",
         "targets")
# relative shares of the time budget; a step that ends early leaves its time to the steps after it
WEIGHTS = {"env": 1, "data": 5, "train": 14, "options": 22, "rng": 2, "sample": 14, "pt2_graph": 4,
           "pt2_logged": 4, "metrics": 10, "search": 24, "targets": 0}
# dense bf16 tensor-core peaks (vendor figures, no sparsity), TFLOP/s; the first name found in the card's wins
PEAK_BF16 = (("GH200", 989.0), ("H200", 989.0), ("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
             ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0))
TARGET_CARDS = ("H100", "H200")
TARGET_IMG_S = 2000.0
TARGET_FINAL_EVAL_S = 15 * 60.0
SEARCH_MIN_S = 150.0  # Ray's start, one short trial and its evaluation: below this the search cannot finish
PRESET = "cifar10-lt"
OPTIONAL = ("ray", "mlflow", "optuna", "torch_fidelity", "pynvml")


@dataclass(frozen=True)
class Sizes:
    """How much work each step does at most (the budget may cut it further)."""

    train_per_class: int
    test_per_class: int
    overrides: tuple[str, ...]
    warmup: int
    steps: int
    sync_steps: int
    flop_steps: int
    option_steps: tuple[int, int]  # (fewest, most) steps of one timed span
    option_rounds: int
    metric: dict[str, int]
    feature_images: int
    sampler_steps: int  # at most this many sampler steps are timed (then extrapolated to the full schedule)


FULL = Sizes(5000, 1000, (), warmup=10, steps=200, sync_steps=10, flop_steps=4, option_steps=(10, 60),
             option_rounds=3, metric={"n": 10_000, "dim": 2048, "clusters": 200, "runs": 10, "n_init": 10},
             feature_images=1000, sampler_steps=1000)
# the cifar net's layout at width 8 (its cost on a CPU is in the layers' count, not their width); long tail rho 10
# so that 100 images per class leave every class some
QUICK = Sizes(100, 10, ("model.ch=8", "train.batch_size=4", "data.imbalance=10", "eval.batch_size=4",
                        "sample.steps=3"),
              warmup=1, steps=2, sync_steps=1, flop_steps=1, option_steps=(1, 1), option_rounds=1,
              metric={"n": 500, "dim": 64, "clusters": 20, "runs": 1, "n_init": 1}, feature_images=2,
              sampler_steps=3)


class Budget:
    """The time budget: each step's share of what is left, by ``WEIGHTS``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return max(0.0, self.seconds - self.elapsed())

    def share(self, pending: Sequence[str]) -> float:
        """Seconds for ``pending[0]``: its weight's part of the time left among the steps still to run."""
        total = sum(WEIGHTS[name] for name in pending) or 1
        return self.left() * WEIGHTS[pending[0]] / total


@dataclass
class Check:
    """What the steps share: options, device, sizes, scratch folder, budget, and the facts earlier steps found."""

    args: argparse.Namespace
    device: torch.device
    sizes: Sizes
    work: Path
    budget: Budget
    facts: dict[str, Any] = field(default_factory=dict)
    share: float = 0.0
    step: str = ""

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def say(self, text: str) -> None:
        """A progress line of the running step."""
        print(f"  [{self.budget.elapsed():6.1f}s] {self.step}: {text}", flush=True)

    def cfg(self, *extra: str) -> Config:
        """The preset with the quick sizes, the fake data's folder, the CPU's precision and ``extra``."""
        items = [f"data.root={self.data_root()}", *self.sizes.overrides]
        if not self.cuda:  # bf16 autocast on a CPU is emulated or slower than fp32 there: time what a CPU runs
            items.append("train.precision=fp32")
        return apply_overrides(preset(PRESET), [*items, *extra])

    def data_root(self) -> Path:
        """The fake CIFAR-10 folder's parent, written on first use."""
        root = self.work / "cifar"
        if "data_written_s" not in self.facts:
            from pdcbdm.data.fake_cifar import write_fake_cifar10

            t0 = time.perf_counter()
            write_fake_cifar10(root, self.sizes.train_per_class, self.sizes.test_per_class, seed=0)
            self.facts["data_written_s"] = time.perf_counter() - t0
        return root

    def dataset(self) -> Any:
        """The preset's training set read from the fake files (cached)."""
        if "dataset" not in self.facts:
            from pdcbdm.train import load_data

            self.facts["dataset"] = load_data(self.cfg())
        return self.facts["dataset"]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def left_in_step(self, fraction: float = 1.0) -> float:
        """Seconds left of ``fraction`` of this step's share."""
        return fraction * self.share - (self.budget.elapsed() - self.facts["step_start"])


# ------------------------------------------------------------------------------------------------ results
def result(status: str, reason: str, **figures: Any) -> dict[str, Any]:
    """A step's result: ``status`` PASS, FAIL or SKIP, why, and its figures."""
    return {"status": status, "reason": reason, **figures}


def skip_for_packages(names: Sequence[str], why: str) -> dict[str, Any] | None:
    """A SKIP naming the packages of ``names`` that do not import here (None when all do)."""
    missing = missing_packages(names)
    if not missing:
        return None
    return result("SKIP", f"{', '.join(missing)} not installed ({why})", missing=missing)


def missing_packages(names: Sequence[str]) -> list[str]:
    """The packages of ``names`` that fail to import (not installed, or broken)."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an ImportError, or a broken install: either way the step cannot run
            missing.append(name)
    return missing


def timed(check: Check, fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), wall seconds) with the device's queued work finished at both ends."""
    check.sync()
    t0 = time.perf_counter()
    out = fn()
    check.sync()
    return out, time.perf_counter() - t0


def fit(count: int, per_unit_s: float, seconds: float, least: int = 1) -> int:
    """How many of ``count`` units of ``per_unit_s`` seconds fit in ``seconds`` (at least ``least``)."""
    if per_unit_s <= 0:
        return count
    return max(least, min(count, int(seconds / per_unit_s)))


def peak_bf16_tflops(name: str) -> float | None:
    """The card's dense bf16 peak (TFLOP/s) from its name; None for a card not in ``PEAK_BF16``."""
    upper = name.upper()
    return next((peak for key, peak in PEAK_BF16 if key in upper), None)


def free_memory(check: Check) -> None:
    """Give back what a finished step held (its trainers, networks, compiled graphs)."""
    gc.collect()
    if check.cuda:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- env
def step_env(check: Check) -> dict[str, Any]:
    """The software and the hardware; FAIL only when ``--device cuda`` finds no GPU (the steps after it SKIP)."""
    from pdcbdm.training import resolve_precision
    from pdcbdm.training.cuda import cuda_diagnosis

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpus": len(os.sched_getaffinity(0)), "driver": cuda_diagnosis(), "device": str(check.device),
        "packages": {name: importlib.util.find_spec(name) is not None for name in OPTIONAL},
    }
    if not check.cuda:
        info["precision"] = "fp32 (the CPU runs of this check)"
        return result("PASS", f"CPU run ({info['cpus']} CPUs); {info['driver']}", **info)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    name = torch.cuda.get_device_name(check.device)
    peak = peak_bf16_tflops(name)
    check.facts.update(gpu_name=name, peak_tflops=peak, n_gpus=len(gpus))
    info.update(gpus=gpus, gpu=name, capability=list(torch.cuda.get_device_capability(check.device)),
                peak_bf16_tflops=peak, nccl=_nccl_version(),
                precision=resolve_precision(preset(PRESET).train.precision, check.device))
    sm = "".join(map(str, info["capability"]))
    return result("PASS", f"{len(gpus)} GPU(s) {', '.join(sorted(set(gpus)))}; sm{sm}, bf16 peak "
                  f"{peak if peak else 'n/a'} TFLOP/s, NCCL {info['nccl']}, torch {torch.__version__} "
                  f"(CUDA {torch.version.cuda}); {PRESET} trains in {info['precision']}", **info)


def _nccl_version() -> str | None:
    try:
        return ".".join(str(v) for v in torch.cuda.nccl.version())
    except Exception:  # noqa: BLE001 - a build without NCCL
        return None


# --------------------------------------------------------------------------------------------------- data
def step_data(check: Check) -> dict[str, Any]:
    """Fake CIFAR-10 at the check's size, read back as the preset's long-tailed set with the expected counts."""
    from pdcbdm.data import longtail_counts

    root = check.data_root()
    cfg = check.cfg()
    data, seconds = timed(check, check.dataset)
    expected = longtail_counts(check.sizes.train_per_class, 10, float(cfg.data.imbalance))
    counts = list(data.counts())
    ok = counts == expected and tuple(data.image_shape) == (3, 32, 32)
    written = check.facts["data_written_s"]
    return result("PASS" if ok else "FAIL",
                  f"wrote {10 * (check.sizes.train_per_class + check.sizes.test_per_class):,} CIFAR-format images "
                  f"in {written:.1f}s; {PRESET} (rho {cfg.data.imbalance:g}) read back in {seconds:.1f}s: "
                  f"{len(data):,} images" + ("" if ok else f", counts {counts} instead of {expected}"),
                  root=str(root), images=len(data), counts=counts, expected_counts=expected, write_s=written,
                  read_s=seconds)


# -------------------------------------------------------------------------------------------------- train
def step_train(check: Check) -> dict[str, Any]:
    """Throughput, memory, FLOPs and host round trips of ``Trainer.advance`` on the preset's network."""
    from pdcbdm.training import Trainer

    cfg = check.cfg()
    trainer = Trainer(cfg, check.dataset(), device=check.device)
    params = sum(p.numel() for p in trainer.net.parameters())
    check.say(f"{params / 1e6:.2f}M parameters, batch {cfg.train.batch_size}, {trainer.precision}, "
              f"{check.sizes.warmup} warm-up step(s)")
    step_s = _warm_up(check, trainer, check.sizes.warmup)
    steps = fit(check.args.steps or check.sizes.steps, step_s, check.left_in_step(0.6), least=2)
    speed = _timed_training(check, trainer, steps)
    check.say(f"{speed['img_s']:,.0f} img/s over {steps} steps")
    syncs = count_host_syncs(check, trainer, check.sizes.sync_steps)
    flops = count_flops(check, trainer, check.sizes.flop_steps, speed["step_s"])
    figures = {"parameters": params, "precision": trainer.precision, "batch": cfg.train.batch_size, **speed,
               **syncs, **flops}
    check.facts["train_img_s"] = speed["img_s"]
    bad = [f"{syncs['syncs_per_advance']:g} host round trip(s) per advance() ({syncs['sync_ops']})"
           ] if syncs["syncs_per_advance"] > 0 else []
    if syncs.get("device_syncs_per_advance"):
        bad.append(f"{syncs['device_syncs_per_advance']:g} synchronizing CUDA call(s) per advance()")
    text = (f"{speed['img_s']:,.0f} img/s ({speed['step_s'] * 1e3:.1f} ms/step, {steps} steps), peak "
            f"{_peak_text(speed)}, {flops['gflop_per_image']:.1f} GFLOP/image, "
            f"{_share_text(flops)} of the bf16 peak, host syncs per step {syncs['syncs_per_step']:.2g}"
            + (f" (device count {syncs['device_syncs_per_step']:.2g})" if "device_syncs_per_step" in syncs else "")
            + f", loss {speed['loss']:.4f}")
    return result("FAIL" if bad else "PASS", text + ("; " + "; ".join(bad) if bad else ""), **figures)


def _warm_up(check: Check, trainer: Any, steps: int, fraction: float = 0.3) -> float:
    """Run ``steps`` steps, fewer once ``fraction`` of the step's share is spent (a CPU at the real sizes); the
    seconds of the last one (the first pays for cuDNN's and the allocator's set-up)."""
    step_s = 0.0
    for i in range(max(1, steps)):
        _, step_s = timed(check, trainer.advance)
        if i and check.left_in_step(fraction) <= 0:
            break
    trainer.take_window()  # a diverged warm-up fails here, before anything is timed
    return step_s


def _timed_training(check: Check, trainer: Any, steps: int) -> dict[str, Any]:
    """img/s over ``steps`` calls of ``advance`` (one synchronisation at the end), peak memory, the window's loss."""
    if check.cuda:
        torch.cuda.reset_peak_memory_stats(check.device)

    def run() -> None:
        for _ in range(steps):
            trainer.advance()

    _, seconds = timed(check, run)
    window = trainer.take_window()  # NonFiniteLossError: a FAIL naming the step
    out = {"steps": steps, "seconds": seconds, "step_s": seconds / steps,
           "img_s": steps * trainer.cfg.train.batch_size / seconds, "loss": window["loss"]}
    if check.cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(check.device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(check.device) / 2**30
    else:
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def _peak_text(speed: dict[str, Any]) -> str:
    if "peak_allocated_gib" in speed:
        return f"{speed['peak_allocated_gib']:.2f} GiB allocated / {speed['peak_reserved_gib']:.2f} GiB reserved"
    return f"{speed['peak_rss_gib']:.2f} GiB resident (the process)"


def _share_text(flops: dict[str, Any]) -> str:
    share = flops.get("peak_share")
    return "n/a" if share is None else f"{share:.1%}"


def count_host_syncs(check: Check, trainer: Any, steps: int) -> dict[str, Any]:
    """Host round trips of ``steps`` calls of ``advance`` and of the one window read after them, by
    ``HostSyncCounter`` and, on CUDA, by the device's own check (``set_sync_debug_mode``)."""
    from pdcbdm.training.syncs import HostSyncCounter

    with _device_sync_warnings(check) as advance_warned, HostSyncCounter() as advance:
        for _ in range(steps):
            trainer.advance()
    with _device_sync_warnings(check) as read_warned, HostSyncCounter() as read:
        trainer.take_window()
    out: dict[str, Any] = {
        "sync_steps": steps, "syncs_per_advance": advance.total / steps, "window_read_syncs": read.total,
        "syncs_per_step": (advance.total + read.total) / steps, "sync_ops": dict(advance.ops + read.ops),
        "sync_kinds": dict(advance.kinds + read.kinds)}
    if check.cuda:
        out.update(device_syncs_per_advance=len(advance_warned) / steps, device_window_read_syncs=len(read_warned),
                   device_syncs_per_step=(len(advance_warned) + len(read_warned)) / steps)
    return out


@contextlib.contextmanager
def _device_sync_warnings(check: Check) -> Iterator[list[str]]:
    """The messages of the synchronizing CUDA calls made inside (CUDA's sync debug mode; nothing on the CPU)."""
    found: list[str] = []
    if not check.cuda:
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found += [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


def count_flops(check: Check, trainer: Any, steps: int, step_s: float) -> dict[str, Any]:
    """FLOPs of a training step (forward, backward; averaged over ``steps``: label-dropped steps skip a pass),
    the throughput they make at ``step_s`` and its share of the card's bf16 peak."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        for _ in range(steps):
            trainer.advance()
    trainer.take_window()
    per_step = counter.get_total_flops() / steps
    achieved = per_step / step_s / 1e12
    peak = check.facts.get("peak_tflops")
    return {"gflop_per_step": per_step / 1e9, "gflop_per_image": per_step / 1e9 / trainer.cfg.train.batch_size,
            "achieved_tflops": achieved, "peak_tflops": peak, "peak_share": achieved / peak if peak else None}


# ------------------------------------------------------------------------------------------------ options
@dataclass
class OptionRun:
    """One variant of ``train.gpu_options``: its trainer and the img/s of each timed span."""

    label: str
    options: tuple[str, ...]
    trainer: Any
    first_step_s: float
    step_s: float
    img_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def option_variants(check: Check) -> tuple[list[tuple[str, tuple[str, ...]]], dict[str, str]]:
    """([(label, options)], {option: why it is not timed}): none, each option, and all of those timed together."""
    skipped: dict[str, str] = {}
    if check.cfg().train.precision != "bf16":
        skipped["bf16_groupnorm"] = "bf16 autocast only (this run trains in fp32)"
    if not check.cuda:
        skipped.update(tf32="CUDA only", cudnn_benchmark="CUDA only")
        if check.args.quick:
            skipped["compile"] = "compiling the U-Net takes minutes on a CPU (leave out --quick to time it)"
    names = [name for name in GPU_OPTIONS if name not in skipped]
    variants = [("none", ())] + [(name, (name,)) for name in names]
    if len(names) > 1:
        variants.append(("all", tuple(names)))
    return variants, skipped


@contextlib.contextmanager
def process_flags(options: tuple[str, ...], defaults: dict[str, bool]) -> Iterator[None]:
    """The process-wide flags exactly as ``options`` set them (the trainers of other variants live in the same
    process and set them on construction), back to ``defaults`` after."""
    _set_flags(defaults)
    if "tf32" in options:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "cudnn_benchmark" in options:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        _set_flags(defaults)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 matmuls and convolutions in full fp32 inside, the flags as they were after."""
    before = _flags()
    _set_flags({**before, "matmul_tf32": False, "cudnn_tf32": False})
    try:
        yield
    finally:
        _set_flags(before)


def _flags() -> dict[str, bool]:
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "benchmark": torch.backends.cudnn.benchmark}


def _set_flags(flags: dict[str, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]
    torch.backends.cudnn.benchmark = flags["benchmark"]


def step_options(check: Check) -> dict[str, Any]:
    """Each ``train.gpu_options`` variant's img/s, in rounds of alternating order; which is fastest."""
    from pdcbdm.training import Trainer

    variants, skipped = option_variants(check)
    defaults = _flags()
    runs: list[OptionRun] = []
    try:
        for label, options in variants:
            with process_flags(options, defaults):
                trainer = Trainer(check.cfg(f"train.gpu_options={','.join(options)}"), check.dataset(),
                                  device=check.device)
                _, first = timed(check, trainer.advance)  # compile: the compilation
                # the warm-ups together take at most half of the step's share
                until = 0.5 * (len(runs) + 1) / len(variants)
                step_s = _warm_up(check, trainer, check.sizes.warmup - 1, until) if check.sizes.warmup > 1 else first
            runs.append(OptionRun(label, options, trainer, first, step_s))
            check.say(f"{label}: built and warmed up (first step {first:.2f}s, then {step_s * 1e3:.1f} ms)")
        rounds, steps = _option_plan(check, runs)
        for r in range(rounds):
            for run in (runs if r % 2 == 0 else runs[::-1]):
                _timed_span(check, run, steps, defaults, seed=1000 + r)
            check.say(f"round {r + 1}: " + ", ".join(f"{run.label} {run.img_s[-1]:,.0f}" for run in runs) + " img/s")
        return _options_result(runs, skipped, rounds, steps)
    finally:
        _set_flags(defaults)
        if any("compile" in options for _, options in variants):
            torch._dynamo.reset()  # the compiled graphs of the variants
        runs.clear()


def _timed_span(check: Check, run: OptionRun, steps: int, defaults: dict[str, bool], seed: int) -> None:
    """``steps`` steps of one variant under its flags: img/s, and the window's loss (NonFiniteLossError if a step
    diverged). Every variant's trainer has the same seed and step, and the global RNG (dropout) is seeded alike
    before each span, so the losses differ by the variants' numerics (a compiled network draws its dropout
    otherwise)."""
    torch.manual_seed(seed)
    with process_flags(run.options, defaults):
        _, seconds = timed(check, lambda: [run.trainer.advance() for _ in range(steps)])
    run.img_s.append(steps * run.trainer.cfg.train.batch_size / seconds)
    run.losses.append(run.trainer.take_window()["loss"])


def _option_plan(check: Check, runs: list[OptionRun]) -> tuple[int, int]:
    """(rounds, steps per span) that fit the step's time left: ``option_rounds`` rounds when each span can have
    at least its fewest steps, fewer rounds otherwise."""
    fewest, most = check.sizes.option_steps
    left = check.left_in_step()
    per_round = sum(run.step_s for run in runs) or 1e-9
    for rounds in range(check.sizes.option_rounds, 0, -1):
        steps = int(left / rounds / per_round)
        if steps >= fewest:
            return rounds, min(most, steps)
    return 1, fewest


def _options_result(runs: list[OptionRun], skipped: dict[str, str], rounds: int, steps: int) -> dict[str, Any]:
    base, base_loss = _median(runs[0].img_s), sum(runs[0].losses) / len(runs[0].losses)
    rows = [{"variant": run.label, "img_s": run.img_s, "median_img_s": _median(run.img_s),
             "vs_none": _median(run.img_s) / base, "first_step_s": run.first_step_s, "losses": run.losses,
             "loss_vs_none": sum(run.losses) / len(run.losses) / base_loss - 1.0} for run in runs]
    best = max(rows, key=lambda row: row["median_img_s"])
    table = format_option_table(rows, rounds, steps)
    print(table, flush=True)
    return result("PASS", f"fastest: {best['variant']} ({best['vs_none']:.2f}x no option, {best['median_img_s']:,.0f} "
                  f"img/s); {rounds} round(s) of {steps} step(s) per variant"
                  + (f"; not timed: {', '.join(f'{k} ({v})' for k, v in skipped.items())}" if skipped else ""),
                  rows=rows, rounds=rounds, steps_per_span=steps, fastest=best["variant"], not_timed=skipped,
                  table=table)


def format_option_table(rows: list[dict[str, Any]], rounds: int, steps: int) -> str:
    """The img/s of each variant and round, the median, the ratio to no option, the first step (a compiled
    network's compilation) and the mean loss of the spans relative to no option's (same data, same draws)."""
    lines = [f"  {'variant':<16} {'img/s per round':<30} {'median':>9} {'vs none':>8} {'first step':>11} "
             f"{'loss vs none':>13}"]
    for row in rows:
        spans = ", ".join(f"{v:,.0f}" for v in row["img_s"])
        lines.append(f"  {row['variant']:<16} {spans:<30} {row['median_img_s']:>9,.0f} {row['vs_none']:>7.2f}x "
                     f"{row['first_step_s']:>10.2f}s {row['loss_vs_none']:>+12.2%}")
    note = ("one span per variant is a single measurement: rerun, or give more --minutes, for a spread"
            if rounds == 1 else f"{rounds} rounds in alternating order: the spread is the rounds' range")
    return "\n".join([*lines, f"  ({steps} step(s) per span; {note})"])


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# ---------------------------------------------------------------------------------------------------- rng
def step_rng(check: Check) -> dict[str, Any]:
    """Two ranks of one run, simulated in this process as a worker seeds them (train.seed + rank): building the
    Trainer leaves each rank's global RNG as seeded, so their dropout streams differ, while the batch draws (the
    trainer's own generator) are the same on both (each rank keeps its rows of the global batch)."""
    from pdcbdm.training import Trainer

    cfg = check.cfg()
    kept, streams, batch_draws = [], [], []
    for rank in (0, 1):
        torch.manual_seed(cfg.train.seed + rank)
        before = _rng_state(check)
        trainer = Trainer(cfg, check.dataset(), device=check.device, rank=rank, world_size=2)
        kept.append(torch.equal(before, _rng_state(check)))
        streams.append(torch.nn.functional.dropout(torch.ones(4096, device=check.device), 0.5).cpu())
        batch_draws.append(trainer.generator.get_state())
    differ = not torch.equal(streams[0], streams[1])
    shared = torch.equal(batch_draws[0], batch_draws[1])
    ok = all(kept) and differ and shared
    where = "CUDA" if check.cuda else "CPU"
    return result("PASS" if ok else "FAIL",
                  f"each rank's {where} RNG kept through Trainer(): {all(kept)}; the ranks' dropout masks differ: "
                  f"{differ}; the batch draws agree: {shared}", rng_kept=kept, dropout_differs=differ,
                  batch_draws_shared=shared)


def _rng_state(check: Check) -> torch.Tensor:
    return torch.cuda.get_rng_state(check.device) if check.cuda else torch.get_rng_state()


# ------------------------------------------------------------------------------------------------- sample
def step_sample(check: Check) -> dict[str, Any]:
    """DDIM with the preset's steps and the paper's DDPM-1000 at the evaluation batch (an untrained network:
    the cost is the same), each cut to a shorter schedule when the budget asks and extrapolated to the full one."""
    from pdcbdm.evaluation import final_sampling

    cfg = check.cfg()
    run = _sampler(check, cfg)
    _, warm = run(cfg.diffusion, sampler="ddim", steps=2, eta=cfg.sample.eta)
    per_step = warm / 2
    cap = check.sizes.sampler_steps
    ddim_full = cfg.sample.steps
    ddim_steps = fit(min(cap, ddim_full), per_step, check.left_in_step(0.35), least=2)
    ddim, ddim_s = run(cfg.diffusion, sampler="ddim", steps=ddim_steps, eta=cfg.sample.eta)
    final_cfg, settings = final_sampling(cfg)
    total = final_cfg.timesteps
    ddpm_steps = fit(min(cap, total), per_step, check.left_in_step(0.9), least=2)
    ddpm, ddpm_s = run(dataclasses.replace(final_cfg, timesteps=ddpm_steps), **settings)
    return _sample_result(check, cfg, ddim, ddpm, (ddim_steps, ddim_full, ddim_s), (ddpm_steps, total, ddpm_s),
                          settings["sampler"])


def _sampler(check: Check, cfg: Config) -> Callable[..., tuple[torch.Tensor, float]]:
    """A timed ``generate`` of one evaluation batch with the preset's guidance, on an untrained network."""
    from pdcbdm.diffusion import GaussianDiffusion
    from pdcbdm.evaluation.settings import sampling_autocast
    from pdcbdm.sampling import generate, uniform_labels
    from pdcbdm.training import build_network

    torch.manual_seed(0)
    net = build_network(cfg, 10, (3, 32, 32)).to(check.device).eval()
    labels = uniform_labels(cfg.eval.batch_size, 10).to(check.device)
    autocast = sampling_autocast(cfg, check.device) or contextlib.nullcontext

    def run(diffusion_cfg: Any, **settings: Any) -> tuple[torch.Tensor, float]:
        return timed(check, lambda: generate(net, GaussianDiffusion(diffusion_cfg), labels, (3, 32, 32),
                                             guidance=cfg.sample.guidance, null_label=10,
                                             batch_size=cfg.eval.batch_size, seed=0, autocast=autocast, **settings))
    return run


def _sample_result(check: Check, cfg: Config, ddim: torch.Tensor, ddpm: torch.Tensor, ddim_run: tuple,
                   ddpm_run: tuple, final_sampler: str) -> dict[str, Any]:
    batch = cfg.eval.batch_size
    (k_ddim, n_ddim, s_ddim), (k_ddpm, n_ddpm, s_ddpm) = ddim_run, ddpm_run
    ddim_image = s_ddim / k_ddim * n_ddim / batch
    ddpm_step = s_ddpm / k_ddpm
    ddpm_image = ddpm_step * n_ddpm / batch
    final_s = math.ceil(cfg.eval.num_samples / batch) * n_ddpm * ddpm_step
    check.facts["final_sampling_s"] = final_s
    ok = all(x.dtype == torch.uint8 and tuple(x.shape) == (batch, 3, 32, 32) and x.float().std() > 0
             for x in (ddim, ddpm))
    cut = [f"{name} timed over {k} of {n} steps" for name, k, n in (("DDIM", k_ddim, n_ddim), ("DDPM", k_ddpm, n_ddpm))
           if k < n]
    return result("PASS" if ok else "FAIL",
                  f"batch {batch}, w={cfg.sample.guidance:g}: DDIM-{n_ddim} {ddim_image * 1e3:.2f} ms/image, "
                  f"{final_sampler.upper()}-{n_ddpm} (paper protocol) {ddpm_image * 1e3:.1f} ms/image; one guidance "
                  f"value's {cfg.eval.num_samples:,} samples: {final_s / 60:.1f} min"
                  + (f" ({'; '.join(cut)}, extrapolated)" if cut else "")
                  + ("" if ok else "; the samples are not uint8 images of the right shape"),
                  batch=batch, guidance=cfg.sample.guidance, ddim_steps=n_ddim, ddim_steps_timed=k_ddim,
                  ddim_s_per_image=ddim_image, ddpm_steps=n_ddpm, ddpm_steps_timed=k_ddpm, ddpm_step_s=ddpm_step,
                  ddpm_s_per_image=ddpm_image, final_samples=cfg.eval.num_samples, final_sampling_s=final_s)


# ---------------------------------------------------------------------------------------------------- pt2
def step_pt2_graph(check: Check) -> dict[str, Any]:
    """``torch.export`` of the network on the CPU with a dynamic batch, as MLflow's pt2 format exports it, and its
    graph moved to the device and run there against the network itself: whoever serves the archive runs that
    graph, which must name no device (the project's own loader rebuilds the network and never reads it)."""
    from pdcbdm.training import build_network

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
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.model_source import load_network
    from pdcbdm.training import build_network
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
    from pdcbdm.diffusion import GaussianDiffusion
    from pdcbdm.evaluation.settings import sampling_autocast
    from pdcbdm.sampling import generate, uniform_labels

    labels = uniform_labels(cfg.eval.batch_size, 10).to(check.device)
    autocast = sampling_autocast(cfg, check.device) or contextlib.nullcontext
    return timed(check, lambda: generate(net, GaussianDiffusion(cfg.diffusion), labels, (3, 32, 32), sampler="ddim",
                                         steps=3, guidance=cfg.sample.guidance, null_label=10,
                                         batch_size=cfg.eval.batch_size, autocast=autocast))


# ------------------------------------------------------------------------------------------------ metrics
def step_metrics(check: Check) -> dict[str, Any]:
    """The final evaluation's metrics at their real size on the device (``pipelines.benchmark.metrics_job``) and
    the Inception features of its samples; with the sampling step, one guidance value's whole evaluation."""
    from pipelines.benchmark import metrics_job

    spec = {**check.sizes.metric, "device": str(check.device)}
    with _quiet_stderr():
        job = metrics_job(spec)
    features = _feature_time(check)
    per_w = job["total_s"] + (features.get("final_features_s") or 0.0)
    check.facts["final_metrics_s"] = per_w
    figures = {key: job[key] for key in ("first_s", "fid_s", "precision_recall_s", "kid_s", "prd_s", "total_s",
                                         "fid", "precision", "recall", "kid", "f_8", "f_1_8", "peak_mb")}
    finite = all(_finite(job[key]) for key in ("fid", "precision", "recall", "kid", "f_8", "f_1_8"))
    size = f"{spec['n']:,} x {spec['dim']} against {5 * spec['n']:,}"
    return result("PASS" if finite else "FAIL",
                  f"{size} on {check.device}: FID {job['fid_s']:.1f}s, P/R {job['precision_recall_s']:.1f}s, KID "
                  f"{job['kid_s']:.1f}s, PRD {job['prd_s']:.1f}s (reference statistics once: {job['first_s']:.1f}s); "
                  f"{features['text']}", n=spec["n"], dim=spec["dim"], **figures, **features)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The benchmark job's per-metric lines go to stderr; here the step's own line says it all."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def _feature_time(check: Check) -> dict[str, Any]:
    """Seconds of the FID Inception's features (random weights: the cost is the same) for one final evaluation's
    samples, from ``feature_images`` images; not timed without torch-fidelity."""
    if missing_packages(("torch_fidelity",)):
        return {"text": "Inception features not timed (torch-fidelity not installed)", "final_features_s": None}
    from pdcbdm.metrics import extract_all
    from pdcbdm.metrics.inception import InceptionExtractor, InceptionWeights, build_inception_module

    cfg = check.cfg()
    state = build_inception_module(("2048", "logits_unbiased")).state_dict()
    extractor = InceptionExtractor(InceptionWeights(state, "random", "random weights (timing)", True), check.device)
    n = check.sizes.feature_images
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    extract_all(extractor, images[:1], batch_size=1, progress=False)  # warm-up
    _, seconds = timed(check, lambda: extract_all(extractor, images, batch_size=cfg.eval.batch_size, progress=False))
    final = seconds / n * cfg.eval.num_samples
    return {"text": f"Inception features {seconds / n * 1e3:.2f} ms/image, {final / 60:.1f} min for "
                    f"{cfg.eval.num_samples:,} samples", "feature_s_per_image": seconds / n, "final_features_s": final}


# ------------------------------------------------------------------------------------------------- search
def step_search(check: Check) -> dict[str, Any]:
    """A 1-trial ``tune/search.py`` as a subprocess on the GPU (and a 2-worker nccl trial with two GPUs); its
    trial must complete with a finite FID."""
    if not check.cuda and check.args.quick and not check.args.search:
        return result("SKIP", "a search takes minutes on a CPU: pass --search to run it")
    skipped = skip_for_packages(("ray", "mlflow", "optuna", "pandas"), "tune/search.py needs them")
    if skipped:
        return skipped
    if check.cuda and missing_packages(("torch_fidelity",)):
        return result("SKIP", f"torch_fidelity not installed (the {PRESET} evaluation's Inception needs it)")
    if check.share < SEARCH_MIN_S and check.budget.left() < SEARCH_MIN_S:
        return result("SKIP", f"{check.budget.left():.0f}s of the budget left, a search needs about "
                      f"{SEARCH_MIN_S:.0f}s (give more --minutes)")
    workers = [1, 2] if check.cuda and check.facts.get("n_gpus", 0) >= 2 else [1]
    trials = {}
    for n in workers:
        trials[n] = _one_search(check, n, timeout=max(SEARCH_MIN_S, check.left_in_step() / len(workers)))
        check.say(trials[n]["text"])
    ok = all(t["ok"] for t in trials.values())
    return result("PASS" if ok else "FAIL", "; ".join(t["text"] for t in trials.values()),
                  trials={str(k): v for k, v in trials.items()})


def _search_command(check: Check, workers: int) -> tuple[list[str], Path]:
    """The search's command line and its ``--out`` folder: the preset at a tiny budget on the GPU, the smoke
    preset on the CPU."""
    out = check.work / f"search{workers}"
    shutil.rmtree(out, ignore_errors=True)
    if check.cuda:
        sets = [f"data.root={_search_data(check)}", "train.steps=100", "train.eval_every=50", "train.log_every=25",
                "train.warmup=10", "eval.num_samples=200", "eval.proxy_samples=100", "eval.batch_size=200",
                "eval.guidance_grid=1.2", "sample.steps=10", "eval.noise_error_images=8", *_inception_sets(check)]
        name, gpus = PRESET, "1"
    else:
        sets, name, gpus = ["train.steps=40", "train.eval_every=20", "train.log_every=10"], "smoke", "0"
    cmd = [sys.executable, str(ROOT / "tune" / "search.py"), "--preset", name, "--trials", "1", "--no-asha",
           "--name", f"gpucheck{workers}", "--out", str(out), "--gpus-per-worker", gpus, "--workers-per-trial",
           str(workers)]
    return cmd + [part for item in sets for part in ("--set", item)], out


def _search_data(check: Check) -> Path:
    """A smaller fake CIFAR-10 for the search (500 + 100 images a class): its reference and floors stay quick."""
    from pdcbdm.data.fake_cifar import write_fake_cifar10

    root = check.work / "cifar-search"
    if not (root / "cifar-10-batches-py" / "batches.meta").is_file():
        write_fake_cifar10(root, 500, 100, seed=1)
    return root


def _inception_sets(check: Check) -> list[str]:
    """``eval.inception_weights`` of random weights when none are found offline (the scores are meaningless, the
    plumbing and the timing are real); nothing when the FID Inception's weights are here."""
    from pdcbdm.metrics.inception import build_inception_module, resolve_inception_weights

    try:
        resolve_inception_weights(None, allow_download=False)
        return []
    except (FileNotFoundError, ValueError):
        path = check.work / "random-inception.pth"
        torch.manual_seed(0)
        torch.save(build_inception_module(("2048", "logits_unbiased")).state_dict(), path)
        check.say(f"no FID Inception weights offline: random ones at {path} (meaningless scores, real plumbing)")
        return [f"eval.inception_weights={path}"]


def _one_search(check: Check, workers: int, timeout: float) -> dict[str, Any]:
    cmd, out = _search_command(check, workers)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_OFFLINE": "1", "PDCBDM_CACHE": str(check.work / "cache")}
    check.say(f"{workers} worker(s): tune/search.py (timeout {timeout:.0f}s)")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "text": f"{workers}-worker search not finished within {timeout:.0f}s"}
    wall = time.monotonic() - t0
    (check.work / f"search{workers}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    table = out / "searches" / f"gpucheck{workers}" / "trials.parquet"
    if proc.returncode != 0 or not table.is_file():
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
        return {"ok": False, "wall_s": wall, "text": f"{workers}-worker search exited {proc.returncode} after "
                f"{wall:.0f}s; last stderr line: {last}"}
    import pandas as pd

    row = pd.read_parquet(table).iloc[0]
    fid = float(row["fid"]) if row.get("fid") is not None else float("nan")
    ok = row["status"] == "completed" and math.isfinite(fid)
    return {"ok": ok, "wall_s": wall, "status": str(row["status"]), "fid": fid,
            "text": f"{workers}-worker trial {row['status']} in {wall:.0f}s (FID {fid:.1f} on fake data)"}


# ------------------------------------------------------------------------------------------------ targets
def step_targets(check: Check) -> dict[str, Any]:
    """The issue's targets on an H100/H200 in bf16 with the real sizes: training img/s and one guidance value's
    paper-protocol evaluation (sampling + features + metrics)."""
    name = check.facts.get("gpu_name", "")
    if not check.cuda or check.args.quick or not any(card in name.upper() for card in TARGET_CARDS):
        return result("SKIP", "the targets are set for one H100/H200 in bf16 at the real sizes (no --quick)")
    img_s = check.facts.get("train_img_s")
    final_s = _final_eval_s(check)
    checks = {"train_img_s >= 2000": None if img_s is None else img_s >= TARGET_IMG_S,
              "final evaluation of one w < 15 min": None if final_s is None else final_s < TARGET_FINAL_EVAL_S}
    missed = [k for k, v in checks.items() if v is False]
    unknown = [k for k, v in checks.items() if v is None]
    text = (f"training {img_s:,.0f} img/s" if img_s else "training not measured") + "; final evaluation " + (
        f"{final_s / 60:.1f} min" if final_s else "not measured (needs the sample and metrics steps)")
    status = "FAIL" if missed else ("SKIP" if len(unknown) == len(checks) else "PASS")
    return result(status, text + (f"; missed: {', '.join(missed)}" if missed else ""), checks=checks,
                  train_img_s=img_s, final_eval_s=final_s)


def _final_eval_s(check: Check) -> float | None:
    """One guidance value's final evaluation: its sampling (sample step) and its features and metrics (metrics
    step); None unless both ran."""
    parts = [check.facts.get(key) for key in ("final_sampling_s", "final_metrics_s")]
    return sum(parts) if all(v is not None for v in parts) else None


STEP_FUNCS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "env": step_env, "data": step_data, "train": step_train, "options": step_options, "rng": step_rng,
    "sample": step_sample, "pt2_graph": step_pt2_graph, "pt2_logged": step_pt2_logged, "metrics": step_metrics,
    "search": step_search, "targets": step_targets,
}


# ------------------------------------------------------------------------------------------------ running
def run_check(check: Check, names: Sequence[str],
              results: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Run ``names`` in order after ``results`` (steps already decided); a step that raises is a FAIL with its
    error and the next one runs. Without the CUDA device that ``--device cuda`` asked for (``env`` says
    ``no_device``), every other step is SKIPped."""
    results = dict(results or {})
    for i, name in enumerate(names):
        check.step, check.share = name, check.budget.share(names[i:])
        check.facts["step_start"] = check.budget.elapsed()
        cpu = time.process_time()
        print(f"== {name} (about {check.share:.0f}s of {check.budget.left():.0f}s left)", flush=True)
        out = _run_one(check, name, results)
        # the process's CPU seconds beside the wall's: on a machine shared with other work they tell the two apart
        out.update(seconds=round(check.budget.elapsed() - check.facts["step_start"], 2),
                   cpu_s=round(time.process_time() - cpu, 2))
        results[name] = out
        print(f"{out['status']} {name}: {out['reason']}", flush=True)
        free_memory(check)
    return results


def _run_one(check: Check, name: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if results.get("env", {}).get("no_device"):
        return result("SKIP", "no CUDA device (see env)")
    try:
        return STEP_FUNCS[name](check)
    except Exception as exc:  # noqa: BLE001 - any crash of a step is its FAIL; the others still run
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
        return result("FAIL", f"{type(exc).__name__}: {first}", error=traceback.format_exc(limit=12))
    finally:
        if check.cuda:
            torch.cuda.set_sync_debug_mode(0)


def summarise(check: Check, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The key figures and every step's status: what the command prints at its end."""
    counts = {s: sum(r["status"] == s for r in results.values()) for s in ("PASS", "FAIL", "SKIP")}
    figures = {
        "train_img_s": results.get("train", {}).get("img_s"),
        "train_peak_gib": results.get("train", {}).get("peak_allocated_gib"),
        "train_peak_share": results.get("train", {}).get("peak_share"),
        "host_syncs_per_step": results.get("train", {}).get("syncs_per_step"),
        "device_syncs_per_step": results.get("train", {}).get("device_syncs_per_step"),
        "fastest_options": results.get("options", {}).get("fastest"),
        "ddim_s_per_image": results.get("sample", {}).get("ddim_s_per_image"),
        "ddpm_s_per_image": results.get("sample", {}).get("ddpm_s_per_image"),
        "final_sampling_s": check.facts.get("final_sampling_s"),
        "final_metrics_s": check.facts.get("final_metrics_s"),
        "final_eval_s": _final_eval_s(check),
    }
    return {"ok": counts["FAIL"] == 0, "device": str(check.device), "gpu": check.facts.get("gpu_name"),
            "quick": check.args.quick, "minutes": check.args.minutes, "elapsed_s": round(check.budget.elapsed(), 1),
            "counts": counts, "status": {k: v["status"] for k, v in results.items()},
            "figures": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}}


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every option explains itself in --help."""
    p = argparse.ArgumentParser(prog="python -m pipelines.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when torch sees it, else the CPU with --quick), cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a width-8 network, 2 steps, small batches)")
    p.add_argument("--minutes", type=float, default=None, help="time budget (default 9; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 200; --quick 2)")
    p.add_argument("--only", default=None, help=f"comma-separated steps to run (default all): {', '.join(STEPS)}")
    p.add_argument("--search", action="store_true", help="run the search step on the CPU with --quick too")
    p.add_argument("--out", default="runs/gpu-check.json", help="the JSON report (default runs/gpu-check.json)")
    p.add_argument("--work", default=None, help="scratch folder (fake data, models, search); default a temporary "
                   "folder, removed at the end")
    return p


def _steps_of(spec: str | None) -> list[str]:
    if not spec:
        return list(STEPS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        raise SystemExit(f"--only: unknown step(s) {', '.join(unknown)}; valid: {', '.join(STEPS)}")
    return [s for s in STEPS if s in names]


def _device(spec: str) -> tuple[torch.device, bool]:
    """(the device, whether a CUDA device that was asked for is missing)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), False
    device = torch.device(spec)
    missing = device.type == "cuda" and not torch.cuda.is_available()
    return device, missing


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; 0 when no step FAILed, else 1."""
    args = build_parser().parse_args(argv)
    names = _steps_of(args.only)
    device, no_device = _device(args.device)
    if args.device == "auto" and device.type == "cpu" and not args.quick:
        print("no CUDA device: the CPU runs the --quick sizes (--device cpu without --quick: the real sizes, hours)",
              flush=True)
        args.quick = True
    args.minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 9.0)
    if device.type == "cuda" and device.index is not None and not no_device:
        torch.cuda.set_device(device)
    threads = torch.get_num_threads()
    try:
        if device.type == "cpu" and args.quick:
            # tiny tensors: a second thread's hand-offs cost more than it computes (5x slower on a busy 2-core
            # machine)
            torch.set_num_threads(1)
        summary, results = _check_all(args, names, device, no_device)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (the tests)
    path = write_json_atomic(_out_path(args.out), _plain({"summary": summary, "steps": results}))
    print(json.dumps(_plain(summary), indent=1), flush=True)
    print(f"all figures: {path}", flush=True)
    return 0 if summary["ok"] else 1


def _check_all(args: argparse.Namespace, names: list[str], device: torch.device,
               no_device: bool) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(summary, every step's result) of the steps ``names`` in a scratch folder."""
    with _work_folder(args.work) as work:
        check = Check(args, device, QUICK if args.quick else FULL, work, Budget(60.0 * args.minutes))
        print(f"pdcbdm GPU check on {device}{' (quick)' if args.quick else ''}: {', '.join(names)}; budget "
              f"{args.minutes:g} min; scratch {work}", flush=True)
        first: dict[str, dict[str, Any]] = {}
        if no_device:
            first["env"] = result("FAIL", f"--device {args.device}: torch sees no CUDA device", no_device=True)
            print(f"FAIL env: {first['env']['reason']}", flush=True)
        results = run_check(check, [n for n in names if n not in first], first)
        return summarise(check, results), results


def _plain(value: Any) -> Any:
    """``value`` with numpy and torch scalars made Python numbers (the JSON takes nothing else)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _out_path(out: str) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _work_folder(spec: str | None) -> Iterator[Path]:
    if spec:
        Path(spec).mkdir(parents=True, exist_ok=True)
        yield Path(spec).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="pdcbdm-gpucheck-") as tmp:
        yield Path(tmp)


if __name__ == "__main__":
    sys.exit(main())
