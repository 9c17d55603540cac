"""A prepared folder as the data set of a run (``data.dataset=parquet``, ``data.root=D``).

Everything about the data comes from D/_meta.json (``pdcbdm.data.prepared``): the image shape, the class names and
the per-class counts; the images are the memory-mapped _images.npy of each split, never decoded or copied whole.

What an evaluation scores against (``eval.reference``; "auto": "folder" when the user supplied a reference folder
at preparation, else "balanced-train"):
  * reference: "balanced-train" the training split with its features re-weighted to a class-balanced mixture
    (``pdcbdm.metrics.mixture``: a user has no balanced set), "train" the same unweighted, "folder" D/reference/,
    "heldout" the reference part of D/heldout/;
  * class judge's calibration images: D/reference/ for "folder", else the reference part of D/heldout/ (images the
    domain CNN never trained on);
  * floor pool (the real images of the noise floors): the whole of D/heldout/ for "folder", else its other part, so
    that the floors' real draws never contain the judge's calibration images or a heldout reference (a draw that
    overlaps what it is scored with would understate every floor).
The split of heldout/ is fixed (seed ``HELDOUT_SPLIT_SEED``, independent of the config), so that every run, seed and
machine scores against the same reference: per class with m images, the reference part takes ceil(m / 2), and all
of them while m <= 2 (the class judge needs 2 images of a class to cover it).

Identities: every set built here carries ``identity``, derived from the data digest in _meta.json (itself a hash of
the recorded file hashes), so that caches and the cluster check never hash the images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .dataset import ImageDataset
from .prepared import load_prepared, read_prepared_meta

__all__ = ["PREPARED", "HELDOUT_SPLIT_SEED", "require_root", "prepared_image_shape", "prepared_train",
           "prepared_heldout", "prepared_reference", "prepared_floor", "prepared_calibration", "reference_kind",
           "prepared_summary", "REFERENCE_CHOICES",
           "heldout_parts", "prepared_identity"]

PREPARED = "parquet"
REFERENCE_CHOICES = ("auto", "balanced-train", "train", "heldout", "folder")
HELDOUT_SPLIT_SEED = 0
_SPLIT_RULE = "heldout-split-v1"  # part of the identities: a changed rule never reads another rule's caches


def require_root(root: str | Path | None) -> Path:
    """``data.root`` as a Path; ValueError naming the field when it is unset."""
    if root is None or str(root).strip() == "":
        raise ValueError("data.root: required with data.dataset=parquet (the folder `python -m "
                         "pipelines.prepare_data --from-folder DIR --out D` wrote)")
    return Path(root)


def prepared_image_shape(root: str | Path | None, image_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the prepared images; ValueError when ``image_size`` is given and is not their side (images
    are resized once, at preparation: a run never resizes the whole array)."""
    path = require_root(root)
    shape = tuple(int(s) for s in read_prepared_meta(path)["image_shape"])
    if image_size is not None and image_size != shape[1]:
        raise ValueError(f"data.image_size: {image_size}, but {path} holds {shape[1]}x{shape[2]} images; leave it "
                         f"unset (the prepared size) or prepare the data again at that size (--size)")
    return shape  # type: ignore[return-value]


def prepared_identity(root: str | Path, part: str) -> str:
    """The identity of one set of a prepared folder: its data digest (from _meta.json) and the part's name."""
    digest = read_prepared_meta(require_root(root))["digest"]
    return f"prepared/sha256:{digest}/{part}/{_SPLIT_RULE}"


def _with_identity(data: ImageDataset, identity: str) -> ImageDataset:
    data.identity = identity  # type: ignore[attr-defined]  # read by the caches and pdcbdm.assets
    return data


def prepared_train(root: str | Path | None, image_size: int | None = None) -> ImageDataset:
    """The training split, memory-mapped; flipped at random only when preparation recorded ``hflip`` (a user's
    images need not be mirror-symmetric: text, digits, medical scans)."""
    path = require_root(root)
    prepared_image_shape(path, image_size)
    hflip = bool(read_prepared_meta(path).get("transforms", {}).get("hflip", False))
    return _with_identity(load_prepared(path, "train", hflip=hflip), prepared_identity(path, "train"))


def prepared_heldout(root: str | Path | None) -> ImageDataset:
    """The whole held-out split (what ``build_dataset(..., split="test")`` serves), memory-mapped."""
    path = require_root(root)
    return _with_identity(load_prepared(path, "heldout"), prepared_identity(path, "heldout"))


def _reference_share(m: int) -> int:
    return m if m <= 2 else (m + 1) // 2


