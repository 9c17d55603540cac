"""The ``env`` step (software and hardware) and the ``data`` step (fake CIFAR-10 at the real size, read back)."""

from __future__ import annotations

import importlib.util
import os
import platform
from typing import Any

import torch

from pdcbdm.data import longtail_counts
from pdcbdm.presets import preset
from pdcbdm.training import resolve_precision
from pdcbdm.training.cuda import cuda_diagnosis
from pipelines.gpu_check.budget import OPTIONAL, PRESET, peak_bf16_tflops
from pipelines.gpu_check.context import Check, result, timed


# ---------------------------------------------------------------------------------------------------- env
def step_env(check: Check) -> dict[str, Any]:
    """The software and the hardware; FAIL only when ``--device cuda`` finds no GPU (the steps after it SKIP)."""
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
