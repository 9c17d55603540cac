"""The ``options`` step: each ``train.gpu_options`` variant timed against none, in rounds of alternating
order, and the process-wide flags each variant sets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pdcbdm.config import GPU_OPTIONS
from pdcbdm.training import Trainer
from pipelines.gpu_check.context import Check, result, timed
from pipelines.gpu_check.train import _warm_up


# ------------------------------------------------------------------------------------------------ options
@dataclass
class OptionRun:
    """One variant of ``train.gpu_options``: its trainer and the img/s of each timed span."""

    label: str
    options: tuple[str, ...]
    trainer: Any
    first_step_s: float
    step_s: float
    img_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def option_variants(check: Check) -> tuple[list[tuple[str, tuple[str, ...]]], dict[str, str]]:
    """([(label, options)], {option: why it is not timed}): none, each option, and all of those timed together."""
    skipped: dict[str, str] = {}
    if check.cfg().train.precision != "bf16":
        skipped["bf16_groupnorm"] = "bf16 autocast only (this run trains in fp32)"
    if not check.cuda:
        skipped.update(tf32="CUDA only", cudnn_benchmark="CUDA only")
        if check.args.quick:
            skipped["compile"] = "compiling the U-Net takes minutes on a CPU (leave out --quick to time it)"
    names = [name for name in GPU_OPTIONS if name not in skipped]
    variants = [("none", ())] + [(name, (name,)) for name in names]
    if len(names) > 1:
        variants.append(("all", tuple(names)))
    return variants, skipped


@contextlib.contextmanager
def process_flags(options: tuple[str, ...], defaults: dict[str, bool]) -> Iterator[None]:
    """The process-wide flags exactly as ``options`` set them (the trainers of other variants live in the same
    process and set them on construction), back to ``defaults`` after."""
    _set_flags(defaults)
    if "tf32" in options:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "cudnn_benchmark" in options:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        _set_flags(defaults)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 matmuls and convolutions in full fp32 inside, the flags as they were after."""
    before = _flags()
    _set_flags({**before, "matmul_tf32": False, "cudnn_tf32": False})
    try:
        yield
    finally:
        _set_flags(before)


def _flags() -> dict[str, bool]:
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "benchmark": torch.backends.cudnn.benchmark}


def _set_flags(flags: dict[str, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]
    torch.backends.cudnn.benchmark = flags["benchmark"]


def step_options(check: Check) -> dict[str, Any]:
    """Each ``train.gpu_options`` variant's img/s, in rounds of alternating order; which is fastest."""
    variants, skipped = option_variants(check)
    defaults = _flags()
    runs: list[OptionRun] = []
    try:
        for label, options in variants:
            with process_flags(options, defaults):
                trainer = Trainer(check.cfg(f"train.gpu_options={','.join(options)}"), check.dataset(),
                                  device=check.device)
                _, first = timed(check, trainer.advance)  # compile: the compilation
                # the warm-ups together take at most half of the step's share
                until = 0.5 * (len(runs) + 1) / len(variants)
                step_s = _warm_up(check, trainer, check.sizes.warmup - 1, until) if check.sizes.warmup > 1 else first
            runs.append(OptionRun(label, options, trainer, first, step_s))
            check.say(f"{label}: built and warmed up (first step {first:.2f}s, then {step_s * 1e3:.1f} ms)")
        rounds, steps = _option_plan(check, runs)
        for r in range(rounds):
            for run in (runs if r % 2 == 0 else runs[::-1]):
                _timed_span(check, run, steps, defaults, seed=1000 + r)
            check.say(f"round {r + 1}: " + ", ".join(f"{run.label} {run.img_s[-1]:,.0f}" for run in runs) + " img/s")
        return _options_result(runs, skipped, rounds, steps)
    finally:
        _set_flags(defaults)
        if any("compile" in options for _, options in variants):
            torch._dynamo.reset()  # the compiled graphs of the variants
        runs.clear()


def _timed_span(check: Check, run: OptionRun, steps: int, defaults: dict[str, bool], seed: int) -> None:
    """``steps`` steps of one variant under its flags: img/s, and the window's loss (NonFiniteLossError if a step
    diverged). Every variant's trainer has the same seed and step, and the global RNG (dropout) is seeded alike
    before each span, so the losses differ by the variants' numerics (a compiled network draws its dropout
    otherwise)."""
    torch.manual_seed(seed)
    with process_flags(run.options, defaults):
        _, seconds = timed(check, lambda: [run.trainer.advance() for _ in range(steps)])
    run.img_s.append(steps * run.trainer.cfg.train.batch_size / seconds)
    run.losses.append(run.trainer.take_window()["loss"])


def _option_plan(check: Check, runs: list[OptionRun]) -> tuple[int, int]:
    """(rounds, steps per span) that fit the step's time left: ``option_rounds`` rounds when each span can have
    at least its fewest steps, fewer rounds otherwise."""
    fewest, most = check.sizes.option_steps
    left = check.left_in_step()
    per_round = sum(run.step_s for run in runs) or 1e-9
    for rounds in range(check.sizes.option_rounds, 0, -1):
        steps = int(left / rounds / per_round)
        if steps >= fewest:
            return rounds, min(most, steps)
    return 1, fewest


def _options_result(runs: list[OptionRun], skipped: dict[str, str], rounds: int, steps: int) -> dict[str, Any]:
    base, base_loss = _median(runs[0].img_s), sum(runs[0].losses) / len(runs[0].losses)
    rows = [{"variant": run.label, "img_s": run.img_s, "median_img_s": _median(run.img_s),
             "vs_none": _median(run.img_s) / base, "first_step_s": run.first_step_s, "losses": run.losses,
             "loss_vs_none": sum(run.losses) / len(run.losses) / base_loss - 1.0} for run in runs]
    best = max(rows, key=lambda row: row["median_img_s"])
    table = format_option_table(rows, rounds, steps)
    print(table, flush=True)
    return result("PASS", f"fastest: {best['variant']} ({best['vs_none']:.2f}x no option, {best['median_img_s']:,.0f} "
                  f"img/s); {rounds} round(s) of {steps} step(s) per variant"
                  + (f"; not timed: {', '.join(f'{k} ({v})' for k, v in skipped.items())}" if skipped else ""),
                  rows=rows, rounds=rounds, steps_per_span=steps, fastest=best["variant"], not_timed=skipped,
                  table=table)


def format_option_table(rows: list[dict[str, Any]], rounds: int, steps: int) -> str:
    """The img/s of each variant and round, the median, the ratio to no option, the first step (a compiled
    network's compilation) and the mean loss of the spans relative to no option's (same data, same draws)."""
    lines = [f"  {'variant':<16} {'img/s per round':<30} {'median':>9} {'vs none':>8} {'first step':>11} "
             f"{'loss vs none':>13}"]
    for row in rows:
        spans = ", ".join(f"{v:,.0f}" for v in row["img_s"])
        lines.append(f"  {row['variant']:<16} {spans:<30} {row['median_img_s']:>9,.0f} {row['vs_none']:>7.2f}x "
                     f"{row['first_step_s']:>10.2f}s {row['loss_vs_none']:>+12.2%}")
    note = ("one span per variant is a single measurement: rerun, or give more --minutes, for a spread"
            if rounds == 1 else f"{rounds} rounds in alternating order: the spread is the rounds' range")
    return "\n".join([*lines, f"  ({steps} step(s) per span; {note})"])


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
