"""Parquet storage of an ImageDataset: PNG-encoded shards, a class-counts table and _meta.json.

Folder layout written by `write_parquet`:
    part-00000.parquet ...  columns image (PNG bytes), label (int64), class_name (string)
    _counts.parquet         columns label, class_name, count, group ("head"/"tail", Eq. 10's split)
    _meta.json              written last: its presence marks the folder complete

The side files start with an underscore, which Parquet dataset discovery skips: the folder itself is a Parquet
data set of the shards, so ``pandas.read_parquet(folder)`` and ``pyarrow.dataset.dataset(folder)`` open it
directly. Folders of the earlier layout (``meta.json`` and ``counts.parquet`` among the shards) are still read,
and rewriting one moves it to this layout.

Every file is written atomically, so an interrupted run leaves no _meta.json that lists a partial shard. Writing is
idempotent: files whose bytes would not change are not touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pdcbdm.io import atomic_write_bytes, is_temp_name
from .dataset import ImageDataset
from .split import HeadTailSplit, head_tail_split

__all__ = ["ParquetImageDataset", "write_parquet", "WriteReport", "META_FILE", "COUNTS_FILE", "FORMAT"]

FORMAT = "pdcbdm-parquet-images"
FORMAT_VERSION = 1
META_FILE = "_meta.json"
COUNTS_FILE = "_counts.parquet"
# the first layout's names: among the shards they broke pandas/pyarrow dataset discovery; read, never written
LEGACY_META_FILE = "meta.json"
LEGACY_COUNTS_FILE = "counts.parquet"
_SHARD_RE = re.compile(r"part-\d{5}\.parquet")
_RESERVED = frozenset({"format", "version", "num_rows", "image_shape", "class_names", "counts", "hflip",
                       "head", "tail", "shards", "counts_file"})


@dataclass
class WriteReport:
    """What `write_parquet` did: the files it (re)wrote, those already up to date, and stale ones removed."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of one uint8 [C, H, W] image (C = 1: grayscale, C = 3: RGB)."""
    array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def _decode_png(data: bytes, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """uint8 [C, H, W] array of one PNG; ValueError naming `where` if its shape is not `shape`."""
    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if array.shape != shape or array.dtype != np.uint8:
        raise ValueError(f"{where}: image of shape {array.shape} ({array.dtype}), expected {shape} uint8")
    return array


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _shard_bytes(data: ImageDataset, start: int, stop: int) -> bytes:
    images = data.images[start:stop].numpy()
    labels = data.labels[start:stop].tolist()
    table = pa.table({
        "image": pa.array([_encode_png(im) for im in images], type=pa.binary()),
        "label": pa.array(labels, type=pa.int64()),
        "class_name": pa.array([data.class_names[k] for k in labels], type=pa.string()),
    })
    return _table_bytes(table)


def _counts_bytes(data: ImageDataset, split: HeadTailSplit | None) -> bytes:
    counts = data.counts()
    groups = [split.group_of(k) if split else "head" for k in range(data.num_classes)]
    return _table_bytes(pa.table({
        "label": pa.array(range(data.num_classes), type=pa.int64()),
        "class_name": pa.array(data.class_names, type=pa.string()),
        "count": pa.array(counts, type=pa.int64()),
        "group": pa.array(groups, type=pa.string()),
    }))


def _meta_path(out: Path) -> Path | None:
    """The folder's meta file: _meta.json, else the earlier layout's meta.json, else None."""
    for name in (META_FILE, LEGACY_META_FILE):
        if (out / name).is_file():
            return out / name
    return None


def _read_meta(out: Path) -> dict[str, Any] | None:
    path = _meta_path(out)
    if path is None:
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); remove it or use overwrite") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} meta file; use another folder or overwrite")
    return meta


