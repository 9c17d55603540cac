"""The ``targets`` step: the issue's targets judged on an H100/H200 in bf16 at the real sizes."""

from __future__ import annotations

from typing import Any

from pipelines.gpu_check.budget import TARGET_CARDS, TARGET_FINAL_EVAL_S, TARGET_IMG_S
from pipelines.gpu_check.context import Check, result


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
