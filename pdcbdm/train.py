"""Single-process training for users and tests.

    python -m pdcbdm.train --preset smoke --out runs/smoke
    python -m pdcbdm.train --preset digits --steps 3000 --set loss.pd_weight=0.05 --set model.tsa_resolutions=8 --out D
    python -m pdcbdm.train --preset own32 --set data.root=PREPARED --out D     # your own images, prepared at 32 px

Writes into ``--out``: ``config.json`` (the resolved config), ``checkpoint.pt`` (network, EMA, optimiser, step,
config), ``samples.png`` (EMA samples, a row per class), ``metrics.json`` (loss terms over time) and ``loss.png``.
Re-running with the same ``--out`` resumes from the checkpoint (a longer ``--steps`` continues it); a checkpoint
trained under another config is refused, naming the fields, unless ``--overwrite`` starts again from step 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from pdcbdm.config import ALLOW_LARGE_FLAG, Config, ConfigError, apply_overrides, check_ceilings
from pdcbdm.data import ImageDataset, build_dataset
from pdcbdm.io import write_json_atomic
from pdcbdm.models import check_network_size
from pdcbdm.presets import PRESETS, preset
from pdcbdm.progress import tqdm
from pdcbdm.sampling import generate
from pdcbdm.training import Trainer, resolve_device
from pdcbdm.training.checkpoint import CheckpointError, config_differences, load_checkpoint
from pdcbdm.viz import class_rows, save_curves, save_grid

LOSS_KEYS = ("loss", "dm", "cbdm", "pd", "pd_kl")


def load_data(cfg: Config) -> ImageDataset:
    """The training set a config names (a prepared set: memory-mapped, its shape and counts from _meta.json).

    Raises ConfigError naming ``model.network`` when an own-data U-Net (own32, own64, own128) meets images of
    another side, and what loading raises (FileNotFoundError, ValueError naming the folder or field)."""
    data = build_dataset(cfg.data.dataset, root=cfg.data.root, imbalance=cfg.data.imbalance, split="train",
                         seed=cfg.data.seed, download=cfg.data.download, image_size=cfg.data.image_size)
    try:
        check_network_size(cfg.model.network, data.image_shape[1])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return data


def sample_grid(trainer: Trainer, path: Path, per_class: int = 8, progress: bool = False) -> Path:
    """EMA samples with the config's sampler and guidance, one row per class (at most 20 rows)."""
    cfg = trainer.cfg
    k = min(trainer.num_classes, 20)
    labels = class_rows(per_class, k).to(trainer.device)
    images = generate(trainer.ema.module, trainer.diffusion, labels, tuple(trainer.dataset.image_shape),
                      sampler=cfg.sample.sampler, steps=cfg.sample.steps, guidance=cfg.sample.guidance,
                      eta=cfg.sample.eta, null_label=trainer.num_classes, seed=cfg.train.seed, progress=progress,
                      autocast=trainer.autocast)
    scale = max(1, 64 // images.shape[-1])
    return save_grid(images, path, nrow=per_class, scale=scale)


def train(cfg: Config, out: str | Path, *, progress: bool = True, data: ImageDataset | None = None) -> dict[str, Any]:
    """Train (resuming from ``out/checkpoint.pt`` if present) and write the run's outputs; returns the summary.
    ``data``: the training set when the caller loaded it (``load_data(cfg)`` otherwise)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    trainer = Trainer(cfg, load_data(cfg) if data is None else data, device=device)
    cfg.save_json(out / "config.json")
    ckpt = out / "checkpoint.pt"
    history: list[dict[str, float]] = []
    if ckpt.exists():
        trainer.load(ckpt)
        old = out / "metrics.json"
        if old.exists():
            history = [r for r in json.loads(old.read_text()).get("history", []) if r["step"] <= trainer.step]
    start = time.perf_counter()
    bar = tqdm(total=cfg.train.steps, initial=trainer.step, desc="train", disable=not progress)
    while trainer.step < cfg.train.steps:
        trainer.advance()
        bar.update(1)
        if trainer.step % cfg.train.log_every == 0 or trainer.step == cfg.train.steps:
            values = trainer.take_window()  # the means since the last read; raises for a diverged step
            history.append({"step": trainer.step, **values})
            bar.set_postfix(loss=f"{values['loss']:.4f}", dm=f"{values['dm']:.4f}")
    bar.close()
    elapsed = time.perf_counter() - start
    trainer.save(ckpt)
    sample_grid(trainer, out / "samples.png", progress=progress)
    save_curves(history, LOSS_KEYS, out / "loss.png", title=f"{cfg.data.dataset} training")
    summary = {"steps": trainer.step, "train_seconds": elapsed, "history": history,
               "class_counts": trainer.counts, "head_classes": list(trainer.split.head),
               "tail_classes": list(trainer.split.tail), "device": str(device),
               "precision": trainer.precision}
    write_json_atomic(out / "metrics.json", summary)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pdcbdm.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke", choices=list(PRESETS),
                   help="named configuration: smoke (a quick plumbing check), digits (the embedded default), "
                        "cifar10-lt / cifar100-lt (the paper's network; GPUs), own32 / own64 / own128 (your own "
                        "data prepared at that side: --set data.root=D). Default: smoke")
    p.add_argument("--steps", type=int, default=None, help="training steps (overrides train.steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set loss.pd_weight=0.05 (repeatable)")
    p.add_argument("--out", required=True, help="output folder (created; an existing checkpoint there is resumed)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="start again from step 0 when --out holds a checkpoint of another config (else refused)")
    p.add_argument(ALLOW_LARGE_FLAG, dest="allow_large", action="store_true",
                   help="accept sizes above their ceilings (pdcbdm.config.CEILINGS: diffusion.timesteps 10,000, "
                        "train.batch_size 8,192, ...)")
    return p.parse_args(argv)


def check_out(cfg: Config, out: Path, overwrite: bool) -> None:
    """Refuse to continue a checkpoint in ``out`` trained under another config (beyond ``RESUMABLE_FIELDS``), or
    with ``overwrite`` remove it and its metrics so that training starts again from step 0."""
    ckpt = out / "checkpoint.pt"
    if not ckpt.exists():
        return
    differences = config_differences(load_checkpoint(ckpt)["config"], cfg.to_dict())
    if not differences:
        return
    if not overwrite:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise ConfigError(f"--out {out} holds a checkpoint trained under another config ({shown}); choose another "
                          f"--out, or pass --overwrite to train from step 0 there")
    for name in ("checkpoint.pt", "metrics.json"):
        (out / name).unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = preset(args.preset)
        overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
        cfg = apply_overrides(cfg, overrides)
        check_ceilings(cfg, args.allow_large)
        data = load_data(cfg)  # a missing or mismatched data set fails here with its reason, not a traceback
        check_out(cfg, Path(args.out), args.overwrite)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = train(cfg, args.out, progress=not args.no_progress, data=data)
    last = summary["history"][-1] if summary["history"] else {}
    print(f"trained {summary['steps']} steps ({summary['precision']}) in {summary['train_seconds']:.1f}s; "
          f"final loss {last.get('loss', float('nan')):.4f}")
    print(f"wrote {Path(args.out) / 'checkpoint.pt'}, samples.png, metrics.json, loss.png, config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
