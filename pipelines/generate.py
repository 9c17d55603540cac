"""Generate images of a trained model into a class folder: the augmentation a long-tailed data set asks for.

    python -m pipelines.generate --model runs/digits/checkpoint.pt --per-class 100 --out gen
    python -m pipelines.generate --model runs:/RUN_ID/model --tracking-uri sqlite:////abs/mlflow.db \\
        --classes tail --per-class 500 --guidance 1 --out gen
    python -m pipelines.generate --model C --top-up-to 1000 --data prepared/ --out gen   # every class to 1000 images

--model takes a checkpoint file of ``pdcbdm.train`` or a trial's MLflow model (``runs:/RUN_ID/model``, or a
registered version: ``models:/pdcbdm-SEARCH@best`` is a search's winner, ``models:/NAME/VERSION`` one version; the
EMA network, checked and rebuilt without running anything of the run; see tune/mlflow_model.py). The manifest names
the version an alias pointed to.

Writes into --out:
  <class folder>/<n>.png   n = 0, 1, ...: images at the model's size and channels (grey "L" or "RGB"), the layout an
                           image classifier reads (torchvision's ImageFolder). The folder is the class name made
                           safe for a file system (separators, leading dots, ... become "_"; names that clash get
                           "~<label>"); the real name is in the manifest.
  manifest.csv             one row per generated file: file, class, label, index, guidance, seed, noise_seed,
                           batch_size, batch_row, sampler, steps, eta, model (path or URI), model_step.

How many: --per-class N asks for images 0 .. N-1 of every chosen class; --top-up-to N fills every chosen class up to
N images counting the user's real ones: N minus the class's images in the prepared data folder (--data), or minus
the model's training counts when there is none.

Resumable: files that exist are kept and not made again; a run stopped anywhere is continued by running it again.
Image n of class k is row n mod B of the class's batch n // B, whose noise comes from a generator seeded with
(--seed, k, n // B) and drawn for all B rows: the same command gives the same image n however many of its batch a
run makes (see pdcbdm/generate_folder.py). Exit status 2 on bad input: a missing model, an unknown class name, a
data folder that does not match the model.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from pdcbdm.config import Config, ConfigError, apply_overrides
from pdcbdm.data.prepared import read_prepared_meta
from pdcbdm.diffusion import GaussianDiffusion
from pdcbdm.evaluation import evaluation_split, sampling_autocast
from pdcbdm.generate_folder import (MANIFEST, Outcome, Settings, folder_names, generate_folder, read_manifest,
                                    top_up_targets, write_preview)
from pdcbdm.training import CheckpointError
from pipelines.model_source import UsageError, load_network, pick_device, source_name

__all__ = ["build_parser", "select_classes", "real_counts", "main"]

# CLI flag -> config field, so that an invalid value's error names both
FLAG_FIELDS = {"--sampler": "sample.sampler", "--steps": "sample.steps", "--eta": "sample.eta",
               "--guidance": "sample.guidance", "--batch-size": "eval.batch_size", "--device": "train.device"}
KEYWORDS = ("all", "tail")
LISTED_NAMES = 40  # most known class names an error lists


# -- options --------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; every option explains itself in --help."""
    p = argparse.ArgumentParser(prog="python -m pipelines.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="CHECKPOINT|URI",
                   help="checkpoint.pt written by pdcbdm.train, or a trial's MLflow model runs:/RUN_ID/model, or a "
                        "registered one: models:/pdcbdm-SEARCH@best (a search's winner), models:/NAME/VERSION")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow store of a runs:/ or models:/ --model (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: DIR/<class>/<n>.png and DIR/manifest.csv (created; existing images kept)")
    count = p.add_mutually_exclusive_group(required=True)
    count.add_argument("--per-class", type=int, metavar="N", help="images 0 .. N-1 of every chosen class")
    count.add_argument("--top-up-to", type=int, metavar="N",
                       help="fill every chosen class up to N images counting its real ones (--data): generates "
                            "N - real images, none for a class that already has N")
    p.add_argument("--classes", default="all", metavar="all|tail|NAME,...",
                   help="which classes: all (default), tail (the tail at the model config's eval.split_ratio over "
                        "its training counts), or comma-separated class names exactly as the model knows them (a "
                        "class named 'all' or 'tail' itself: add a comma, 'tail,')")
    p.add_argument("--data", default=None, metavar="D",
                   help="with --top-up-to: the prepared data folder (pipelines.prepare_data) whose images count as "
                        "real (default: the model config's data.root for data.dataset=parquet, else the model's "
                        "training class counts)")
    p.add_argument("--real-splits", default=None, metavar="SPLIT,...",
                   help="with --top-up-to and a prepared folder: the splits whose images count as real (default: "
                        "train and heldout, each when present)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance w >= 0: eps~ = (1 + w) eps(x, t, y) - w eps(x, t, null) "
                        "(default: the model config's sample.guidance)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default=None,
                   help="ddim (--steps steps) or ddpm (ancestral, all T steps; slow) (default: sample.sampler)")
    p.add_argument("--steps", type=int, default=None, metavar="S", help="DDIM steps (default: sample.steps)")
    p.add_argument("--eta", type=float, default=None, metavar="E",
                   help="DDIM eta: 0 deterministic from the initial noise, 1 as noisy as DDPM (default: sample.eta)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="images per sampling batch; part of the seed rule, so keep it when resuming "
                        "(default: eval.batch_size)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the noise (default 0)")
    p.add_argument("--device", default="auto", metavar="cpu|cuda|auto",
                   help="where the network runs; auto = CUDA when available (default)")
    p.add_argument("--threads", type=int, default=0, metavar="T", help="CPU threads of torch (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _flag_error(exc: ConfigError) -> UsageError:
    """A config validation error with the flag that set the field."""
    flags = [f for f, key in FLAG_FIELDS.items() if key in str(exc)]
    return UsageError(f"{exc}{' (option ' + flags[0] + ')' if flags else ''}")


def resolve_settings(args: argparse.Namespace, cfg: Config, meta: dict[str, Any]) -> tuple[Config, Settings]:
    """(the model's config with the sampling flags applied and validated, the Settings of the run)."""
    values = {"--sampler": args.sampler, "--steps": args.steps, "--eta": args.eta, "--guidance": args.guidance,
              "--batch-size": args.batch_size, "--device": args.device}
    try:
        cfg = apply_overrides(cfg, {FLAG_FIELDS[f]: v for f, v in values.items() if v is not None})
    except ConfigError as exc:
        raise _flag_error(exc) from None
    s = cfg.sample
    if not math.isfinite(s.guidance) or not math.isfinite(s.eta):
        raise UsageError(f"--guidance and --eta must be finite, got {s.guidance} and {s.eta}")
    if s.sampler == "ddim" and s.steps > cfg.diffusion.timesteps:
        raise UsageError(f"--steps {s.steps}: DDIM takes at most the model's {cfg.diffusion.timesteps} diffusion "
                         f"steps")
    settings = Settings(sampler=s.sampler, steps=s.steps if s.sampler == "ddim" else cfg.diffusion.timesteps,
                        eta=s.eta if s.sampler == "ddim" else 1.0, guidance=s.guidance, seed=args.seed,
                        batch_size=cfg.eval.batch_size, model=source_name(args.model, meta),
                        model_step=int(meta.get("step", -1)))
    return cfg, settings


# -- classes and counts ---------------------------------------------------------------------------------------------
def _known(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:LISTED_NAMES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > LISTED_NAMES else "")


def select_classes(spec: str, names: Sequence[str], cfg: Config, counts: Sequence[int]) -> list[int]:
    """The labels ``--classes`` names: ``all``, ``tail`` (``evaluation_split`` of the model's counts: the config's
    eval.split_ratio), or comma-separated names matched exactly (then with surrounding spaces removed). A spec with
    a comma is always names. UsageError naming the unknown names and listing the known ones."""
    if spec.strip() in KEYWORDS:
        if spec.strip() == "all":
            return list(range(len(names)))
        try:
            return list(evaluation_split(cfg, counts).tail)
        except ValueError as exc:  # one class, or a ratio that leaves no tail
            raise UsageError(f"--classes tail: no tail among the model's {len(names)} classes ({exc})") from None
    index = {n: k for k, n in enumerate(names)}
    wanted = [item for item in spec.split(",") if item.strip()]
    labels = [index.get(item, index.get(item.strip())) for item in wanted]
    unknown = [item for item, k in zip(wanted, labels) if k is None]
    if unknown:
        raise UsageError(f"--classes: the model knows no class {', '.join(repr(u) for u in unknown)}; its "
                         f"classes are {_known(names)}")
    if not labels:
        raise UsageError(f"--classes {spec!r} names no class; use all, tail or NAME,...")
    return list(dict.fromkeys(labels))  # type: ignore[arg-type]  # None ruled out above


def _prepared_counts(root: Path, names: Sequence[str], shape: Sequence[int], splits: str | None) -> list[int]:
    """Real images per model class in a prepared folder's splits, matched by class name; UsageError naming --data
    when the folder is not prepared or does not hold the model's classes and image shape."""
    try:
        meta = read_prepared_meta(root)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--data {root}: {exc}") from None
    if list(meta["image_shape"]) != list(shape):
        raise UsageError(f"--data {root}: its images are {tuple(meta['image_shape'])}, the model makes "
                         f"{tuple(shape)}; topping up would mix sizes in one class folder")
    index = {n: k for k, n in enumerate(meta["class_names"])}
    missing = [n for n in names if n not in index]
    if missing:
        raise UsageError(f"--data {root}: the prepared data has no class {_known(missing)} of the model (its "
                         f"classes: {_known(meta['class_names'])})")
    chosen = [s.strip() for s in splits.split(",") if s.strip()] if splits else \
        [s for s in ("train", "heldout") if s in meta["splits"]]
    absent = [s for s in chosen if s not in meta["splits"]]
    if absent or not chosen:
        raise UsageError(f"--real-splits: {root} has no split {absent or splits!r} (it has {sorted(meta['splits'])})")
    return [sum(int(meta["splits"][s]["counts"][index[n]]) for s in chosen) for n in names]


def real_counts(args: argparse.Namespace, cfg: Config, meta: dict[str, Any]) -> tuple[list[int], str]:
    """The user's real images per class for --top-up-to, and where they were counted: --data, else the model
    config's data.root when it trained on a prepared folder, else the model's training counts."""
    names, shape = list(meta["class_names"]), meta["image_shape"]
    root = args.data
    if root is None and cfg.data.dataset == "parquet" and cfg.data.root:
        root = cfg.data.root
        if not Path(root).is_dir():
            raise UsageError(f"the model trained on {root} (data.root), which is not here; pass --data D")
    if root is not None:
        return _prepared_counts(Path(root), names, shape, args.real_splits), f"prepared data {root}"
    if args.real_splits:
        raise UsageError("--real-splits needs a prepared data folder (--data D)")
    return [int(c) for c in meta["class_counts"]], "the model's training class counts (no --data given)"


def wanted_counts(args: argparse.Namespace, cfg: Config, meta: dict[str, Any],
                  labels: Sequence[int]) -> tuple[dict[int, int], list[int] | None]:
    """(label -> images the class folder should hold, the real counts when --top-up-to); notes go to stderr."""
    if args.per_class is not None:
        if args.data is not None or args.real_splits is not None:
            raise UsageError("--data and --real-splits: --data counts real images for --top-up-to, not for "
                             "--per-class")
        if args.per_class < 1:
            raise UsageError(f"--per-class must be >= 1, got {args.per_class}")
        return {k: args.per_class for k in labels}, None
    if args.top_up_to < 1:
        raise UsageError(f"--top-up-to must be >= 1, got {args.top_up_to}")
    real, source = real_counts(args, cfg, meta)
    print(f"--top-up-to {args.top_up_to}: real images counted from {source}", file=sys.stderr)
    return top_up_targets(real, args.top_up_to, labels), real


# -- run ------------------------------------------------------------------------------------------------------------
def _check_meta(meta: dict[str, Any], model: str) -> None:
    """The model's metadata holds what generation needs: class names and counts for every class, a 1- or
    3-channel image shape."""
    k = int(meta["num_classes"])
    names, counts, shape = meta.get("class_names") or [], meta.get("class_counts") or [], meta.get("image_shape")
    if len(names) != k or len(counts) != k:
        raise CheckpointError(f"{model} lacks class_names or class_counts for its {k} classes")
    if not shape or len(shape) != 3 or int(shape[0]) not in (1, 3):
        raise CheckpointError(f"{model}: image_shape {shape} is not [1 or 3, H, W]")


def report(outcome: Outcome, meta: dict[str, Any], targets: dict[int, int], real: list[int] | None) -> str:
    """The per-class table printed at the end."""
    names, folders = meta["class_names"], folder_names(meta["class_names"])
    header = ["class", "folder", *(["real"] if real else []), "wanted", "kept", "generated"]
    lines = [[names[k], folders[k], *([real[k]] if real else []), targets[k], outcome.kept[k], outcome.generated[k]]
             for k in sorted(targets)]
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)) for r in [header, *lines])