def _check_target(out: Path, meta: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse to write into a folder holding another data set or foreign files, unless `overwrite`."""
    if overwrite or not out.exists():
        return
    existing = _read_meta(out)
    if existing is not None:
        old = _flatten({k: v for k, v in existing.items() if k not in _RESERVED})
        new = _flatten(meta)
        differs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differs:
            detail = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in differs)
            raise ValueError(f"{out} already holds a different data set ({detail}); "
                             "use overwrite (--overwrite) or another output folder")
        return
    foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name))
    if foreign:
        raise ValueError(f"{out} is not empty and holds files this writer did not make ({foreign[:5]}); "
                         "use overwrite (--overwrite) or another output folder")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"params": {"seed": 0}} -> {"params.seed": 0}, so an error can name the one field that differs."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _manifest(out: Path) -> set[str]:
    """The files an earlier write listed: its meta file (_meta.json, or the earlier layout's meta.json, when it is
    this writer's format), the shards and the counts file it names. A rewrite removes only these (and its own
    temporary files): a user's own meta.json or counts.parquet in the folder is never deleted."""
    names: set[str] = set()
    for meta_name, counts_name in ((META_FILE, COUNTS_FILE), (LEGACY_META_FILE, LEGACY_COUNTS_FILE)):
        try:
            meta = json.loads((out / meta_name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            continue
        shards = meta.get("shards") if isinstance(meta.get("shards"), list) else []
        names |= {meta_name, counts_name, str(meta.get("counts_file") or counts_name)}
        names |= {str(e["file"]) for e in shards if isinstance(e, dict) and "file" in e}
    return names


def _is_ours(name: str) -> bool:
    return (bool(_SHARD_RE.fullmatch(name)) or name in (META_FILE, COUNTS_FILE, LEGACY_META_FILE, LEGACY_COUNTS_FILE)
            or is_temp_name(name))


def _write_if_changed(path: Path, data: bytes, report: WriteReport) -> None:
    if path.is_file() and _sha256(path.read_bytes()) == _sha256(data):
        report.unchanged.append(path.name)
        return
    atomic_write_bytes(path, data)
    report.written.append(path.name)


def _encode_all(data: ImageDataset, shard_rows: int) -> dict[str, bytes]:
    """File name -> bytes of every shard, in row order."""
    n = len(data)
    starts = range(0, n, shard_rows) if n else [0]
    return {f"part-{i:05d}.parquet": _shard_bytes(data, s, min(s + shard_rows, n)) for i, s in enumerate(starts)}


def _full_meta(data: ImageDataset, meta: Mapping[str, Any], shards: dict[str, bytes],
               split: HeadTailSplit | None, shard_rows: int) -> dict[str, Any]:
    rows = [min(shard_rows, len(data) - i * shard_rows) for i in range(len(shards))]
    return {
        "format": FORMAT, "version": FORMAT_VERSION, **meta,
        "num_rows": len(data), "image_shape": list(data.image_shape), "class_names": data.class_names,
        "counts": data.counts(), "hflip": data.hflip,
        "head": list(split.head) if split else None, "tail": list(split.tail) if split else None,
        "counts_file": COUNTS_FILE,
        "shards": [{"file": name, "rows": max(r, 0), "sha256": _sha256(b)}
                   for (name, b), r in zip(shards.items(), rows)],
    }


def write_parquet(dataset: ImageDataset, out_dir: str | Path, *, shard_rows: int, meta: Mapping[str, Any],
                  head_tail: HeadTailSplit | None = None, overwrite: bool = False) -> WriteReport:
    """Write `dataset` to `out_dir` as PNG Parquet shards, _counts.parquet and _meta.json (last).

    Args:
        dataset: the images, labels and class names to store (row order is kept).
        out_dir: output folder (created if needed).
        shard_rows: images per shard file (>= 1).
        meta: JSON-serialisable description of how the data set was made (e.g. {"dataset": ..., "params": ...});
            stored at the top level of _meta.json and compared with an existing one to decide whether the
            folder holds the same data set. Must not use the reserved keys (format, shards, counts, ...).
        head_tail: the head/tail split recorded in _counts.parquet; None computes head_tail_split(counts) with its
            defaults (ratio 0.7, mode "classes", seed 0). Data sets with one class record every class as "head".
        overwrite: replace a folder that holds another data set or files this writer did not make (only this
            writer's own files are deleted).

    Returns:
        A WriteReport listing the files written, left unchanged and removed.
    """
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"shard_rows must be a positive int, got {shard_rows!r}")
    if dataset.image_shape[0] not in (1, 3):
        raise ValueError(f"only 1- or 3-channel images can be stored as PNG, got image_shape {dataset.image_shape}")
    clash = sorted(set(meta) & _RESERVED)
    if clash:
        raise ValueError(f"meta uses reserved keys {clash}; rename them")
    meta = json.loads(json.dumps(dict(meta)))  # normalises tuples to lists so comparisons with the file hold
    out = Path(out_dir)
    _check_target(out, meta, overwrite)
    if head_tail is None and dataset.num_classes >= 2:
        head_tail = head_tail_split(dataset.counts())
    shards = _encode_all(dataset, shard_rows)
    full = _full_meta(dataset, meta, shards, head_tail, shard_rows)
    meta_bytes = (json.dumps(full, indent=2) + "\n").encode()
    return _commit(out, shards, _counts_bytes(dataset, head_tail), meta_bytes)


def _commit(out: Path, shards: dict[str, bytes], counts: bytes, meta_bytes: bytes) -> WriteReport:
    """Write what changed; _meta.json is removed first and rewritten last so a reader never sees a mix. The
    earlier layout's meta.json goes first too (a reader would fall back to it), its counts.parquet as stale."""
    report = WriteReport()
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META_FILE
    files = {**shards, COUNTS_FILE: counts}
    written_before = _manifest(out)
    stale = sorted(p.name for p in out.iterdir()
                   if (p.name in written_before or is_temp_name(p.name)) and p.name not in files
                   and p.name not in (META_FILE, LEGACY_META_FILE))
    up_to_date = meta_path.is_file() and meta_path.read_bytes() == meta_bytes and not stale and all(
        (out / name).is_file() and _sha256((out / name).read_bytes()) == _sha256(b) for name, b in files.items())
    if up_to_date:
        report.unchanged.extend([*files, META_FILE])
        return report
    meta_path.unlink(missing_ok=True)
    if LEGACY_META_FILE in written_before:
        (out / LEGACY_META_FILE).unlink()
        report.removed.append(LEGACY_META_FILE)
    for name, data in files.items():
        _write_if_changed(out / name, data, report)
    for name in stale:
        (out / name).unlink(missing_ok=True)
        report.removed.append(name)
    atomic_write_bytes(meta_path, meta_bytes)
    report.written.append(META_FILE)
    return report


class ParquetImageDataset(ImageDataset):
    """An ImageDataset read back from a folder written by `write_parquet` / pipelines.prepare_data.

    Everything is decoded into memory on construction, so it behaves exactly like the in-memory ImageDataset
    (`batch`, `subset`, `counts`, flips as recorded in _meta.json). The shards alone are a plain Parquet data
    set: ``pandas.read_parquet(path)`` gives their image (PNG bytes), label and class_name columns.

    Args:
        path: the folder holding _meta.json (or the earlier layout's meta.json) and the shards.
        verify: check every shard's sha256 against _meta.json (cheap; catches shards replaced by another run).

    Attributes:
        meta: the parsed _meta.json.
        path: the folder.
    """

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"Parquet data set folder {self.path} does not exist; "
                                    "create it with python -m pipelines.prepare_data --out DIR")
        meta = _read_meta(self.path)
        if meta is None:
            raise FileNotFoundError(f"{self.path / META_FILE} not found: {self.path} is not a finished "
                                    "prepare_data output (an interrupted run leaves no _meta.json); run it again")
        self.meta = meta
        shape = tuple(int(s) for s in meta["image_shape"])
        parts = [self._read_shard(entry, shape, verify) for entry in meta["shards"]]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts])) if parts else torch.empty(0, *shape)
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts])) if parts else torch.empty(0)
        if images.shape[0] != meta["num_rows"]:
            raise ValueError(f"{self.path}: shards hold {images.shape[0]} rows, _meta.json says {meta['num_rows']}")
        super().__init__(images.to(torch.uint8), labels.to(torch.int64), meta["class_names"],
                         hflip=bool(meta["hflip"]))

    def _read_shard(self, entry: Mapping[str, Any], shape: tuple[int, int, int],
                    verify: bool) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [n, C, H, W] and labels int64 [n] of one shard listed in _meta.json."""
        path = self.path / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in {self.path / META_FILE} is missing")
        raw = path.read_bytes()
        if verify and _sha256(raw) != entry["sha256"]:
            raise ValueError(f"shard {path} does not match the sha256 in {self.path / META_FILE}; "
                             "it was changed after writing: prepare the data again")
        table = pq.read_table(pa.BufferReader(raw))
        missing = {"image", "label", "class_name"} - set(table.column_names)
        if missing or table.num_rows != entry["rows"]:
            raise ValueError(f"shard {path}: columns {table.column_names}, {table.num_rows} rows; expected "
                             f"image/label/class_name and {entry['rows']} rows")
        images = [_decode_png(b, shape, f"{path} row {i}") for i, b in enumerate(table["image"].to_pylist())]
        labels = np.asarray(table["label"].to_numpy(), dtype=np.int64)
        names = self.meta["class_names"]
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(f"shard {path}: labels outside [0, {len(names)})")
        if table["class_name"].to_pylist() != [names[k] for k in labels.tolist()]:
            raise ValueError(f"shard {path}: class_name column disagrees with the class_names in _meta.json")
        stack = np.stack(images) if images else np.empty((0, *shape), np.uint8)
        return stack, labels
