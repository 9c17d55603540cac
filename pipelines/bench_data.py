"""Memory and start-up of training on a prepared data set: the ``data`` section of ``pipelines.benchmark``.

    python -m pipelines.benchmark --sections data                       # 100k x 64 px RGB: 1.2 GB as uint8
    python -m pipelines.benchmark --sections data --data-images 20000 --data-dir /big/disk/bench-data

A synthetic long-tailed prepared folder (``--data-images`` RGB images at ``--data-size`` px, 10 classes, rho 10,
2% held out per class) is written once (``--data-dir``, kept and reused when complete; by default a temporary
folder removed afterwards). Then fresh worker processes, each as a trial's worker starts, run
``python -m pipelines.bench_data --worker``: import, ``pdcbdm.train.load_data`` of an own-data config (timed: the
data load), one batch, a few real ``Trainer`` steps of the own U-Net of that size at width 8 (the network's size
is not what is measured), then a sweep that gathers every image once in batches (an epoch's page touches). Each
reports its anonymous resident memory (``RssAnon``: what the process adds to the node) and its file-backed
resident memory (``RssFile``: the page cache, one copy per node however many processes map it) at each stage.

Runs: one worker alone, first with the array evicted from the page cache (``posix_fadvise DONTNEED``: a cold
start from disk) and then warm; then ``--data-workers`` workers at once. The digest a run records (and the cluster
check compares) is read from _meta.json and timed against hashing the whole array.

Targets (the issue's): a worker's data load under 5 s; each of the concurrent workers adds under 10% of the array
to the node's memory (its RssAnon growth from before the load to after the sweep); no step copies the whole array.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pdcbdm.config import apply_overrides
from pdcbdm.presets import preset

__all__ = ["write_synthetic_prepared", "worker_main", "run_data_section", "data_tables", "TARGET_LOAD_S",
           "TARGET_SHARE"]

TARGET_LOAD_S = 5.0
TARGET_SHARE = 0.10
NUM_CLASSES = 10
RHO = 10.0
HELDOUT_SHARE = 0.02


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _memory() -> dict[str, float]:
    return {"anon_mb": _status_mb("RssAnon"), "file_mb": _status_mb("RssFile")}


def _class_counts(n: int) -> list[int]:
    """Long-tailed counts n_k proportional to rho^(-k/(K-1)) summing to n."""
    weights = RHO ** (-np.arange(NUM_CLASSES) / (NUM_CLASSES - 1))
    counts = np.floor(weights / weights.sum() * n).astype(int)
    counts[0] += n - counts.sum()
    return counts.tolist()


def _images(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """uint8 [N, 3, size, size]: a disc of the class's colour (the same in every split) at a random place and size
    (drawn with ``seed``) on a dark gradient."""
    colours = np.random.default_rng(NUM_CLASSES).integers(60, 256, (NUM_CLASSES, 3))
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    background = (x * (40 / size)).astype(np.uint8)
    out = np.empty((len(labels), 3, size, size), dtype=np.uint8)
    centres = rng.uniform(size / 4, 3 * size / 4, (len(labels), 2))
    radii = rng.uniform(size / 8, size / 4, len(labels))
    for i, k in enumerate(labels):
        disc = (y - centres[i, 0]) ** 2 + (x - centres[i, 1]) ** 2 < radii[i] ** 2
        out[i] = background
        out[i][:, disc] = colours[k][:, None]
    return out


def write_synthetic_prepared(root: Path, n: int, size: int) -> dict[str, Any]:
    """Write (or reuse, when complete with these settings) the synthetic prepared folder; its description."""
    # deferred: torch (1.7 s); this module's and pipelines.benchmark's --help answer without it
    from pdcbdm.data import head_tail_split
    from pdcbdm.data.prepared import is_prepared, read_prepared_meta, write_prepared_meta, write_split

    source = {"kind": "pipelines.bench_data", "version": 2, "images": n, "size": size}
    if is_prepared(root) and read_prepared_meta(root).get("source") == source:
        return {"prepare_s": None, "reused": True, **_sizes(root)}
    start = time.perf_counter()
    counts = _class_counts(n)
    held = [max(2, int(HELDOUT_SHARE * c)) for c in counts]
    names = [f"class{k}" for k in range(NUM_CLASSES)]
    split = head_tail_split(counts)
    entries = {}
    for i, (name, per_class) in enumerate({"train": counts, "heldout": held}.items()):
        labels = np.repeat(np.arange(NUM_CLASSES), per_class)
        entries[name] = write_split(root, name, _images(labels, size, seed=i), labels, names, split)
    write_prepared_meta(root, class_names=names, image_shape=(3, size, size), splits=entries,
                        transforms={"size": size}, source=source)
    return {"prepare_s": time.perf_counter() - start, "reused": False, **_sizes(root)}


def _sizes(root: Path) -> dict[str, Any]:
    array = root / "train" / "_images.npy"
    shards = sum(p.stat().st_size for p in (root / "train").glob("part-*.parquet"))
    return {"array_bytes": array.stat().st_size, "png_shard_bytes": shards}


def _evict(path: Path) -> bool:
    """Drop the file's clean pages from the page cache (no root needed), so the next reader starts cold."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def _own_config(root: Path, size: int, batch: int) -> Any:
    if size not in (32, 64, 128):
        raise ValueError(f"--data-size {size}: the own presets are sized 32, 64 and 128")
    return apply_overrides(preset(f"own{size}"), {"data.root": str(root), "model.ch": 8, "train.batch_size": batch,
                                                  "train.precision": "fp32", "train.device": "cpu"})


