"""Sample quality against cost: time-to-quality curves of training, and samplers compared on one network.

    python -m pipelines.quality                                    # the digits preset, plain DDPM and PD-CBDM
    python -m pipelines.quality --variants ddpm --steps 2400 --every 600 \
        --samplers ddim:20:0,ddim:20:1,ddim:50:1,ddpm:1000 --ddpm-samples 100 --out runs/quality

Training curve: each variant trains on the preset's data; every ``--every`` steps its EMA network draws
``--samples`` images at w = ``eval.proxy_guidance`` with the preset's sampler and is scored by
``pdcbdm.evaluation.Evaluator`` (FID, head consistency, reject rate, each beside its real-vs-real floor at the same
count). Reported: the first step, and the training seconds spent to reach it (evaluations excluded), at which head
consistency reaches ``--consistency-target`` and FID reaches ``--fid-factor`` x its floor.
Sampler comparison: the last network of each variant is sampled with each ``--samplers`` entry (``ddim:S:ETA`` for
DDIM with S steps and that eta, ``ddpm:T`` for ancestral DDPM over all T steps), with the same labels and seed,
and scored the same way; the table gives FID, reject rate, consistency and the seconds per sample.
Writes quality.json, curves_VARIANT.png and one grid per sampler (samples_VARIANT_SAMPLER_wW.png) into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from pdcbdm.config import Config, ConfigError, apply_overrides
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.evaluation import Evaluator, evaluation_split
from pdcbdm.io import write_json_atomic
from pdcbdm.presets import preset
from pdcbdm.sampling import generate, uniform_labels
from pdcbdm.train import load_data
from pdcbdm.training import Trainer
from pdcbdm.viz import save_curves, save_grid

VARIANTS = {
    "ddpm": {"loss.cbdm_tau": 0.0, "loss.pd_weight": 0.0},
    "cbdm": {"loss.label_dist": "cbdm", "loss.pd_weight": 0.0, "model.tsa_resolutions": ""},
    "pd-cbdm": {},
}
CURVE_KEYS = ("fid", "consistency_head", "consistency_tail", "reject_rate")
SCORE_KEYS = (*CURVE_KEYS, "fid_head", "fid_tail", "kid", "kid_head", "kid_tail", "recall", "tail_to_head_confusion",
              "reject_rate_head", "reject_rate_tail")


def parse_sampler(spec: str) -> dict[str, Any]:
    """``ddim:S:ETA`` or ``ddpm:T`` to generate()'s keyword arguments plus a name."""
    parts = spec.strip().split(":")
    try:
        if parts[0] == "ddim" and len(parts) == 3:
            steps, eta = int(parts[1]), float(parts[2])
            return {"name": f"ddim{steps}-eta{eta:g}", "sampler": "ddim", "steps": steps, "eta": eta}
        if parts[0] == "ddpm" and len(parts) == 2:
            return {"name": f"ddpm{int(parts[1])}", "sampler": "ddpm", "steps": int(parts[1]), "eta": 1.0}
    except ValueError:
        pass
    raise ValueError(f"sampler {spec!r} must be ddim:STEPS:ETA (e.g. ddim:20:1) or ddpm:T (e.g. ddpm:1000)")


def _scores(evaluator: Evaluator, images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, Any]:
    metrics, _ = evaluator.score(images, labels, seed=seed)
    return {**{k: metrics.get(k) for k in SCORE_KEYS}, **{f"{k}_floor": metrics.get(f"{k}_floor") for k in SCORE_KEYS}}


def train_curve(cfg: Config, evaluator: Evaluator, *, every: int, samples: int,
                progress: bool) -> tuple[Trainer, list[dict]]:
    """Train ``cfg`` and score its EMA network every ``every`` steps; rows carry the training seconds so far, wall
    and this process's CPU time (on a machine shared with other jobs, the CPU time at one thread stays close to
    what the step costs on an idle machine; the wall time does not)."""
    trainer = Trainer(cfg, load_data(cfg))
    rows, train_s, cpu_s = [], 0.0, 0.0
    while trainer.step < cfg.train.steps:
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train_step()
        train_s += time.perf_counter() - start
        cpu_s += time.process_time() - cpu_start
        if trainer.step % every == 0 or trainer.step == cfg.train.steps:
            images, labels = evaluator.sample(trainer.ema.module, cfg.eval.proxy_guidance, samples,
                                              seed=cfg.train.seed, autocast=trainer.autocast)
            rows.append({"step": trainer.step, "train_seconds": train_s, "train_cpu_seconds": cpu_s,
                         **_scores(evaluator, images, labels, cfg.train.seed)})
            if progress:
                r = rows[-1]
                print(f"  step {r['step']:5d} ({train_s:6.0f} s): FID {r['fid']:.1f} (floor {r['fid_floor']:.1f}), "
                      f"head consistency {_f(r['consistency_head'])}, reject {_f(r['reject_rate'])}", flush=True)
    return trainer, rows


