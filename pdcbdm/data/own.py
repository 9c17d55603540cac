"""A prepared folder as the data set of a run (``data.dataset=parquet``, ``data.root=D``).

Everything about the data comes from D/_meta.json (``pdcbdm.data.prepared``): the image shape, the class names and
the per-class counts; the images are the memory-mapped _images.npy of each split, never decoded or copied whole.

What an evaluation scores against:
  * reference: D/reference/ when the user supplied one (``reference_kind`` "reference"); otherwise the reference
    part of D/heldout/ (``reference_kind`` "heldout");
  * floor pool (the real images of the noise floors): the rest of D/heldout/. With a user reference the whole of
    heldout/ is the pool; without one, heldout/ is split per class, so that the floors' real draws never contain
    reference images (a draw that overlaps the set it is scored against would understate every floor).
The split of heldout/ is fixed (seed ``HELDOUT_SPLIT_SEED``, independent of the config), so that every run, seed and
machine scores against the same reference: per class with m images, the reference takes ceil(m / 2), and all of
them while m <= 2 (the class judge needs 2 images of every class to calibrate).

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
           "prepared_heldout", "prepared_reference", "prepared_floor", "reference_kind", "prepared_summary",
           "heldout_parts", "prepared_identity"]

PREPARED = "parquet"
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


def reference_kind(root: str | Path | None) -> str:
    """"reference" when D has a user-supplied reference split, else "heldout"."""
    return "reference" if "reference" in read_prepared_meta(require_root(root))["splits"] else "heldout"


def _heldout_or_fail(path: Path) -> ImageDataset:
    if "heldout" not in read_prepared_meta(path)["splits"]:
        raise ValueError(f"{path}: no heldout split, which the evaluation needs (its reference, noise floors and "
                         f"class judge); prepare the data again with a held-out share")
    return load_prepared(path, "heldout")


def prepared_reference(root: str | Path | None) -> ImageDataset:
    """The evaluation's reference set (module docstring): D/reference/, else heldout/'s reference part."""
    path = require_root(root)
    if reference_kind(path) == "reference":
        return _with_identity(load_prepared(path, "reference"), prepared_identity(path, "reference"))
    heldout = _heldout_or_fail(path)
    rows, _ = heldout_parts(heldout.labels.numpy(), heldout.num_classes)
    return _with_identity(heldout.subset(rows), prepared_identity(path, "heldout-reference-part"))


def prepared_floor(root: str | Path | None) -> ImageDataset:
    """The noise floors' real images (module docstring): heldout/ outside the reference."""
    path = require_root(root)
    heldout = _heldout_or_fail(path)
    if reference_kind(path) == "reference":
        return _with_identity(heldout, prepared_identity(path, "heldout"))
    _, rows = heldout_parts(heldout.labels.numpy(), heldout.num_classes)
    return _with_identity(heldout.subset(rows), prepared_identity(path, "heldout-floor-part"))


def prepared_summary(root: str | Path | None) -> dict[str, Any]:
    """What a run records about its data, from _meta.json alone: training images, classes, their names and
    counts, the imbalance rho (largest over smallest non-empty class), the digest, the image shape, the held-out
    count and the kind of reference."""
    path = require_root(root)
    meta = read_prepared_meta(path)
    counts = [int(c) for c in meta["splits"]["train"]["counts"]]
    present = [c for c in counts if c > 0]
    heldout = meta["splits"].get("heldout", {}).get("rows", 0)
    return {"root": str(path), "num_images": int(meta["splits"]["train"]["rows"]),
            "num_classes": len(meta["class_names"]), "class_names": list(meta["class_names"]), "counts": counts,
            "rho": max(present) / min(present) if present else None, "digest": meta["digest"],
            "image_shape": list(meta["image_shape"]), "heldout_images": int(heldout),
            "reference_kind": reference_kind(path)}
