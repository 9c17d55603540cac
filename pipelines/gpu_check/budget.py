"""What the check may spend: the steps and their shares of the time budget (``Budget``), the work of
each step at most (``Sizes``: full and --quick), the targets and the cards' bf16 peaks."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
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


def fit(count: int, per_unit_s: float, seconds: float, least: int = 1) -> int:
    """How many of ``count`` units of ``per_unit_s`` seconds fit in ``seconds`` (at least ``least``)."""
    if per_unit_s <= 0:
        return count
    return max(least, min(count, int(seconds / per_unit_s)))


def peak_bf16_tflops(name: str) -> float | None:
    """The card's dense bf16 peak (TFLOP/s) from its name; None for a card not in ``PEAK_BF16``."""
    upper = name.upper()
    return next((peak for key, peak in PEAK_BF16 if key in upper), None)
