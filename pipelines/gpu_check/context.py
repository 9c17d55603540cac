"""What the steps share (``Check``: options, device, sizes, scratch folder, budget, facts) and their
helpers: a step's result, SKIPs for missing packages, timing on the device, freeing memory."""

from __future__ import annotations

import argparse
import gc
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pdcbdm.config import Config, apply_overrides
from pdcbdm.data.fake_cifar import write_fake_cifar10
from pdcbdm.presets import preset
from pdcbdm.train import load_data
from pipelines.gpu_check.budget import PRESET, Budget, Sizes


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
            t0 = time.perf_counter()
            write_fake_cifar10(root, self.sizes.train_per_class, self.sizes.test_per_class, seed=0)
            self.facts["data_written_s"] = time.perf_counter() - t0
        return root

    def dataset(self) -> Any:
        """The preset's training set read from the fake files (cached)."""
        if "dataset" not in self.facts:
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


def free_memory(check: Check) -> None:
    """Give back what a finished step held (its trainers, networks, compiled graphs)."""
    gc.collect()
    if check.cuda:
        torch.cuda.empty_cache()