def _point(row: dict | None) -> dict[str, Any] | None:
    return None if row is None else {"step": row["step"], "train_seconds": row["train_seconds"],
                                     "train_cpu_seconds": row.get("train_cpu_seconds")}


def first_reaching(rows: list[dict], *, consistency: float, fid_factor: float) -> dict[str, Any]:
    """Where head consistency >= ``consistency`` and FID <= ``fid_factor`` x floor: the first row that meets each
    target (``head_consistency``, ``fid``), and the first row from which every later row meets it
    (``head_consistency_held``, ``fid_held``; None when the last row misses it). At a few hundred samples the FID
    of one network swings by a third between evaluations, so a first crossing alone overstates the progress."""
    tests = {"head_consistency": lambda r: (r["consistency_head"] or 0.0) >= consistency,
             "fid": lambda r: r["fid"] <= fid_factor * r["fid_floor"] if r["fid_floor"] else False}
    out: dict[str, Any] = {}
    for key, ok in tests.items():
        out[key] = _point(next((r for r in rows if ok(r)), None))
        held = None
        for r in reversed(rows):
            if not ok(r):
                break
            held = r
        out[f"{key}_held"] = _point(held)
    return out


def compare_samplers(trainer: Trainer, evaluator: Evaluator, specs: Sequence[dict[str, Any]], *, samples: int,
                     ddpm_samples: int, folder: Path, variant: str,
                     guidances: Sequence[float] = ()) -> list[dict[str, Any]]:
    """Each sampler on the same network, labels and seed at w = ``eval.proxy_guidance`` (the first sampler also at
    each of ``guidances``): time per sample and the scores, plus a grid PNG."""
    cfg, rows = trainer.cfg, []
    diffusion = GaussianDiffusion(cfg.diffusion)
    runs = [(spec, cfg.eval.proxy_guidance) for spec in specs] + [(specs[0], w) for w in guidances]
    for spec, w in runs:
        n = ddpm_samples if spec["sampler"] == "ddpm" else samples
        labels = uniform_labels(n, trainer.num_classes).to(trainer.device)  # sampling runs where the labels are
        kw = {k: spec[k] for k in ("sampler", "steps", "eta")}
        start = time.perf_counter()
        images = generate(trainer.ema.module, diffusion, labels, tuple(trainer.dataset.image_shape),
                          guidance=w, null_label=trainer.num_classes,
                          batch_size=cfg.eval.batch_size, seed=cfg.train.seed, autocast=trainer.autocast, **kw)
        seconds = time.perf_counter() - start
        rows.append({"variant": variant, "sampler": spec["name"], "guidance": w, "samples": n,
                     "seconds_per_sample": seconds / n, **_scores(evaluator, images, labels, cfg.train.seed)})
        order = torch.cat([torch.nonzero(labels == k).flatten()[:8] for k in range(trainer.num_classes)])
        save_grid(images[order], folder / f"samples_{variant}_{spec['name']}_w{w:g}.png", nrow=8, scale=4)
    return rows


