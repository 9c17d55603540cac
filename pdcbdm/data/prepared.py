"""A user's own data set, prepared once (``python -m pipelines.prepare_data --from-folder ...``) and read by every
command that trains or scores on it (``data.dataset=parquet``, ``data.root=D``).

Layout of a prepared folder D:
    D/train/            the training images: the Parquet layout of ``write_parquet`` (``pandas.read_parquet(D/train)``
                        opens it), plus _images.npy (uint8 [N, C, H, W]) and _labels.npy (int64 [N])
    D/heldout/          real images held out per class (the noise floors' and the judge's), same layout
    D/reference/        optional: a reference set the user supplied (``--reference-folder``), same layout
    D/_report.json      what preparation read, kept and skipped, and the data's imbalance
    D/_skipped.csv      path, reason: every input file that was not kept
    D/_meta.json        written last (its presence marks D complete): ``FORMAT``, the class names, image shape, per
                        split its rows, per-class counts, array file sizes and the sha256 of every file; the
                        transforms applied; the digest of the data (``data_digest``)

Images are decoded once, at preparation: every trainer and worker opens _images.npy memory-mapped, so the workers
of a node share one copy through the page cache and start without decoding. The PNG shards are the portable copy
(readable by pandas, pyarrow, any Parquet tool); _images.npy is the fast one. Each file is written atomically and
_meta.json last, so an interrupted preparation leaves no folder that reads as complete.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdcbdm.io import atomic_write, write_json_atomic
from .dataset import ImageDataset
from .parquet import write_parquet
from .split import HeadTailSplit

__all__ = ["FORMAT", "META_FILE", "SPLITS", "write_split", "write_prepared_meta", "read_prepared_meta",
           "load_prepared", "data_digest", "is_prepared"]

FORMAT = "pdcbdm-prepared-images"
FORMAT_VERSION = 1
META_FILE = "_meta.json"
SPLITS = ("train", "heldout", "reference")
IMAGES_FILE, LABELS_FILE = "_images.npy", "_labels.npy"  # "_": Parquet discovery skips them
SHARD_ROWS = 10_000


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write ``array`` as .npy atomically; its entry in _meta.json (file, bytes, sha256)."""
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256_file(path)}


def write_split(root: str | Path, split: str, images: np.ndarray, labels: np.ndarray,
                class_names: Sequence[str], head_tail: HeadTailSplit, *,
                shard_rows: int = SHARD_ROWS) -> dict[str, Any]:
    """Write one split of a prepared folder: the Parquet shards (PNG), _images.npy and _labels.npy.

    Args:
        root: the prepared folder D.
        split: one of ``SPLITS``.
        images: uint8 [N, C, H, W] (C = 1 or 3).
        labels: integer [N] in [0, K).
        class_names: the K class names (shared by every split).
        head_tail: the head/tail split of the training counts (recorded in the shards' _counts.parquet).
        shard_rows: images per Parquet shard.

    Returns:
        The split's entry for _meta.json (``write_prepared_meta``): rows, per-class counts, files and hashes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    data = ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), class_names)
    folder = Path(root) / split
    write_parquet(data, folder, shard_rows=shard_rows, meta={"dataset": "parquet", "split": split},
                  head_tail=head_tail, overwrite=True)
    return {"rows": int(len(data)), "counts": data.counts(), "images": _save_array(folder / IMAGES_FILE, images),
            "labels": _save_array(folder / LABELS_FILE, labels),
            "shards": json.loads((folder / META_FILE).read_text())["shards"]}


def data_digest(splits: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 over the recorded hashes of every split's arrays: the data's identity for MLflow and the cluster
    check, computed from _meta.json without reading the images."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        for key in ("images", "labels"):
            digest.update(f"{name}/{key}:{splits[name][key]['sha256']}\n".encode())
    return digest.hexdigest()


def write_prepared_meta(root: str | Path, *, class_names: Sequence[str], image_shape: Sequence[int],
                        splits: Mapping[str, Mapping[str, Any]], transforms: Mapping[str, Any],
                        source: Mapping[str, Any]) -> Path:
    """Write D/_meta.json, last: the folder is complete from here on."""
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "class_names": [str(n) for n in class_names],
            "image_shape": [int(s) for s in image_shape], "splits": dict(splits),
            "transforms": dict(transforms), "source": dict(source), "digest": data_digest(splits)}
    return write_json_atomic(Path(root) / META_FILE, meta)


def is_prepared(root: str | Path) -> bool:
    """Whether ``root`` holds a complete prepared folder of this format."""
    try:
        return json.loads((Path(root) / META_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_prepared_meta(root: str | Path) -> dict[str, Any]:
    """D/_meta.json, checked; ValueError naming the folder when it is missing, incomplete or of another format."""
    path = Path(root) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root}: not a prepared data set (no {META_FILE}; prepare one with `python -m "
                                f"pipelines.prepare_data --from-folder DIR --size S --out {root}`)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a prepared data set of format {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {meta.get('version')}, this pdcbdm reads {FORMAT_VERSION}; "
                         f"prepare the data again")
    if "train" not in meta.get("splits", {}):
        raise ValueError(f"{path}: no train split")
    return meta


def _open_array(folder: Path, entry: Mapping[str, Any], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The split's .npy memory-mapped read-only, checked against _meta.json by size and shape (not re-hashed: a
    worker must start without reading the whole array)."""
    path = folder / entry["file"]
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        raise ValueError(f"{path}: missing or not the file _meta.json recorded ({entry['bytes']} bytes); prepare "
                         f"the data again")
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.shape != shape or array.dtype != dtype:
        raise ValueError(f"{path}: shape {array.shape} {array.dtype}, _meta.json says {shape} {dtype}")
    return array


def load_prepared(root: str | Path, split: str = "train", *, hflip: bool = False) -> ImageDataset:
    """One split of a prepared folder as an ImageDataset whose images are the memory-mapped _images.npy (no decode,
    no copy: the pages are shared with every other process that opens it)."""
    meta = read_prepared_meta(root)
    if split not in meta["splits"]:
        raise ValueError(f"{root}: no {split!r} split (it has {sorted(meta['splits'])})")
    entry, folder = meta["splits"][split], Path(root) / split
    n, shape = int(entry["rows"]), tuple(int(s) for s in meta["image_shape"])
    images = _open_array(folder, entry["images"], (n, *shape), np.dtype(np.uint8))
    labels = _open_array(folder, entry["labels"], (n,), np.dtype(np.int64))
    with warnings.catch_warnings():  # torch warns that the mapping is read-only: nothing writes to a data set
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(images)
    return ImageDataset(tensor, torch.from_numpy(np.array(labels)), meta["class_names"], hflip=hflip)
