"""The ``train`` step (img/s, peak memory, FLOPs and host round trips of ``Trainer.advance``) and the
``rng`` step (two simulated ranks' RNG streams)."""

from __future__ import annotations

import contextlib
import resource
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pdcbdm.training import Trainer
from pdcbdm.training.syncs import HostSyncCounter
from pipelines.gpu_check.budget import fit
from pipelines.gpu_check.context import Check, result, timed


# -------------------------------------------------------------------------------------------------- train
def step_train(check: Check) -> dict[str, Any]:
    """Throughput, memory, FLOPs and host round trips of ``Trainer.advance`` on the preset's network."""
    cfg = check.cfg()
    trainer = Trainer(cfg, check.dataset(), device=check.device)
    params = sum(p.numel() for p in trainer.net.parameters())
    check.say(f"{params / 1e6:.2f}M parameters, batch {cfg.train.batch_size}, {trainer.precision}, "
              f"{check.sizes.warmup} warm-up step(s)")
    step_s = _warm_up(check, trainer, check.sizes.warmup)
    steps = fit(check.args.steps or check.sizes.steps, step_s, check.left_in_step(0.6), least=2)
    speed = _timed_training(check, trainer, steps)
    check.say(f"{speed['img_s']:,.0f} img/s over {steps} steps")
    syncs = count_host_syncs(check, trainer, check.sizes.sync_steps)
    flops = count_flops(check, trainer, check.sizes.flop_steps, speed["step_s"])
    figures = {"parameters": params, "precision": trainer.precision, "batch": cfg.train.batch_size, **speed,
               **syncs, **flops}
    check.facts["train_img_s"] = speed["img_s"]
    bad = [f"{syncs['syncs_per_advance']:g} host round trip(s) per advance() ({syncs['sync_ops']})"
           ] if syncs["syncs_per_advance"] > 0 else []
    if syncs.get("device_syncs_per_advance"):
        bad.append(f"{syncs['device_syncs_per_advance']:g} synchronizing CUDA call(s) per advance()")
    text = (f"{speed['img_s']:,.0f} img/s ({speed['step_s'] * 1e3:.1f} ms/step, {steps} steps), peak "
            f"{_peak_text(speed)}, {flops['gflop_per_image']:.1f} GFLOP/image, "
            f"{_share_text(flops)} of the bf16 peak, host syncs per step {syncs['syncs_per_step']:.2g}"
            + (f" (device count {syncs['device_syncs_per_step']:.2g})" if "device_syncs_per_step" in syncs else "")
            + f", loss {speed['loss']:.4f}")
    return result("FAIL" if bad else "PASS", text + ("; " + "; ".join(bad) if bad else ""), **figures)


def _warm_up(check: Check, trainer: Any, steps: int, fraction: float = 0.3) -> float:
    """Run ``steps`` steps, fewer once ``fraction`` of the step's share is spent (a CPU at the real sizes); the
    seconds of the last one (the first pays for cuDNN's and the allocator's set-up)."""
    step_s = 0.0
    for i in range(max(1, steps)):
        _, step_s = timed(check, trainer.advance)
        if i and check.left_in_step(fraction) <= 0:
            break
    trainer.take_window()  # a diverged warm-up fails here, before anything is timed
    return step_s