def worker_main(root: Path, size: int, steps: int, batch: int) -> dict[str, Any]:
    """One worker as a trial starts it: the stages of the module docstring, timed, with the memory after each."""
    # deferred: torch (1.7 s); this module's and pipelines.benchmark's --help answer without it
    import torch
    from pdcbdm.train import load_data
    from pdcbdm.training import Trainer

    torch.set_num_threads(1)
    cfg = _own_config(root, size, batch)
    before = _memory()
    start = time.perf_counter()
    data = load_data(cfg)
    load_s = time.perf_counter() - start
    loaded = _memory()
    start = time.perf_counter()
    data.batch(torch.randint(len(data), (batch,)))
    first_batch_s = time.perf_counter() - start
    trainer = Trainer(cfg, data)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    step_s = (time.perf_counter() - start) / max(steps, 1)
    stepped = _memory()
    start = time.perf_counter()
    for chunk in torch.randperm(len(data)).split(256):
        data.batch(chunk)
    sweep_s = time.perf_counter() - start
    swept = _memory()
    # what the data cost this process in private memory: the load, and the sweep over every image after the steps
    data_anon = (loaded["anon_mb"] - before["anon_mb"]) + (swept["anon_mb"] - stepped["anon_mb"])
    return {"load_s": load_s, "first_batch_s": first_batch_s, "step_s": step_s, "sweep_s": sweep_s,
            "images": len(data), "before": before, "loaded": loaded, "stepped": stepped, "swept": swept,
            "data_anon_mb": data_anon, "total_anon_mb": swept["anon_mb"] - before["anon_mb"]}