def _f(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def sampler_table(rows: list[dict[str, Any]]) -> str:
    head = ("| variant | sampler | w | N | s / sample | FID (floor) | tail FID (floor) | reject rate (floor) | "
            "head consistency (floor) | tail consistency (floor) |\n"
            + "| --- " * 10 + "|")
    lines = [f"| {r['variant']} | {r['sampler']} | {r['guidance']:g} | {r['samples']} | "
             f"{r['seconds_per_sample']:.3g} | "
             + " | ".join(f"{_f(r[k])} ({_f(r[k + '_floor'])})" for k in ("fid", "fid_tail", "reject_rate",
                                                                        "consistency_head", "consistency_tail"))
             + " |" for r in rows]
    return "\n".join([head, *lines])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits", help="base configuration (default: digits)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field of every variant (repeatable)")
    p.add_argument("--variants", default="ddpm,pd-cbdm", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--every", type=int, default=None, help="steps between curve points (default: train.eval_every)")
    p.add_argument("--samples", type=int, default=None, help="samples per score (default: eval.num_samples)")
    p.add_argument("--samplers", default="ddim:20:0,ddim:20:1,ddim:50:1",
                   help="samplers compared on the last network: ddim:STEPS:ETA or ddpm:T, comma-separated")
    p.add_argument("--ddpm-samples", type=int, default=100, help="samples for ddpm:T samplers (slow; default 100)")
    p.add_argument("--also-guidance", default="", help="comma-separated w at which the first sampler is also scored "
                   "(e.g. 0: a tail deficit shows at w = 0, where guidance does not mask it)")
    p.add_argument("--consistency-target", type=float, default=0.9, help="head consistency target (0.9)")
    p.add_argument("--fid-factor", type=float, default=3.0, help="FID target as a multiple of its floor (3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/quality", help="output folder (default runs/quality)")
    return p


def configs(args: argparse.Namespace) -> dict[str, Config]:
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise ConfigError(f"--variants takes {', '.join(VARIANTS)}, got {args.variants!r}")
    base = apply_overrides(preset(args.preset), args.overrides)
    if args.steps:
        base = apply_overrides(base, {"train.steps": args.steps})
    return {v: apply_overrides(base, VARIANTS[v]) for v in names}


def run_quality(cfgs: dict[str, Config], specs: Sequence[dict[str, Any]], out: Path, *, every: int | None = None,
                samples: int | None = None, ddpm_samples: int = 100, also_guidance: Sequence[float] = (),
                consistency: float = 0.9, fid_factor: float = 3.0) -> dict[str, Any]:
    """Curves, time-to-quality and the sampler comparison for each variant's config; pictures go into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"curves": {}, "reached": {}, "samplers": [], "targets": {
        "head_consistency": consistency, "fid_factor": fid_factor}}
    for name, cfg in cfgs.items():
        data = load_data(cfg)
        split = evaluation_split(cfg, data.counts())
        evaluator = Evaluator.build(cfg, num_classes=len(data.counts()), head=split.head, tail=split.tail,
                                    train_counts=data.counts())
        step_every, n = every or cfg.train.eval_every, samples or cfg.eval.num_samples
        print(f"{name}: {cfg.train.steps} steps, a curve point every {step_every}", flush=True)
        trainer, rows = train_curve(cfg, evaluator, every=step_every, samples=n, progress=True)
        report["curves"][name] = rows
        report["reached"][name] = first_reaching(rows, consistency=consistency, fid_factor=fid_factor)
        report["samplers"] += compare_samplers(trainer, evaluator, specs, samples=n, ddpm_samples=ddpm_samples,
                                               folder=out, variant=name, guidances=also_guidance)
        save_curves(rows, [*CURVE_KEYS, "fid_floor"], out / f"curves_{name}.png", title=name)
    return report


def _hit(hit: dict[str, Any] | None) -> str:
    if hit is None:
        return "not reached"
    cpu = hit.get("train_cpu_seconds")
    return f"step {hit['step']} ({hit['train_seconds']:.0f} s training" + (
        f", {cpu:.0f} s CPU)" if cpu is not None else ")")


def reached_lines(report: dict[str, Any]) -> list[str]:
    """One line a variant: where head consistency and FID first reached their targets and from where they held
    (step, training seconds)."""
    t = report["targets"]
    return [f"{name}: head consistency >= {t['head_consistency']}: first {_hit(hit['head_consistency'])}, held from "
            f"{_hit(hit.get('head_consistency_held'))}; FID <= {t['fid_factor']:g} x floor: first {_hit(hit['fid'])}, "
            f"held from {_hit(hit.get('fid_held'))}" for name, hit in report["reached"].items()]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfgs, specs = configs(args), [parse_sampler(s) for s in args.samplers.split(",") if s.strip()]
        also = [float(w) for w in args.also_guidance.split(",") if w.strip()]
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    report = run_quality(cfgs, specs, out, every=args.every, samples=args.samples, ddpm_samples=args.ddpm_samples,
                         also_guidance=also, consistency=args.consistency_target, fid_factor=args.fid_factor)
    print("\n" + sampler_table(report["samplers"]))
    print("\n".join(reached_lines(report)))
    write_json_atomic(out / "quality.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