def heldout_parts(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference rows, floor rows) of a held-out split with these labels, by the fixed rule of the module
    docstring; both sorted."""
    rng = np.random.default_rng(HELDOUT_SPLIT_SEED)
    reference, floor = [], []
    for k in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == k))
        cut = _reference_share(len(members))
        reference.append(members[:cut])
        floor.append(members[cut:])
    return np.sort(np.concatenate(reference)), np.sort(np.concatenate(floor))


def reference_kind(root: str | Path | None, choice: str = "auto") -> str:
    """The reference an evaluation of this prepared set scores against (``eval.reference``, module docstring):
    ``choice`` itself, or for "auto" "folder" when D has a user-supplied reference split and "balanced-train"
    otherwise. ValueError naming the field for "folder" without a reference split."""
    path = require_root(root)
    if choice not in REFERENCE_CHOICES:
        raise ValueError(f"eval.reference: {choice!r} is not one of {', '.join(REFERENCE_CHOICES)}")
    has_folder = "reference" in read_prepared_meta(path)["splits"]
    if choice == "folder" and not has_folder:
        raise ValueError(f"eval.reference: 'folder' needs a reference split in {path} (prepare with "
                         f"--reference-folder DIR); use balanced-train, train or heldout")
    if choice == "auto":
        return "folder" if has_folder else "balanced-train"
    return choice


def _heldout_or_fail(path: Path) -> ImageDataset:
    if "heldout" not in read_prepared_meta(path)["splits"]:
        raise ValueError(f"{path}: no heldout split, which the evaluation needs (its reference, noise floors and "
                         f"class judge); prepare the data again with a held-out share")
    return load_prepared(path, "heldout")


def _heldout_part(path: Path, part: int) -> ImageDataset:
    """Part 0 (the judge's and the heldout reference's) or 1 (the floors') of heldout/ (``heldout_parts``)."""
    heldout = _heldout_or_fail(path)
    rows = heldout_parts(heldout.labels.numpy(), heldout.num_classes)[part]
    name = ("heldout-reference-part", "heldout-floor-part")[part]
    return _with_identity(heldout.subset(rows), prepared_identity(path, name))


def prepared_reference(root: str | Path | None, choice: str = "auto") -> ImageDataset:
    """The images FID and the other metrics compare samples with (module docstring): the training split (never
    flipped; "balanced-train" re-weights its features, ``pdcbdm.metrics.mixture``), D/reference/, or heldout/'s
    reference part."""
    path = require_root(root)
    kind = reference_kind(path, choice)
    if kind in ("balanced-train", "train"):
        return _with_identity(load_prepared(path, "train", hflip=False), prepared_identity(path, "train"))
    if kind == "folder":
        return _with_identity(load_prepared(path, "reference"), prepared_identity(path, "reference"))
    return _heldout_part(path, 0)


def prepared_floor(root: str | Path | None, choice: str = "auto") -> ImageDataset:
    """The noise floors' real images (module docstring): all of heldout/ beside a user reference folder, else
    heldout/'s floor part (disjoint from the judge's calibration images and the heldout reference)."""
    path = require_root(root)
    if reference_kind(path, choice) == "folder":
        return _with_identity(_heldout_or_fail(path), prepared_identity(path, "heldout"))
    return _heldout_part(path, 1)


def prepared_calibration(root: str | Path | None, choice: str = "auto") -> ImageDataset:
    """The real images the class judge is calibrated on, never seen by the domain CNN and disjoint from the
    floors' (module docstring): D/reference/ when it is the reference, else heldout/'s reference part."""
    path = require_root(root)
    if reference_kind(path, choice) == "folder":
        return _with_identity(load_prepared(path, "reference"), prepared_identity(path, "reference"))
    return _heldout_part(path, 0)


def prepared_summary(root: str | Path | None) -> dict[str, Any]:
    """What a run records about its data, from _meta.json alone: training images, classes, their names and
    counts, the imbalance rho (largest over smallest non-empty class), the digest, the image shape, the held-out
    count and whether a reference folder was prepared."""
    path = require_root(root)
    meta = read_prepared_meta(path)
    counts = [int(c) for c in meta["splits"]["train"]["counts"]]
    present = [c for c in counts if c > 0]
    heldout = meta["splits"].get("heldout", {}).get("rows", 0)
    return {"root": str(path), "num_images": int(meta["splits"]["train"]["rows"]),
            "num_classes": len(meta["class_names"]), "class_names": list(meta["class_names"]), "counts": counts,
            "rho": max(present) / min(present) if present else None, "digest": meta["digest"],
            "image_shape": list(meta["image_shape"]), "heldout_images": int(heldout),
            "reference_folder": "reference" in meta["splits"]}
