"""From a listing of a user's own images to a prepared folder (``pdcbdm.data.prepared``): the bad-input rules, the
per-class held-out split, the report, and the write with _meta.json last.

Held-out split (the floors' and the judge's real images): class k with n_k kept images gives
``h_k = min(heldout_max, floor(heldout_frac n_k))`` images, and none when n_k - h_k would fall below
``heldout_min_train``: a tail class is never robbed of its training images. The images are picked by a per-class
shuffle seeded by ``HELDOUT_SEED`` and the class name, independent of any training seed and of the other classes.
A held-out image whose pixels equal a training image's is removed from the held-out split (it would score a copy).

Preparation stops (``PrepareError``, nothing written) when more than ``max_bad`` of the files are unusable, a class
loses every image, a single class remains, a reference class is unknown to the training set, or a 16-bit/float
image is met without ``high_bit_depth="minmax"``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import textwrap
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pdcbdm.config import LABEL_DIST_NAMES
from pdcbdm.io import atomic_write_bytes, is_temp_name, write_json_atomic
from pdcbdm.labels import from_spec
from .digits import HELDOUT_SEED
from .ingest import (REASON_HIGH_BIT, REASON_NO_LABEL, REASON_OUTSIDE, DecodeOptions, Decoded, Listing,
                     decode_all, reasons_summary, stack_channels)
from .prepared import META_FILE, SPLITS, is_prepared, read_prepared_meta, write_prepared_meta, write_split
from .split import HeadTailSplit, head_tail_split

__all__ = ["PrepareError", "HeldoutRule", "PreparedData", "build_prepared", "heldout_counts", "imbalance_stats",
           "label_dist_shares", "format_report", "write_prepared", "check_target", "REPORT_FILE", "SKIPPED_FILE"]

REPORT_FILE, SKIPPED_FILE = "_report.json", "_skipped.csv"
# listing facts, not broken files: listed in _skipped.csv without counting against max_bad
NOT_BAD = (REASON_NO_LABEL, REASON_OUTSIDE, "held-out duplicate")
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
MAX_LISTED_CLASSES = 20


class PrepareError(ValueError):
    """Bad input that stops a preparation; the message names the files, classes or flag at fault."""


@dataclass(frozen=True)
class HeldoutRule:
    """Per class min(max_images, floor(frac n_k)) held out, none when fewer than min_train would remain."""

    frac: float = 0.1
    max_images: int = 200
    min_train: int = 20

    def __post_init__(self) -> None:
        if not 0.0 <= self.frac < 1.0:
            raise ValueError(f"--heldout-frac must be in [0, 1), got {self.frac!r}")
        if self.max_images < 0 or self.min_train < 1:
            raise ValueError(f"--heldout-max must be >= 0 and --heldout-min-train >= 1, got {self.max_images!r} "
                             f"and {self.min_train!r}")


@dataclass
class PreparedData:
    """A preparation in memory, checked and ready to write: the splits' images (uint8 [N, C, S, S]) and labels,
    the class names, the head/tail split of the training counts, the report and the skipped files."""

    class_names: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    head_tail: HeadTailSplit
    report: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def heldout_counts(counts: Sequence[int], rule: HeldoutRule) -> list[int]:
    """Held-out images per class under ``rule``."""
    out = []
    for n in counts:
        h = min(rule.max_images, math.floor(rule.frac * n))
        out.append(h if n - h >= rule.min_train else 0)
    return out


def _heldout_mask(labels: np.ndarray, class_names: Sequence[str], rule: HeldoutRule) -> np.ndarray:
    """True for the images held out: per class a shuffle seeded by HELDOUT_SEED and the class's name."""
    mask = np.zeros(len(labels), dtype=bool)
    counts = np.bincount(labels, minlength=len(class_names))
    for k, h in enumerate(heldout_counts(counts.tolist(), rule)):
        members = np.flatnonzero(labels == k)
        rng = np.random.default_rng([HELDOUT_SEED, zlib.crc32(class_names[k].encode())])
        mask[members[rng.permutation(len(members))[:h]]] = True
    return mask


