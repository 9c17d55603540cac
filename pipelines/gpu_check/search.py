"""The ``search`` step: a 1-trial ``tune/search.py`` (and a 2-worker nccl trial with two GPUs)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pdcbdm.data.fake_cifar import write_fake_cifar10
from pipelines.gpu_check.budget import PRESET, ROOT, SEARCH_MIN_S
from pipelines.gpu_check.context import Check, missing_packages, result, skip_for_packages


# ------------------------------------------------------------------------------------------------- search
def step_search(check: Check) -> dict[str, Any]:
    """A 1-trial ``tune/search.py`` as a subprocess on the GPU (and a 2-worker nccl trial with two GPUs); its
    trial must complete with a finite FID."""
    if not check.cuda and check.args.quick and not check.args.search:
        return result("SKIP", "a search takes minutes on a CPU: pass --search to run it")
    skipped = skip_for_packages(("ray", "mlflow", "optuna", "pandas"), "tune/search.py needs them")
    if skipped:
        return skipped
    if check.cuda and missing_packages(("torch_fidelity",)):
        return result("SKIP", f"torch_fidelity not installed (the {PRESET} evaluation's Inception needs it)")
    if check.share < SEARCH_MIN_S and check.budget.left() < SEARCH_MIN_S:
        return result("SKIP", f"{check.budget.left():.0f}s of the budget left, a search needs about "
                      f"{SEARCH_MIN_S:.0f}s (give more --minutes)")
    workers = [1, 2] if check.cuda and check.facts.get("n_gpus", 0) >= 2 else [1]
    trials = {}
    for n in workers:
        trials[n] = _one_search(check, n, timeout=max(SEARCH_MIN_S, check.left_in_step() / len(workers)))
        check.say(trials[n]["text"])
    ok = all(t["ok"] for t in trials.values())
    return result("PASS" if ok else "FAIL", "; ".join(t["text"] for t in trials.values()),
                  trials={str(k): v for k, v in trials.items()})


def _search_command(check: Check, workers: int) -> tuple[list[str], Path]:
    """The search's command line and its ``--out`` folder: the preset at a tiny budget on the GPU, the smoke
    preset on the CPU."""
    out = check.work / f"search{workers}"
    shutil.rmtree(out, ignore_errors=True)
    if check.cuda:
        sets = [f"data.root={_search_data(check)}", "train.steps=100", "train.eval_every=50", "train.log_every=25",
                "train.warmup=10", "eval.num_samples=200", "eval.proxy_samples=100", "eval.batch_size=200",
                "eval.guidance_grid=1.2", "sample.steps=10", "eval.noise_error_images=8", *_inception_sets(check)]
        name, gpus = PRESET, "1"
    else:
        sets, name, gpus = ["train.steps=40", "train.eval_every=20", "train.log_every=10"], "smoke", "0"
    cmd = [sys.executable, str(ROOT / "tune" / "search.py"), "--preset", name, "--trials", "1", "--no-asha",
           "--name", f"gpucheck{workers}", "--out", str(out), "--gpus-per-worker", gpus, "--workers-per-trial",
           str(workers)]
    return cmd + [part for item in sets for part in ("--set", item)], out


def _search_data(check: Check) -> Path:
    """A smaller fake CIFAR-10 for the search (500 + 100 images a class): its reference and floors stay quick."""
    root = check.work / "cifar-search"
    if not (root / "cifar-10-batches-py" / "batches.meta").is_file():
        write_fake_cifar10(root, 500, 100, seed=1)
    return root


def _inception_sets(check: Check) -> list[str]:
    """``eval.inception_weights`` of random weights when none are found offline (the scores are meaningless, the
    plumbing and the timing are real); nothing when the FID Inception's weights are here."""
    # deferred: torch-fidelity is optional here (step_search skips on a GPU without it); this module needs it
    from pdcbdm.metrics.inception import build_inception_module, resolve_inception_weights

    try:
        resolve_inception_weights(None, allow_download=False)
        return []
    except (FileNotFoundError, ValueError):
        path = check.work / "random-inception.pth"
        torch.manual_seed(0)
        torch.save(build_inception_module(("2048", "logits_unbiased")).state_dict(), path)
        check.say(f"no FID Inception weights offline: random ones at {path} (meaningless scores, real plumbing)")
        return [f"eval.inception_weights={path}"]


def _one_search(check: Check, workers: int, timeout: float) -> dict[str, Any]:
    cmd, out = _search_command(check, workers)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDCBDM_OFFLINE": "1", "PDCBDM_CACHE": str(check.work / "cache")}
    check.say(f"{workers} worker(s): tune/search.py (timeout {timeout:.0f}s)")
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "text": f"{workers}-worker search not finished within {timeout:.0f}s"}
    wall = time.monotonic() - t0
    (check.work / f"search{workers}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    table = out / "searches" / f"gpucheck{workers}" / "trials.parquet"
    if proc.returncode != 0 or not table.is_file():
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
        return {"ok": False, "wall_s": wall, "text": f"{workers}-worker search exited {proc.returncode} after "
                f"{wall:.0f}s; last stderr line: {last}"}
    import pandas as pd  # deferred: optional here (step_search skips without it)

    row = pd.read_parquet(table).iloc[0]
    fid = float(row["fid"]) if row.get("fid") is not None else float("nan")
    ok = row["status"] == "completed" and math.isfinite(fid)
    return {"ok": ok, "wall_s": wall, "status": str(row["status"]), "fid": fid,
            "text": f"{workers}-worker trial {row['status']} in {wall:.0f}s (FID {fid:.1f} on fake data)"}
