"""The ``metrics`` step: every metric of one final evaluation at its real size and the Inception features."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch

from pdcbdm.metrics import extract_all
from pipelines.benchmark.metrics import metrics_job
from pipelines.gpu_check.context import Check, missing_packages, result, timed


# ------------------------------------------------------------------------------------------------ metrics
def step_metrics(check: Check) -> dict[str, Any]:
    """The final evaluation's metrics at their real size on the device (``pipelines.benchmark.metrics_job``) and
    the Inception features of its samples; with the sampling step, one guidance value's whole evaluation."""
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
    # deferred: torch-fidelity is optional here (the features are not timed without it); this module needs it
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