def _warn(outcome: Outcome, out: Path) -> None:
    """Say which kept images the manifest does not describe or describes as made with other settings."""
    for files, what in ((outcome.unrecorded, f"have no row in {out / MANIFEST} (not written by this command?)"),
                        (outcome.other_settings, "were made with other settings (model, guidance, sampler, seed or "
                                                 "batch size; see the manifest)")):
        if files:
            print(f"warning: {len(files)} kept image(s) {what}, e.g. {files[0]}; delete them to make them again",
                  file=sys.stderr)


def _check_out(out: Path) -> None:
    """--out is a folder (or nothing yet) and any manifest in it is one of ours."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    try:
        read_manifest(out / MANIFEST)
    except ValueError as exc:
        raise UsageError(f"--out: {exc}") from None


def run(args: argparse.Namespace) -> int:
    """Load the model, work out what to make, generate it, print the table."""
    _check_out(Path(args.out))
    net, cfg, meta = load_network(args.model, "ema")
    _check_meta(meta, str(args.model))
    cfg, settings = resolve_settings(args, cfg, meta)
    counts = [int(c) for c in meta["class_counts"]]
    labels = select_classes(args.classes, meta["class_names"], cfg, counts)
    targets, real = wanted_counts(args, cfg, meta, labels)
    device = pick_device(cfg.train.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    outcome = generate_folder(net.to(device), GaussianDiffusion(cfg.diffusion), args.out,
                              class_names=meta["class_names"], targets=targets,
                              shape=tuple(int(s) for s in meta["image_shape"]), settings=settings, device=device,
                              autocast=sampling_autocast(cfg, device) or nullcontext,
                              progress=not args.no_progress)
    _warn(outcome, Path(args.out))
    preview = write_preview(args.out, meta["class_names"], targets)
    print(report(outcome, meta, targets, real))
    print(f"wrote {sum(outcome.generated.values())} image(s), kept {sum(outcome.kept.values())}; manifest "
          f"{Path(args.out) / MANIFEST}; preview {preview}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (None: sys.argv[1:]); returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    if args.tracking_uri:
        import mlflow  # deferred: MLflow (1.3 s) for --tracking-uri only; --help answers without it

        mlflow.set_tracking_uri(args.tracking_uri)
    try:
        return run(args)
    except (UsageError, CheckpointError, FileNotFoundError) as exc:  # bad input: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
