"""Running the steps in order (``STEP_FUNCS``): a step that raises is a FAIL, and the next step runs."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipelines.gpu_check.context import Check, free_memory, result
from pipelines.gpu_check.env import step_data, step_env
from pipelines.gpu_check.metrics import step_metrics
from pipelines.gpu_check.options import step_options
from pipelines.gpu_check.pt2 import step_pt2_graph, step_pt2_logged
from pipelines.gpu_check.sample import step_sample
from pipelines.gpu_check.search import step_search
from pipelines.gpu_check.targets import step_targets
from pipelines.gpu_check.train import step_rng, step_train

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
