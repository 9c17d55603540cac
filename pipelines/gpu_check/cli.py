"""Is this machine ready to train and evaluate PD-CBDM? One command, no internet, PASS/FAIL/SKIP lines and a JSON.

    python -m pipelines.gpu_check                         # every GPU step in about 9 minutes (--minutes)
    python -m pipelines.gpu_check --device cpu --quick    # tiny sizes on the CPU, about a minute (the test suite)
    python -m pipelines.gpu_check --only train,options --steps 400 --out runs/gpu-check.json

Steps, in order (``--only`` picks some; each needs nothing from another, the data are written when first needed):
  env         torch, CUDA, cuDNN, NCCL, the GPUs, their dense bf16 peak, the driver, which optional packages import.
  data        fake CIFAR-10 files in torchvision's layout at the real size (50,000 + 10,000 images), read back as
              cifar10-lt (rho 100: 12,406 images) through the project's reader.
  train       the ``cifar10-lt`` preset's network and loss in its precision (bf16 on a GPU): ``Trainer.advance`` timed
              over ``--steps`` steps (about 200) with one synchronisation at the end: training img/s, peak memory,
              FLOPs per step (``FlopCounterMode``) and their share of the card's bf16 peak, host round trips per
              step (``HostSyncCounter``; on CUDA also the device's own count, ``set_sync_debug_mode``).
  options     ``train.gpu_options``: no option, each one and all together, each timed in short spans, in rounds
              of alternating order when time allows (one span is one measurement; the rounds give a spread), with
              each variant's loss over the spans beside no option's (same data and draws: bf16_groupnorm's cost).
  rng         per-rank RNG: two ranks simulated in one process keep their own seeded dropout stream through the
              Trainer's construction and share the batch draws.
  sample      DDIM-100 (the preset's sampler) and the paper's DDPM-1000 at the evaluation batch: seconds per image,
              and the sampling time of one guidance value's final evaluation (10k samples).
  pt2_graph   the network exported with ``torch.export`` on the CPU (the graph an MLflow pt2 model holds), moved to
              the device and run there: the graph must name no device.
  pt2_logged  (MLflow) a model logged by ``tune.mlflow_model.log_ema_model``, loaded as ``pipelines.evaluate``
              loads it, sampled on the device.
  metrics     every metric of one final evaluation at its real size (10k x 2048 features against 50k,
              ``pipelines.benchmark.metrics_job``) and the Inception features of the samples (torch-fidelity).
  search      (Ray, MLflow, Optuna) a 1-trial ``tune/search.py`` on the GPU, and a 2-worker nccl trial where two GPUs
              exist; on the CPU with ``--quick`` only with ``--search`` (it takes minutes).
  targets     the issue's targets, judged on an H100/H200 in bf16 without ``--quick``: training >= 2,000 img/s;
              one guidance value's paper-protocol evaluation (sampling, features, metrics) under 15 minutes.

Rules. A step whose packages do not import is SKIPped, saying which. A step that raises is a FAIL with its error,
and the next step runs. Each step gets a share of the time budget (``--minutes``) and scales its work down to fit
(fewer steps, a shorter schedule extrapolated to the full one: the JSON says when). The exit status is 0 when no
step FAILed, else 1. The JSON (``--out``, written atomically) has every step's figures; a summary of it is printed.
Optional packages (Ray, MLflow, Optuna, torch-fidelity) are imported only inside the steps that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pdcbdm.io import write_json_atomic
from pipelines.gpu_check.budget import FULL, QUICK, STEPS, Budget
from pipelines.gpu_check.context import Check, result
from pipelines.gpu_check.report import _out_path, _plain, summarise
from pipelines.gpu_check.runner import run_check


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every option explains itself in --help."""
    p = argparse.ArgumentParser(prog="python -m pipelines.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when torch sees it, else the CPU with --quick), cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a width-8 network, 2 steps, small batches)")
    p.add_argument("--minutes", type=float, default=None, help="time budget (default 9; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 200; --quick 2)")
    p.add_argument("--only", default=None, help=f"comma-separated steps to run (default all): {', '.join(STEPS)}")
    p.add_argument("--search", action="store_true", help="run the search step on the CPU with --quick too")
    p.add_argument("--out", default="runs/gpu-check.json", help="the JSON report (default runs/gpu-check.json)")
    p.add_argument("--work", default=None, help="scratch folder (fake data, models, search); default a temporary "
                   "folder, removed at the end")
    return p


def _steps_of(spec: str | None) -> list[str]:
    if not spec:
        return list(STEPS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        raise SystemExit(f"--only: unknown step(s) {', '.join(unknown)}; valid: {', '.join(STEPS)}")
    return [s for s in STEPS if s in names]


def _device(spec: str) -> tuple[torch.device, bool]:
    """(the device, whether a CUDA device that was asked for is missing)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), False
    device = torch.device(spec)
    missing = device.type == "cuda" and not torch.cuda.is_available()
    return device, missing


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; 0 when no step FAILed, else 1."""
    args = build_parser().parse_args(argv)
    names = _steps_of(args.only)
    device, no_device = _device(args.device)
    if args.device == "auto" and device.type == "cpu" and not args.quick:
        print("no CUDA device: the CPU runs the --quick sizes (--device cpu without --quick: the real sizes, hours)",
              flush=True)
        args.quick = True
    args.minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 9.0)
    if device.type == "cuda" and device.index is not None and not no_device:
        torch.cuda.set_device(device)
    threads = torch.get_num_threads()
    try:
        if device.type == "cpu" and args.quick:
            # tiny tensors: on a busy CPU a second thread's hand-offs cost more than it computes
            torch.set_num_threads(1)
        summary, results = _check_all(args, names, device, no_device)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (the tests)
    path = write_json_atomic(_out_path(args.out), _plain({"summary": summary, "steps": results}))
    print(json.dumps(_plain(summary), indent=1), flush=True)
    print(f"all figures: {path}", flush=True)
    return 0 if summary["ok"] else 1


def _check_all(args: argparse.Namespace, names: list[str], device: torch.device,
               no_device: bool) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(summary, every step's result) of the steps ``names`` in a scratch folder."""
    with _work_folder(args.work) as work:
        check = Check(args, device, QUICK if args.quick else FULL, work, Budget(60.0 * args.minutes))
        print(f"pdcbdm GPU check on {device}{' (quick)' if args.quick else ''}: {', '.join(names)}; budget "
              f"{args.minutes:g} min; scratch {work}", flush=True)
        first: dict[str, dict[str, Any]] = {}
        if no_device:
            first["env"] = result("FAIL", f"--device {args.device}: torch sees no CUDA device", no_device=True)
            print(f"FAIL env: {first['env']['reason']}", flush=True)
        results = run_check(check, [n for n in names if n not in first], first)
        return summarise(check, results), results


@contextlib.contextmanager
def _work_folder(spec: str | None) -> Iterator[Path]:
    if spec:
        Path(spec).mkdir(parents=True, exist_ok=True)
        yield Path(spec).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="pdcbdm-gpucheck-") as tmp:
        yield Path(tmp)