def _meminfo_mb(key: str) -> float:
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _run_workers(root: Path, n: int, size: int, steps: int, batch: int) -> dict[str, Any]:
    """n worker processes at once; their reports, and the node's largest drop in MemAvailable meanwhile (noisy on
    a shared machine: other processes move it too)."""
    cmd = [sys.executable, "-m", "pipelines.bench_data", "--worker", "--root", str(root), "--size", str(size),
           "--steps", str(steps), "--batch", str(batch)]
    available = _meminfo_mb("MemAvailable")
    procs = [subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    lowest = available
    while any(p.poll() is None for p in procs):
        lowest = min(lowest, _meminfo_mb("MemAvailable"))
        time.sleep(0.2)
    reports = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            reports.append({"error": err.strip()[-2000:]})
            continue
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return {"workers": reports, "node_available_drop_mb": available - lowest}


def _digest_timing(root: Path) -> dict[str, float]:
    """Seconds to the data digest from _meta.json, against hashing the whole array (what it replaces)."""
    # deferred: torch (1.7 s); this module's and pipelines.benchmark's --help answer without it
    from pdcbdm.data.own import prepared_identity

    start = time.perf_counter()
    prepared_identity(root, "train")
    meta_s = time.perf_counter() - start
    array = np.load(root / "train" / "_images.npy", mmap_mode="r")
    flat = array.reshape(-1)
    start = time.perf_counter()
    digest = hashlib.sha256()
    for i in range(0, flat.size, 1 << 26):
        digest.update(flat[i:i + (1 << 26)])
    return {"meta_digest_s": meta_s, "hash_array_s": time.perf_counter() - start}


def _decode_timing(root: Path) -> dict[str, float]:
    """Seconds a worker would spend decoding the PNG shards instead (what the memory-mapped array saves it), and
    the private memory the decoded copy takes."""
    # deferred: torch (1.7 s); this module's and pipelines.benchmark's --help answer without it
    from pdcbdm.data import ParquetImageDataset

    before = _memory()["anon_mb"]
    start = time.perf_counter()
    decoded = ParquetImageDataset(root / "train", verify=False)
    seconds = time.perf_counter() - start
    grown = _memory()["anon_mb"] - before
    del decoded
    return {"decode_png_s": seconds, "decode_png_anon_mb": grown}


def _checks(array_bytes: int, runs: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the measurements (one row per worker and target)."""
    share_mb = TARGET_SHARE * array_bytes / 2 ** 20
    rows = []
    for run, result in runs.items():
        for i, w in enumerate(result["workers"]):
            if "error" in w:
                rows.append({"check": f"{run} worker {i}", "ok": False, "value": w["error"][:80]})
                continue
            rows.append({"check": f"{run} worker {i}: data load < {TARGET_LOAD_S:g} s", "value": w["load_s"],
                         "ok": w["load_s"] < TARGET_LOAD_S})
            rows.append({"check": f"{run} worker {i}: data adds < {share_mb:.0f} MB (10% of the array)",
                         "value": w["data_anon_mb"], "ok": w["data_anon_mb"] < share_mb})
    return rows


def run_data_section(runner: Any, s: Any) -> dict[str, Any]:
    """The section (``runner`` unused: the workers are fresh interpreters, as a trial's are)."""
    root = Path(s.data_dir) if s.data_dir else Path(tempfile.mkdtemp(prefix="pdcbdm-bench-data-"))
    try:
        print(f"[data] prepared set of {s.data_images} x {s.data_size} px RGB in {root}", file=sys.stderr, flush=True)
        written = write_synthetic_prepared(root, s.data_images, s.data_size)
        digest = {**_digest_timing(root), **(_decode_timing(root) if s.data_decode else {})}
        args = (root, 1, s.data_size, s.data_steps, s.data_batch)
        evicted = _evict(root / "train" / "_images.npy")
        runs = {"cold": _run_workers(*args), "warm": _run_workers(*args)}
        runs["concurrent"] = _run_workers(root, s.data_workers, s.data_size, s.data_steps, s.data_batch)
    finally:
        if not s.data_dir:
            shutil.rmtree(root, ignore_errors=True)
    return {"images": s.data_images, "size": s.data_size, "workers": s.data_workers, "evicted": evicted,
            **written, **digest, "runs": runs, "checks": _checks(written["array_bytes"], runs)}


def _value(value: Any) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def _decode_note(section: dict[str, Any]) -> str:
    if "decode_png_s" not in section:
        return ""
    return (f"; decoding the PNG shards instead: {section['decode_png_s']:.0f} s and "
            f"{section['decode_png_anon_mb']:,.0f} MB per worker")


def data_tables(section: dict[str, Any]) -> list[str]:
    """The per-worker rows and the target checks, as plain text."""
    mb = section["array_bytes"] / 2 ** 20
    lines = [f"Prepared data ({section['images']:,} x {section['size']} px RGB: array {mb:,.0f} MB, PNG shards "
             f"{section['png_shard_bytes'] / 2 ** 20:,.0f} MB; written in "
             f"{'-' if section['prepare_s'] is None else format(section['prepare_s'], '.0f')} s; digest from "
             f"_meta.json {section['meta_digest_s'] * 1e3:.1f} ms against {section['hash_array_s']:.1f} s hashing "
             f"the array)" + _decode_note(section),
             "data MB: the private memory the data added to the worker (load + sweep); trial MB: all it added (the "
             "training steps' network and activations included); file MB: its page-cache pages (shared)",
             f"{'run':<14}{'load s':>8}{'batch s':>9}{'step s':>8}{'sweep s':>9}{'data MB':>9}{'trial MB':>10}"
             f"{'file MB':>9}"]
    for name, run in section["runs"].items():
        for i, w in enumerate(run["workers"]):
            if "error" in w:
                lines.append(f"{name + ' ' + str(i):<14}error: {w['error'][:90]}")
                continue
            lines.append(f"{name + ' ' + str(i):<14}{w['load_s']:>8.3f}{w['first_batch_s']:>9.3f}{w['step_s']:>8.2f}"
                         f"{w['sweep_s']:>9.1f}{w['data_anon_mb']:>9.1f}{w['total_anon_mb']:>10.1f}"
                         f"{w['swept']['file_mb']:>9.0f}")
        lines.append(f"{'':<14}node MemAvailable drop during the run: {run['node_available_drop_mb']:,.0f} MB")
    lines += [f"{'ok ' if c['ok'] else 'MISS'} {c['check']}: {_value(c['value'])}" for c in section["checks"]]
    return ["\n".join(lines)]


def main(argv: list[str] | None = None) -> int:
    """``--worker``: run one worker and print its report as JSON (the section's subprocesses)."""
    p = argparse.ArgumentParser(prog="python -m pipelines.bench_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", required=True, help="run one worker (used by the section)")
    p.add_argument("--root", required=True, help="the prepared folder")
    p.add_argument("--size", type=int, required=True, help="its image side (32, 64 or 128)")
    p.add_argument("--steps", type=int, default=3, help="Trainer steps")
    p.add_argument("--batch", type=int, default=16, help="training batch")
    args = p.parse_args(argv)
    print(json.dumps(worker_main(Path(args.root), args.size, args.steps, args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
