"""Performance benchmark of PD-CBDM: training throughput and memory, component costs, samplers and metrics.

``python -m pipelines.benchmark --help`` (the docstring of ``cli``) says what it measures and how. Modules:
``cli`` (command line, ``main``), ``settings`` (the grid, ``BenchSettings``), ``runner`` (timing, peak memory, jobs in
fresh processes), one module per section (``train``, ``sampling``, ``metrics``, ``quality``; ``data`` is
``pipelines.bench_data``) and ``report`` (machine, tables). The names below are the package's API.
"""

from __future__ import annotations

from pipelines.benchmark.cli import build_parser, main, resolve_device, run_benchmark, settings_from_args
from pipelines.benchmark.metrics import metrics_job
from pipelines.benchmark.report import format_table, machine_info, print_report
from pipelines.benchmark.runner import JobRunner, PeakMemory, Timing, time_call, timed_median
from pipelines.benchmark.settings import DEFAULT_VARIANTS, SECTIONS, VARIANTS, BenchSettings
from pipelines.benchmark.train import network_images_per_step, train_plan, variant_config

__all__ = [
    "DEFAULT_VARIANTS", "SECTIONS", "VARIANTS", "BenchSettings", "JobRunner", "PeakMemory", "Timing", "build_parser",
    "format_table", "machine_info", "main", "metrics_job", "network_images_per_step", "print_report",
    "resolve_device", "run_benchmark", "settings_from_args", "time_call", "timed_median", "train_plan",
    "variant_config",
]
