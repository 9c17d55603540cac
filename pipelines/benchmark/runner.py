"""Running the benchmark's jobs: timing and peak memory inside a job, and each job in a fresh process forked
from a forkserver that preloaded torch and pdcbdm (see ``pipelines.benchmark.cli``'s docstring: Method)."""

from __future__ import annotations

import contextlib
import gc
import importlib
import multiprocessing as mp
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from threadpoolctl import threadpool_limits

from pipelines.benchmark.settings import FORKSERVER_PRELOAD, BenchSettings


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
            process's resident set (see ``pipelines.benchmark.cli``'s docstring).
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.device = device
        self.baseline: float | None = None

    def start(self) -> None:
        """Record the baseline and reset the peak counter."""
        if self.cuda:
            # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
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
            # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
            import torch

            torch.cuda.synchronize(self.device)
            peak: float | None = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _proc_status_mb("VmHWM")
        growth = None if peak is None or self.baseline is None else max(peak - self.baseline, 0.0)
        return {"peak_mb": peak, "growth_mb": growth}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
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
# running jobs in fresh processes
# ---------------------------------------------------------------------------------------------------------------
# kind -> "module:function" of the job; the job process imports it (the sections' modules import this one)
JOBS: dict[str, str] = {
    "train": "pipelines.benchmark.train:train_job", "sampling": "pipelines.benchmark.sampling:sampling_job",
    "features": "pipelines.benchmark.metrics:features_job",
    "precision_recall": "pipelines.benchmark.metrics:precision_recall_job",
    "prd": "pipelines.benchmark.metrics:prd_job", "fid": "pipelines.benchmark.metrics:fid_job",
    "metrics": "pipelines.benchmark.metrics:metrics_job", "quality": "pipelines.benchmark.quality:quality_job",
}


def job_function(kind: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The job function of ``kind`` (a key of JOBS), imported from its module."""
    module, name = JOBS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def _job_entry(kind: str, spec: dict[str, Any], conn: Any) -> None:
    """Body of a job process: set the thread count, run the job, send ("ok", result) or ("error", text).

    A thread count limits torch and, through threadpoolctl, numpy's BLAS and scikit-learn's OpenMP pools too (PRD's
    k-means would otherwise use every core)."""
    try:
        # deferred: torch (1.7 s) loads in the jobs only; pipelines.benchmark's --help imports this module
        import torch

        wall, cpu = time.perf_counter(), time.process_time()
        limits: Any = contextlib.nullcontext()
        if spec.get("threads", 0) > 0:
            torch.set_num_threads(spec["threads"])
            limits = threadpool_limits(limits=spec["threads"])
        with limits:
            result = job_function(kind)(spec)
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
# what the sections share
# ---------------------------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _base_spec(s: BenchSettings) -> dict[str, Any]:
    return {"device": s.device, "threads": s.threads}
