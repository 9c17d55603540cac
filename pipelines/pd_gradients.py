"""How strongly each PD-loss form acts: the parameter-gradient norm of L_DM and of the PD term (Eq. 10) per band
of t, on the digits U-Net and on the CIFAR U-Net, a few steps into training.

    python -m pipelines.pd_gradients                          # both networks, about 10 minutes on 2 CPU cores
    python -m pipelines.pd_gradients --networks small --out pd_gradients.json

Method: build the preset's network on its data (the ``small`` network on Digits-LT; the ``cifar`` network on
Digits-LT resized to 32x32 RGB, a stand-in that runs offline: CIFAR itself is used with ``--cifar-root``), train
``--warm-steps`` steps of the default PD-CBDM objective, then for each t band draw ``--batches`` batches whose
main images and head/tail pairs all take t in that band, and take each term's gradient separately
(``pdcbdm.training.diagnostics``). The share is ||grad PD|| / ||grad L_DM|| averaged over the batches; the issue's
target for the default is 1% to 50% in every band below t = 700.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pdcbdm.config import Config, apply_overrides
from pdcbdm.data import ImageDataset, build_dataset
from pdcbdm.io import write_json_atomic
from pdcbdm.presets import preset
from pdcbdm.training import Trainer
from pdcbdm.training.diagnostics import term_gradient_norms

BANDS = ((0, 100), (100, 400), (400, 700), (700, 1000))
FORMS = {  # label: (pd_form, pd_weight, pd_scale)
    "old default (saturating, 0.01, s=1)": ("saturating", 0.01, 1.0),
    "plain (0.01)": ("plain", 0.01, 1.0),
}


def forms(default: Config) -> dict[str, tuple[str, float, float]]:
    loss = default.loss
    return {f"new default ({loss.pd_form}, {loss.pd_weight:g}, m={loss.pd_scale:g})":
            (loss.pd_form, loss.pd_weight, loss.pd_scale), **FORMS}


def stand_in_cifar(cfg: Config) -> ImageDataset:
    """Digits-LT resized to 32x32 with three channels: the CIFAR U-Net's input shape, offline."""
    data = build_dataset("digits-lt", imbalance=cfg.data.imbalance, seed=cfg.data.seed,
                         image_size=cfg.data.image_size)
    images = F.interpolate(data.images.float(), size=(32, 32), mode="bilinear", align_corners=False)
    return ImageDataset(images.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1), data.labels,
                        list(data.class_names), hflip=False)


def network_config(name: str, args: argparse.Namespace) -> tuple[Config, ImageDataset]:
    if name == "small":
        cfg = apply_overrides(preset("digits"), {"train.batch_size": args.batch, "train.precision": "fp32"})
        return cfg, build_dataset("digits-lt", imbalance=cfg.data.imbalance, seed=cfg.data.seed,
                                  image_size=cfg.data.image_size)
    cfg = apply_overrides(preset("cifar10-lt"), {"train.batch_size": args.cifar_batch, "train.precision": "fp32",
                                                "data.imbalance": 50.0})
    if args.cifar_root:
        cfg = apply_overrides(cfg, {"data.root": args.cifar_root, "data.imbalance": 100.0})
        return cfg, build_dataset("cifar10-lt", root=args.cifar_root, imbalance=100.0)
    return cfg, stand_in_cifar(cfg)


def band_draw(lo: int, hi: int):
    return lambda n, g: torch.randint(lo, hi, (n,), generator=g)


def measure(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows (network, form, band, grad_dm, grad_pd, share) for one network."""
    cfg, data = network_config(name, args)
    trainer = Trainer(cfg, data)
    for _ in range(args.warm_steps):
        trainer.train_step()
    rows = []
    for label, (form, weight, scale) in forms(cfg).items():
        loss = dataclasses.replace(cfg.loss, pd_form=form, pd_weight=weight, pd_scale=scale)
        for lo, hi in BANDS:
            gen = torch.Generator().manual_seed(1000 + lo)
            got = [term_gradient_norms(trainer.net, trainer.diffusion, trainer.next_batch(), loss,
                                       label_probs=trainer.label_probs, null_label=trainer.num_classes,
                                       generator=gen, draw_t=band_draw(lo, hi)) for _ in range(args.batches)]
            mean = {k: sum(g[k] for g in got) / len(got) for k in ("grad_dm", "grad_pd", "pd_grad_share")}
            rows.append({"network": name, "form": label, "band": f"{lo}-{hi}", **mean})
            print(f"{name:6s} {label:40s} t {lo:4d}-{hi:<4d} |grad L_DM| {mean['grad_dm']:.3g}  "
                  f"|grad PD| {mean['grad_pd']:.3g}  share {mean['pd_grad_share']:.3g}", flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| network | form | t band | grad L_DM | grad PD | PD / L_DM |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['network']} | {r['form']} | {r['band']} | {r['grad_dm']:.3g} | {r['grad_pd']:.3g} | "
              f"{r['pd_grad_share']:.3g} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.pd_gradients", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", default="small,cifar", help="comma-separated: small, cifar (default: both)")
    p.add_argument("--warm-steps", type=int, default=30, help="training steps before measuring (default 30)")
    p.add_argument("--batches", type=int, default=3, help="batches averaged per band and form (default 3)")
    p.add_argument("--batch", type=int, default=16, help="main batch of the small network (default 16)")
    p.add_argument("--cifar-batch", type=int, default=8, help="main batch of the cifar network (default 8)")
    p.add_argument("--cifar-root", default=None, help="CIFAR folder: measure the cifar network on CIFAR10-LT")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.networks.split(",") if n.strip()]
    bad = [n for n in names if n not in ("small", "cifar")]
    if bad:
        print(f"error: --networks takes small and/or cifar, got {bad}", file=sys.stderr)
        return 2
    rows = [row for name in names for row in measure(name, args)]
    print("\n" + markdown(rows))
    if args.out:
        write_json_atomic(Path(args.out), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