def _image_keys(images: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(im.tobytes(), digest_size=16).digest() for im in images]


def imbalance_stats(counts: Sequence[int]) -> dict[str, float]:
    """n_max, n_min, rho = n_max / n_min and the Gini coefficient of the class counts (0: balanced)."""
    n = np.asarray(counts, dtype=np.float64)
    gini = float(np.abs(n[:, None] - n[None, :]).sum() / (2 * len(n) ** 2 * n.mean())) if n.sum() else 0.0
    n_min = float(n.min())
    return {"n_max": int(n.max()), "n_min": int(n_min), "rho": float(n.max() / n_min) if n_min else math.inf,
            "gini": round(gini, 4)}


def _draw_limit(num_classes: int) -> float:
    """The share of the draws one class may get before the report warns: half, or 2/K when K < 4 (with 2 classes
    ``inverted`` always gives the smaller one more than half)."""
    return max(0.5, 2.0 / num_classes)


def _suggest_power(counts: Sequence[int], limit: float) -> float:
    """The largest s in steps of 0.05 below 1 for which no class gets more than ``limit`` of the draws."""
    for s in np.arange(0.95, 0.0, -0.05):
        if float(from_spec(counts, f"power:{s:.2f}").max()) <= limit:
            return round(float(s), 2)
    return 0.0


def label_dist_shares(counts: Sequence[int], class_names: Sequence[str]) -> dict[str, Any]:
    """The share of CBDM's target-label draws (``loss.label_dist``) that the rarest class gets under each
    distribution, and a warning when ``inverted`` hands one class most of them (more than ``_draw_limit``): then
    the largest ``power:S`` that does not is suggested."""
    rarest = int(np.argmin(counts))
    shares = {spec: round(float(from_spec(counts, spec)[rarest]), 4) for spec in LABEL_DIST_NAMES}
    out: dict[str, Any] = {"rarest_class": class_names[rarest], "shares": shares, "warning": None}
    inverted = from_spec(counts, "inverted")
    top = int(inverted.argmax())
    if float(inverted[top]) > _draw_limit(len(counts)):
        s = _suggest_power(counts, _draw_limit(len(counts)))
        out["warning"] = (f"loss.label_dist=inverted gives class {class_names[top]!r} {float(inverted[top]):.0%} of "
                          f"the draws; consider loss.label_dist=power:{s:g}")
        out["suggested"] = f"power:{s:g}"
    return out


def _head_tail(counts: Sequence[int], class_names: Sequence[str], ratio: float) -> tuple[HeadTailSplit, str | None]:
    """The head/tail split at ``ratio`` (``eval.split_ratio``); with too few classes for a tail at that ratio the
    split keeps the rarest class as tail (``head_tail_split``), and a note says so."""
    split = head_tail_split(counts, ratio)
    k = len(counts)
    if math.ceil(ratio * k) < k:
        return split, None
    return split, (f"ratio {ratio} leaves no tail class among {k} classes; head = the {k - 1} largest, "
                   f"tail = {', '.join(class_names[c] for c in split.tail)}")