def _timed_training(check: Check, trainer: Any, steps: int) -> dict[str, Any]:
    """img/s over ``steps`` calls of ``advance`` (one synchronisation at the end), peak memory, the window's loss."""
    if check.cuda:
        torch.cuda.reset_peak_memory_stats(check.device)

    def run() -> None:
        for _ in range(steps):
            trainer.advance()

    _, seconds = timed(check, run)
    window = trainer.take_window()  # NonFiniteLossError: a FAIL naming the step
    out = {"steps": steps, "seconds": seconds, "step_s": seconds / steps,
           "img_s": steps * trainer.cfg.train.batch_size / seconds, "loss": window["loss"]}
    if check.cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(check.device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(check.device) / 2**30
    else:
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def _peak_text(speed: dict[str, Any]) -> str:
    if "peak_allocated_gib" in speed:
        return f"{speed['peak_allocated_gib']:.2f} GiB allocated / {speed['peak_reserved_gib']:.2f} GiB reserved"
    return f"{speed['peak_rss_gib']:.2f} GiB resident (the process)"


def _share_text(flops: dict[str, Any]) -> str:
    share = flops.get("peak_share")
    return "n/a" if share is None else f"{share:.1%}"


def count_host_syncs(check: Check, trainer: Any, steps: int) -> dict[str, Any]:
    """Host round trips of ``steps`` calls of ``advance`` and of the one window read after them, by
    ``HostSyncCounter`` and, on CUDA, by the device's own check (``set_sync_debug_mode``)."""
    with _device_sync_warnings(check) as advance_warned, HostSyncCounter() as advance:
        for _ in range(steps):
            trainer.advance()
    with _device_sync_warnings(check) as read_warned, HostSyncCounter() as read:
        trainer.take_window()
    out: dict[str, Any] = {
        "sync_steps": steps, "syncs_per_advance": advance.total / steps, "window_read_syncs": read.total,
        "syncs_per_step": (advance.total + read.total) / steps, "sync_ops": dict(advance.ops + read.ops),
        "sync_kinds": dict(advance.kinds + read.kinds)}
    if check.cuda:
        out.update(device_syncs_per_advance=len(advance_warned) / steps, device_window_read_syncs=len(read_warned),
                   device_syncs_per_step=(len(advance_warned) + len(read_warned)) / steps)
    return out


@contextlib.contextmanager
def _device_sync_warnings(check: Check) -> Iterator[list[str]]:
    """The messages of the synchronizing CUDA calls made inside (CUDA's sync debug mode; nothing on the CPU)."""
    found: list[str] = []
    if not check.cuda:
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(0)
    found += [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


def count_flops(check: Check, trainer: Any, steps: int, step_s: float) -> dict[str, Any]:
    """FLOPs of a training step (forward, backward; averaged over ``steps``: label-dropped steps skip a pass),
    the throughput they make at ``step_s`` and its share of the card's bf16 peak."""
    with FlopCounterMode(display=False) as counter:
        for _ in range(steps):
            trainer.advance()
    trainer.take_window()
    per_step = counter.get_total_flops() / steps
    achieved = per_step / step_s / 1e12
    peak = check.facts.get("peak_tflops")
    return {"gflop_per_step": per_step / 1e9, "gflop_per_image": per_step / 1e9 / trainer.cfg.train.batch_size,
            "achieved_tflops": achieved, "peak_tflops": peak, "peak_share": achieved / peak if peak else None}


# ---------------------------------------------------------------------------------------------------- rng
def step_rng(check: Check) -> dict[str, Any]:
    """Two ranks of one run, simulated in this process as a worker seeds them (train.seed + rank): building the
    Trainer leaves each rank's global RNG as seeded, so their dropout streams differ, while the batch draws (the
    trainer's own generator) are the same on both (each rank keeps its rows of the global batch)."""
    cfg = check.cfg()
    kept, streams, batch_draws = [], [], []
    for rank in (0, 1):
        torch.manual_seed(cfg.train.seed + rank)
        before = _rng_state(check)
        trainer = Trainer(cfg, check.dataset(), device=check.device, rank=rank, world_size=2)
        kept.append(torch.equal(before, _rng_state(check)))
        streams.append(torch.nn.functional.dropout(torch.ones(4096, device=check.device), 0.5).cpu())
        batch_draws.append(trainer.generator.get_state())
    differ = not torch.equal(streams[0], streams[1])
    shared = torch.equal(batch_draws[0], batch_draws[1])
    ok = all(kept) and differ and shared
    where = "CUDA" if check.cuda else "CPU"
    return result("PASS" if ok else "FAIL",
                  f"each rank's {where} RNG kept through Trainer(): {all(kept)}; the ranks' dropout masks differ: "
                  f"{differ}; the batch draws agree: {shared}", rng_kept=kept, dropout_differs=differ,
                  batch_draws_shared=shared)


def _rng_state(check: Check) -> torch.Tensor:
    return torch.cuda.get_rng_state(check.device) if check.cuda else torch.get_rng_state()
