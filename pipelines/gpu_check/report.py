"""The check's report: the summary printed at its end, and the JSON's plain values and path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.gpu_check.context import Check
from pipelines.gpu_check.targets import _final_eval_s


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