def _by_reason(skipped: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{why}: {n}" for why, n in reasons_summary(skipped).items()) or "none"


def _decode_listing(listing: Listing, options: DecodeOptions, max_bad: float,
                    prefix: str = "") -> tuple[list[Decoded], list[tuple[str, str]]]:
    """Decode every entry; the skipped files (listing's and decoder's); PrepareError on a refused high-bit image
    or on more than ``max_bad`` unusable files."""
    decoded = decode_all([e.path for e in listing.entries], options)
    failed = [(prefix + e.name, d.reason or "") for e, d in zip(listing.entries, decoded) if d.pixels is None]
    high = [name for name, why in failed if why.startswith(REASON_HIGH_BIT)]
    if high:
        raise PrepareError(f"{len(high)} 16-bit or float image(s) ({', '.join(high[:5])}): Pillow would clip them "
                           f"to 255; pass --high-bit-depth minmax to scale each from its own minimum and maximum")
    skipped = [(prefix + n, why) for n, why in listing.skipped] + failed
    bad = [(n, why) for n, why in skipped if not why.startswith(NOT_BAD)]
    total = len(listing.entries) + sum(not why.startswith(NOT_BAD) for _, why in listing.skipped)
    if total and len(bad) / total > max_bad:
        detail = "; ".join(f"{n}: {why}" for n, why in bad[:10])
        raise PrepareError(f"{len(bad)} of {total} files unusable ({len(bad) / total:.1%} > --max-bad "
                           f"{max_bad:.1%}; {_by_reason(bad)}); first: {detail}")
    return decoded, skipped


def _labels_of(listing: Listing, decoded: Sequence[Decoded], class_names: Sequence[str]) -> np.ndarray:
    index = {name: k for k, name in enumerate(class_names)}
    return np.array([index[e.label] for e, d in zip(listing.entries, decoded) if d.pixels is not None], np.int64)


def _check_classes(listing: Listing, labels: np.ndarray, what: str) -> None:
    """PrepareError when fewer than 2 classes are found, or a class lost every image to bad files."""
    if len(listing.class_names) < 2:
        found = ", ".join(repr(n) for n in listing.class_names) or "none"
        raise PrepareError(f"{what}: {len(listing.class_names)} class ({found}); a class-conditional model needs "
                           f"at least 2 classes")
    kept = np.bincount(labels, minlength=len(listing.class_names))
    lost = [listing.class_names[k] for k in np.flatnonzero(kept == 0)]
    if lost:
        raise PrepareError(f"{what}: class(es) {', '.join(map(repr, lost))} lost every image to unusable files "
                           f"(see the reasons with --dry-run); fix or remove them")


def _decode_reference(reference: Listing, class_names: Sequence[str], options: DecodeOptions,
                      max_bad: float) -> tuple[list[Decoded], np.ndarray, list[tuple[str, str]]]:
    """The reference folder decoded like the training images; its classes must be training classes."""
    unknown = sorted(set(reference.class_names) - set(class_names))
    if unknown:
        raise PrepareError(f"--reference-folder: class(es) {', '.join(map(repr, unknown))} unknown to the training "
                           f"set (its classes: {', '.join(class_names)})")
    decoded, skipped = _decode_listing(reference, options, max_bad, prefix="reference/")
    labels = _labels_of(reference, decoded, class_names)
    lost = sorted(set(reference.class_names) - {class_names[k] for k in labels.tolist()})
    if lost:
        raise PrepareError(f"--reference-folder: class(es) {', '.join(map(repr, lost))} lost every image to "
                           f"unusable files")
    return decoded, labels, skipped


def build_prepared(listing: Listing, options: DecodeOptions, *, rule: HeldoutRule = HeldoutRule(),
                   head_ratio: float = 0.7, max_bad: float = 0.01, reference: Listing | None = None) -> PreparedData:
    """Decode, check and split a listing (and an optional reference listing) into a PreparedData, or raise
    PrepareError before anything is written."""
    decoded, skipped = _decode_listing(listing, options, max_bad)
    names = list(listing.class_names)
    labels = _labels_of(listing, decoded, names)
    _check_classes(listing, labels, "the training images")
    kept_names = [e.name for e, d in zip(listing.entries, decoded) if d.pixels is not None]
    ref_decoded: list[Decoded] = []
    ref_labels = np.zeros(0, np.int64)
    if reference is not None:
        ref_decoded, ref_labels, ref_skipped = _decode_reference(reference, names, options, max_bad)
        skipped += ref_skipped
    images = stack_channels([d for d in decoded + ref_decoded if d.pixels is not None], options.channels)
    ref_images, images = images[len(labels):], images[:len(labels)]
    held = _heldout_mask(labels, names, rule)
    train_keys = set(_image_keys(images[~held]))
    for i in np.flatnonzero(held):
        if _image_keys(images[i:i + 1])[0] in train_keys:
            held[i] = False
            labels[i] = -1  # neither split: a copy of a training image
            skipped.append((kept_names[i], "held-out duplicate of a training image"))
    train, out = labels >= 0, {}
    out["train"] = (images[train & ~held], labels[train & ~held])
    out["heldout"] = (images[held], labels[held])
    if reference is not None:
        out["reference"] = (ref_images, ref_labels)
    counts = np.bincount(out["train"][1], minlength=len(names)).tolist()
    head_tail, note = _head_tail(counts, names, head_ratio)
    upscaled = [d.upscaled for d in decoded if d.pixels is not None]
    report = _report(listing, reference, out, names, skipped, head_tail, note, head_ratio, upscaled)
    return PreparedData(names, out, head_tail, report, skipped)


def _report(listing: Listing, reference: Listing | None, splits: dict[str, tuple[np.ndarray, np.ndarray]],
            names: list[str], skipped: list[tuple[str, str]], head_tail: HeadTailSplit, note: str | None,
            head_ratio: float, upscaled: list[bool]) -> dict[str, Any]:
    """The facts of a preparation, as stored in _report.json and printed by ``format_report``."""
    k = len(names)
    train = np.bincount(splits["train"][1], minlength=k).tolist()
    held = np.bincount(splits["heldout"][1], minlength=k).tolist()
    sources = [listing] + ([reference] if reference is not None else [])
    read = sum(len(s.entries) + sum(not why.startswith(NOT_BAD) for _, why in s.skipped) for s in sources)
    report: dict[str, Any] = {
        "files": {"read": read, "kept": int(sum(len(v[1]) for v in splits.values())), "skipped": len(skipped),
                  "skipped_by_reason": reasons_summary(skipped), "hidden_ignored": sum(s.hidden for s in sources)},
        "image_shape": list(splits["train"][0].shape[1:]),
        "classes": [{"index": i, "name": names[i], "train": train[i], "heldout": held[i]} for i in range(k)],
        "unjudged": [names[i] for i in range(k) if held[i] == 0],
        "imbalance": imbalance_stats(train),
        "head_tail": {"ratio": head_ratio, "head": [names[i] for i in head_tail.head],
                      "tail": [names[i] for i in head_tail.tail], "note": note},
        "upscaled_share": round(float(np.mean(upscaled)), 4) if upscaled else 0.0,
        "label_dist": label_dist_shares(train, names),
        "warnings": [w for s in sources for w in s.warnings],
    }
    if reference is not None:
        report["reference"] = {"images": int(len(splits["reference"][1])),
                               "counts": np.bincount(splits["reference"][1], minlength=k).tolist()}
    return report


def _class_lines(report: dict[str, Any]) -> list[str]:
    """Per-class counts, or the index-to-name map and the counts' quantiles when there are more than
    MAX_LISTED_CLASSES classes."""
    classes = report["classes"]
    group = {n: "head" for n in report["head_tail"]["head"]} | {n: "tail" for n in report["head_tail"]["tail"]}
    if len(classes) <= MAX_LISTED_CLASSES:
        width = max(len(c["name"]) for c in classes)
        return ["  class" + " " * (width + 1) + "train heldout", *(
            f"  {c['index']:>3} {c['name']:<{width}} {c['train']:>6} {c['heldout']:>7}  {group[c['name']]}"
            + ("  (unjudged: no held-out image)" if c["heldout"] == 0 else "") for c in classes)]
    index_map = ", ".join(f"{c['index']} {c['name']}" for c in classes)
    lines = textwrap.wrap(f"classes (index name): {index_map}", 116, initial_indent="  ", subsequent_indent="    ")
    lines.append("  per-class quantiles    " + "  ".join(f"{q:>5.0%}" for q in QUANTILES))
    for key in ("train", "heldout"):
        values = np.quantile([c[key] for c in classes], QUANTILES)
        lines.append(f"  {key:<21} " + "  ".join(f"{v:>5.0f}" for v in values))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines ``pipelines.prepare_data`` prints."""
    files, imb, ht, ld = report["files"], report["imbalance"], report["head_tail"], report["label_dist"]
    reasons = ", ".join(f"{why}: {n}" for why, n in files["skipped_by_reason"].items()) or "none"  # from JSON
    lines = [f"images read {files['read']}, kept {files['kept']}, skipped {files['skipped']} ({reasons}); "
             f"hidden files ignored {files['hidden_ignored']}",
             f"image shape {tuple(report['image_shape'])}, {len(report['classes'])} classes",
             *_class_lines(report),
             f"imbalance: n_max {imb['n_max']}, n_min {imb['n_min']}, rho {imb['rho']:.4g}, Gini {imb['gini']:.3f}",
             f"head ({len(ht['head'])}) / tail ({len(ht['tail'])}) at ratio {ht['ratio']}: tail = "
             f"{', '.join(ht['tail'][:10])}{' ...' if len(ht['tail']) > 10 else ''}"]
    if ht["note"]:
        lines.append(f"  note: {ht['note']}")
    unjudged = report["unjudged"]
    lines.append(f"too small to judge (no held-out image): {', '.join(unjudged[:20]) or 'none'}"
                 + (f" ... ({len(unjudged)} classes)" if len(unjudged) > 20 else ""))
    lines.append(f"upscaled: {report['upscaled_share']:.1%} of the images")
    shares = ", ".join(f"{spec} {share:.1%}" for spec, share in ld["shares"].items())
    lines.append(f"share of CBDM's label draws for the rarest class {ld['rarest_class']!r}: {shares}")
    if "reference" in report:
        lines.append(f"reference: {report['reference']['images']} images")
    lines += [f"warning: {w}" for w in report["warnings"] + ([ld["warning"]] if ld["warning"] else [])]
    return "\n".join(lines)


def _skipped_csv(skipped: Sequence[tuple[str, str]]) -> bytes:
    buffer = io.StringIO()
    pd.DataFrame(list(skipped), columns=["path", "reason"]).to_csv(buffer, index=False)
    return buffer.getvalue().encode()


def write_prepared(data: PreparedData, out: str | Path, *, transforms: dict[str, Any], source: dict[str, Any],
                   shard_rows: int = 10_000) -> Path:
    """Write the prepared folder: _meta.json removed first, the splits, _skipped.csv, _report.json, _meta.json
    last (an interrupted write leaves a folder that does not read as prepared); a split of an earlier
    preparation that this one lacks is removed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    entries = {name: write_split(out, name, images, labels, data.class_names, data.head_tail, shard_rows=shard_rows)
               for name, (images, labels) in data.splits.items()}
    for stale in set(SPLITS) - set(entries):
        _remove_split(out / stale)
    atomic_write_bytes(out / SKIPPED_FILE, _skipped_csv(data.skipped))
    write_json_atomic(out / REPORT_FILE, data.report)
    return write_prepared_meta(out, class_names=data.class_names, image_shape=data.splits["train"][0].shape[1:],
                               splits=entries, transforms=transforms, source=source)


def _remove_split(folder: Path) -> None:
    """Delete a split folder of an earlier preparation: only the files a split holds, then the folder."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and (path.name.startswith(("part-", "_", ".")) and path.suffix in (".parquet", ".json",
                                                                                             ".npy", ".tmp")):
            path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two JSON trees differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new))
                for d in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def check_target(out: str | Path, source: dict[str, Any], overwrite: bool) -> bool:
    """Whether ``out`` already holds this very preparation (same ``source``: arguments and input fingerprint), so
    nothing needs writing. PrepareError when it holds another preparation or files this tool did not make, unless
    ``overwrite`` (which replaces only this tool's files)."""
    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise PrepareError(f"--out {out}: exists and is not a folder")
    if is_prepared(out):
        old = read_prepared_meta(out).get("source", {})
        differs = _differences(old, json.loads(json.dumps(source)))
        if not differs:
            return True
        if not overwrite:
            raise PrepareError(f"--out {out} holds a preparation of other arguments or inputs (differs in: "
                               f"{', '.join(differs)}); pass --overwrite to replace it, or choose another folder")
        return False
    ours = {*SPLITS, REPORT_FILE, SKIPPED_FILE, META_FILE}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not is_temp_name(p.name))
    if foreign and not overwrite:
        raise PrepareError(f"--out {out} holds files this tool did not make ({', '.join(foreign[:5])}); choose an "
                           f"empty folder or pass --overwrite")
    return False
