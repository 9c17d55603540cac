"""Is this machine ready to train and evaluate PD-CBDM? One command, no internet, PASS/FAIL/SKIP lines and a JSON.

``python -m pipelines.gpu_check --help`` (the docstring of ``cli``) lists the steps and the rules. Modules: ``cli``
(command line, ``main``), ``budget`` (time budget, sizes, targets), ``context`` (``Check``, what the steps share),
one module per group of steps (``env``: env and data, ``train``: train and rng, ``options``, ``sample``, ``pt2``,
``metrics``, ``search``, ``targets``), ``runner`` (the steps in order) and ``report`` (summary, JSON). The names below
are the package's API.
"""

from __future__ import annotations

from pipelines.gpu_check.budget import STEPS, Budget, fit, peak_bf16_tflops
from pipelines.gpu_check.cli import build_parser, main
from pipelines.gpu_check.context import Check
from pipelines.gpu_check.options import _flags, _set_flags, format_option_table, process_flags  # noqa: F401
from pipelines.gpu_check.runner import STEP_FUNCS, run_check

__all__ = ["STEPS", "STEP_FUNCS", "Budget", "Check", "build_parser", "fit", "format_option_table", "main",
           "peak_bf16_tflops", "process_flags", "run_check"]
# _flags and _set_flags (the process-wide flags' save and restore) stay importable here for tests/test_gpu_check.py
