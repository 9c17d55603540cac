"""A user's own images as (file, class) pairs, decoded with the preparation's transforms (``pipelines.prepare_data
--from-folder`` / ``--from-table``).

Sources:
    a folder with one top-level subfolder per class (files nested at any depth inside it); class names sorted as
        strings, as torchvision's ImageFolder sorts them. A folder holding the ``datasets`` library's
        ``metadata.csv`` / ``metadata.jsonl`` is read as a table instead (its ``file_name`` column, paths relative
        to the folder).
    a table (CSV, TSV, Parquet, JSON lines, or whitespace-separated text with or without a header) of path and
        label, or of path and one 0/1 column per class (ISIC's ground-truth CSV); paths relative to the image root,
        with or without their extension.
Hidden entries (a leading ``.``: ``.DS_Store``, ``.ipynb_checkpoints``, AppleDouble ``._x``; ``__MACOSX``,
``Thumbs.db``, ``desktop.ini``) are never read and only counted.

Decoding (``decode_image``): every file is fully decoded (``load()``: ``verify()`` passes truncated JPEGs); EXIF
orientation applied; transparency composited on the background colour; CMYK and other colour modes converted to RGB;
16-bit and float images refused (Pillow would clip them to 255) unless ``high_bit_depth="minmax"`` scales each one
from its own minimum and maximum; then a centre crop (or a pad to a square, or nothing) and an antialiased bicubic
resize to size x size. A file that cannot be used comes back with the reason instead of pixels.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["Entry", "Listing", "DecodeOptions", "Decoded", "list_folder", "list_table", "list_source",
           "decode_image", "decode_all", "is_hidden", "check_size", "METADATA_FILES", "CROPS", "CHANNELS",
           "BACKGROUNDS", "HIGH_BIT_DEPTH", "REASON_NO_LABEL", "REASON_OUTSIDE", "REASON_HIGH_BIT"]

CROPS = ("center", "pad", "none")
CHANNELS = ("auto", "1", "3")
BACKGROUNDS = {"white": 255, "black": 0}
HIGH_BIT_DEPTH = ("refuse", "minmax")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
HIDDEN_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
PATH_COLUMNS = ("file_name", "path", "filepath", "file", "filename", "image", "image_id", "image_name")
# reasons that describe the listing, not a broken file: they are listed but do not count against --max-bad
REASON_NO_LABEL = "no label"
REASON_OUTSIDE = "outside the class folders"
REASON_HIGH_BIT = "16-bit or float image"
_HIGH_BIT_MODES = ("I", "F")  # and every "I;16..." mode
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class Entry:
    """One labelled input file: ``path`` on disk (may not exist when a table names a missing file), ``name`` as the
    user knows it (relative to the source), ``label`` the class name."""

    path: Path
    name: str
    label: str


@dataclass
class Listing:
    """What a source holds: the labelled files to decode, the class names (sorted, empty classes dropped), the
    entries refused while listing as (name, reason), the hidden entries ignored, warnings, and a fingerprint of
    the input (relative paths, sizes, modification times and any table's bytes)."""

    entries: list[Entry]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    hidden: int = 0
    warnings: list[str] = field(default_factory=list)
    fingerprint: str = ""


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is a system or editor artefact that is never an image of the data set."""
    return name.startswith(".") or name in HIDDEN_NAMES


def check_size(size: int) -> int:
    """``size`` if it is a valid output size (a multiple of 4 from 8: the U-Net halves it twice), else ValueError."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 4:
        raise ValueError(f"--size must be a multiple of 4 from 8 (32, 64, 128, ...), got {size!r}")
    return size


def _walk(root: Path) -> tuple[list[Path], int]:
    """Every non-hidden file under ``root`` (sorted, hidden folders not entered) and the number of hidden entries."""
    files: list[Path] = []
    hidden = 0
    for folder, dirs, names in os.walk(root):
        hidden += sum(is_hidden(d) for d in dirs) + sum(is_hidden(n) for n in names)
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        files.extend(Path(folder) / n for n in sorted(names) if not is_hidden(n))
    return sorted(files), hidden


def _fingerprint(root: Path, files: Iterable[Path], extra: bytes = b"") -> str:
    """sha256 of the relative path, size and modification time of every file, and of ``extra``: equal inputs give
    equal fingerprints without reading the images."""
    digest = hashlib.sha256(extra)
    for path in files:
        try:
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path.relative_to(root)}\0missing\n".encode())
    return digest.hexdigest()


def list_folder(root: str | Path) -> Listing:
    """The class-per-subfolder layout: every file under ``root/<class>/`` (any depth) labelled ``<class>``.

    Files directly in ``root`` are listed as outside the class folders; a class folder holding no file is dropped
    with a warning. Raises FileNotFoundError / NotADirectoryError naming ``root``.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"--from-folder {root}: no such folder")
    if not root.is_dir():
        raise NotADirectoryError(f"--from-folder {root}: not a folder")
    children = sorted(root.iterdir(), key=lambda p: p.name)
    hidden = sum(is_hidden(p.name) for p in children)
    visible = [p for p in children if not is_hidden(p.name)]
    listing = Listing(entries=[], class_names=[], hidden=hidden)
    listing.skipped = [(p.name, REASON_OUTSIDE) for p in visible if not p.is_dir()]
    all_files = [p for p in visible if not p.is_dir()]
    for folder in (p for p in visible if p.is_dir()):
        files, hidden_inside = _walk(folder)
        listing.hidden += hidden_inside
        all_files += files
        if not files:
            listing.warnings.append(f"class folder {folder.name!r} holds no file: class dropped")
            continue
        listing.class_names.append(folder.name)
        listing.entries += [Entry(f, str(f.relative_to(root)), folder.name) for f in files]
    listing.fingerprint = _fingerprint(root, all_files)
    return listing


def read_table(path: str | Path, path_column: str | None = None) -> pd.DataFrame:
    """A table of paths and labels, its format chosen by the file's extension: .csv, .tsv, .parquet/.pq,
    .jsonl/.ndjson; anything else is whitespace-separated text (its first row is a header when it names
    ``path_column`` or one of PATH_COLUMNS)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such table file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            table = pd.read_parquet(path)
        elif suffix in (".jsonl", ".ndjson"):
            table = pd.read_json(path, lines=True, dtype=False)
        elif suffix in (".csv", ".tsv"):
            table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        else:
            table = _read_whitespace(path, (path_column,) if path_column else PATH_COLUMNS)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise ValueError(f"{path}: cannot be read as a {suffix or 'text'} table ({exc})") from None
    table.columns = [str(c) for c in table.columns]
    return table


def _read_whitespace(path: Path, header_names: Sequence[str]) -> pd.DataFrame:
    """A whitespace-separated table (``path label`` per line, as ImageNet's and CUB's lists); without a header
    its two columns are named ``path`` and ``label``."""
    table = pd.read_csv(path, sep=r"\s+", header=None, dtype=str, keep_default_na=False)
    first = [str(v) for v in table.iloc[0]] if len(table) else []
    if any(v in header_names for v in first):
        return table.iloc[1:].set_axis(first, axis=1).reset_index(drop=True)
    if table.shape[1] != 2:
        raise ValueError(f"{table.shape[1]} columns and no header row; write a header naming the path column")
    return table.set_axis(["path", "label"], axis=1)


def _path_column(table: pd.DataFrame, wanted: str | None, where: str) -> str:
    if wanted is not None:
        if wanted not in table.columns:
            raise ValueError(f"{where}: no column {wanted!r} (--path-column); columns: {list(table.columns)}")
        return wanted
    for name in PATH_COLUMNS:
        if name in table.columns:
            return name
    raise ValueError(f"{where}: no path column (tried {', '.join(PATH_COLUMNS)}); name it with --path-column; "
                     f"columns: {list(table.columns)}")


def _is_binary(column: pd.Series) -> bool:
    try:
        values = set(pd.to_numeric(column.astype(str), errors="raise").tolist())
    except (ValueError, TypeError):
        return False
    return values <= {0, 1}


def _label_columns(table: pd.DataFrame, path_col: str, label_col: str | None,
                   one_hot: Sequence[str] | None, where: str) -> tuple[str | None, list[str]]:
    """(label column, []) for a label table, (None, class columns) for a one-hot one. Without flags: ``label`` if
    the table has it, else every other column when all of them hold only 0 and 1 (ISIC's layout)."""
    if label_col is not None and one_hot:
        raise ValueError("--label-column and --label-columns exclude each other: one label column, or one 0/1 "
                         "column per class")
    wanted = [label_col] if label_col else list(one_hot or [])
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise ValueError(f"{where}: no column(s) {missing}; columns: {list(table.columns)}")
    if label_col or one_hot:
        return label_col, list(one_hot or [])
    if "label" in table.columns:
        return "label", []
    others = [c for c in table.columns if c != path_col]
    if len(others) >= 2 and all(_is_binary(table[c]) for c in others):
        return None, others
    raise ValueError(f"{where}: no label column; name it with --label-column C, or the one-hot class columns "
                     f"with --label-columns A,B,...; columns: {list(table.columns)}")


def _one_hot_label(row: Sequence[Any], names: Sequence[str]) -> tuple[str | None, str | None]:
    """(class name, None) for a row with exactly one class set, (None, reason) otherwise."""
    try:
        values = [float(v) for v in row]
    except (TypeError, ValueError):
        return None, f"one-hot row holds a value that is not 0 or 1: {list(row)}"
    if any(v not in (0.0, 1.0) for v in values):
        return None, f"one-hot row holds a value that is not 0 or 1: {list(row)}"
    chosen = [n for n, v in zip(names, values) if v == 1.0]
    if len(chosen) != 1:
        return None, f"one-hot row sets {len(chosen)} classes ({', '.join(chosen) or 'none'})"
    return chosen[0], None


def _row_labels(table: pd.DataFrame, label_col: str | None, one_hot: list[str]) -> list[tuple[str | None, str]]:
    """Per row (class name, "") or (None, reason)."""
    if label_col is not None:
        out = []
        for value in table[label_col].tolist():
            text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()
            out.append((text, "") if text else (None, REASON_NO_LABEL))
        return out
    return [(lab, why or "") for lab, why in
            (_one_hot_label(row, one_hot) for row in table[one_hot].itertuples(index=False))]


def _resolve(name: str, by_rel: dict[str, Path], by_stem: dict[str, list[Path]]) -> Path | None:
    """The file a table row names: the path relative to the image root (or absolute), else the unique file whose
    path without extension matches (ISIC lists ``ISIC_0024306`` for ``ISIC_0024306.jpg``)."""
    candidate = Path(name)
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    key = candidate.as_posix()  # pathlib drops a leading "./"
    if key in by_rel:
        return by_rel[key]
    matches = by_stem.get(key, [])
    return matches[0] if len(matches) == 1 else None


def list_table(table_path: str | Path, image_root: str | Path | None = None, *, path_column: str | None = None,
               label_column: str | None = None, label_columns: Sequence[str] | None = None) -> Listing:
    """The rows of a table as labelled files under ``image_root`` (default: the table's folder).

    A row naming no file, listed twice with different labels, or with a bad one-hot row is refused with the reason;
    a file under the image root that no row names is listed as having no label.
    """
    table_path = Path(table_path)
    where = str(table_path)
    table = read_table(table_path, path_column)
    root = Path(image_root) if image_root is not None else table_path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"--image-root {root}: no such folder")
    path_col = _path_column(table, path_column, where)
    label_col, one_hot = _label_columns(table, path_col, label_column, label_columns, where)
    files, hidden = _walk(root)
    files = [f for f in files if f.resolve() != table_path.resolve()]
    by_rel = {f.relative_to(root).as_posix(): f for f in files}
    by_stem: dict[str, list[Path]] = {}
    for rel, f in by_rel.items():
        by_stem.setdefault(rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel, []).append(f)
    listing = Listing(entries=[], class_names=[], hidden=hidden)
    labels_of: dict[Path, set[str]] = {}
    rows: list[tuple[str, Path | None, str | None, str]] = []
    for name, (label, why) in zip((str(v).strip() for v in table[path_col].tolist()),
                                  _row_labels(table, label_col, one_hot)):
        path = _resolve(name, by_rel, by_stem)
        rows.append((name, path, label, why))
        if path is not None and label is not None:
            labels_of.setdefault(path, set()).add(label)
    _collect_rows(listing, rows, labels_of)
    named = {p for _, p, _, _ in rows if p is not None}
    listing.skipped += [(f.relative_to(root).as_posix(), REASON_NO_LABEL) for f in files if f not in named]
    listing.class_names = sorted({e.label for e in listing.entries})
    empty = sorted(set(one_hot) - set(listing.class_names))
    listing.warnings += [f"class column {c!r} sets no row: class dropped" for c in empty]
    listing.fingerprint = _fingerprint(root, files, hashlib.sha256(table_path.read_bytes()).digest())
    return listing


def _collect_rows(listing: Listing, rows: list[tuple[str, Path | None, str | None, str]],
                  labels_of: dict[Path, set[str]]) -> None:
    """Turn the table's rows into entries (one per file) and refusals."""
    seen: set[Path] = set()
    for name, path, label, why in rows:
        if path is None:
            listing.skipped.append((name, "label names no file"))
        elif label is None:
            if path not in labels_of:  # another row may label it
                listing.skipped.append((name, why))
        elif len(labels_of[path]) > 1:
            if path not in seen:
                listing.skipped.append((name, f"listed with different labels ({', '.join(sorted(labels_of[path]))})"))
            seen.add(path)
        elif path not in seen:
            seen.add(path)
            listing.entries.append(Entry(path, name, label))


def list_source(*, folder: str | Path | None = None, table: str | Path | None = None,
                image_root: str | Path | None = None, path_column: str | None = None,
                label_column: str | None = None, label_columns: Sequence[str] | None = None) -> Listing:
    """A folder (read as a table when it holds ``metadata.csv``/``metadata.jsonl``) or a table, as a Listing with
    its entries in a fixed order (class name, then file path: the same whichever way a table names the file)."""
    if folder is not None:
        metadata = [Path(folder) / m for m in METADATA_FILES if (Path(folder) / m).is_file()]
        if metadata:
            listing = list_table(metadata[0], folder, path_column=path_column or "file_name",
                                 label_column=label_column, label_columns=label_columns)
        else:
            listing = list_folder(folder)
    elif table is not None:
        listing = list_table(table, image_root, path_column=path_column, label_column=label_column,
                             label_columns=label_columns)
    else:
        raise ValueError("list_source needs a folder or a table")
    listing.entries.sort(key=lambda e: (e.label, str(e.path)))
    return listing


@dataclass(frozen=True)
class DecodeOptions:
    """The transforms of a preparation: output size, crop (center, pad, none), channels (auto, 1, 3), the colour
    transparency and padding are composited on (white, black), and what to do with 16-bit/float images."""

    size: int
    crop: str = "center"
    channels: str = "auto"
    alpha_background: str = "white"
    high_bit_depth: str = "refuse"

    def __post_init__(self) -> None:
        check_size(self.size)
        for name, value, valid in (("--crop", self.crop, CROPS), ("--channels", self.channels, CHANNELS),
                                   ("--alpha-background", self.alpha_background, tuple(BACKGROUNDS)),
                                   ("--high-bit-depth", self.high_bit_depth, HIGH_BIT_DEPTH)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")


@dataclass(frozen=True)
class Decoded:
    """One decoded file: ``pixels`` uint8 [size, size] (grey) or [size, size, 3], whether it was upscaled, or
    ``reason`` why it was not kept (pixels None)."""

    pixels: np.ndarray | None = None
    upscaled: bool = False
    reason: str | None = None

    @property
    def grey(self) -> bool:
        """Whether the image has one channel (grey source, or colour channels that are all equal)."""
        return self.pixels is not None and self.pixels.ndim == 2


def _open(path: Path) -> tuple[Image.Image | None, str | None]:
    """The fully decoded image, upright (EXIF orientation applied), or the reason it cannot be used."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file"
        with Image.open(path) as img:
            try:
                img.load()  # the whole file: verify() alone accepts a truncated JPEG
                return ImageOps.exif_transpose(img), None  # a copy: the file is closed on return
            # a broken file (or EXIF block) raises whatever its decoder raises; every kind means the same here
            except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error,
                    zlib.error) as exc:
                return None, f"truncated or corrupt ({exc})"
    except UnidentifiedImageError:
        return None, "not an image"
    except Image.DecompressionBombError as exc:
        return None, f"too large ({exc})"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"


def _is_high_bit(img: Image.Image) -> bool:
    return img.mode in _HIGH_BIT_MODES or img.mode.startswith("I;16")


def _minmax(img: Image.Image) -> Image.Image:
    """A 16-bit or float image scaled linearly from its own minimum (0) to its maximum (255); constant: 0."""
    values = np.asarray(img, dtype=np.float64)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    scaled = np.zeros_like(values) if high <= low else (values - low) * (255.0 / (high - low))
    return Image.fromarray(np.nan_to_num(scaled).round().clip(0, 255).astype(np.uint8), mode="L")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def _to_l_or_rgb(img: Image.Image, background: int) -> Image.Image:
    """Mode L or RGB: transparency composited on the background, CMYK/YCbCr/palette converted, and an RGB image
    whose three channels are equal reduced to L (exactly: Pillow's luma of (v, v, v) is v)."""
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        img = Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode in ("1", "L"):
        return img.convert("L")
    img = img.convert("RGB")
    array = np.asarray(img)
    if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 1], array[..., 2]):
        return img.convert("L")
    return img


def _fit(img: Image.Image, size: int, crop: str, background: int) -> tuple[Image.Image, bool]:
    """The image at size x size (centre crop, pad to a square, or a plain resize) and whether it was enlarged.
    Pillow's bicubic resize widens its filter when shrinking, so downscaling is antialiased."""
    w, h = img.size
    if crop == "pad":
        side = max(w, h)
        fill = background if img.mode == "L" else (background,) * 3
        canvas = Image.new(img.mode, (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img, w, h = canvas, side, side
    box = (0, 0, w, h)
    if crop == "center":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
    upscaled = box[2] - box[0] < size or box[3] - box[1] < size
    if (box[2] - box[0], box[3] - box[1]) == (size, size):
        return img.crop(box), upscaled
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box), upscaled


def decode_image(path: str | Path, options: DecodeOptions) -> Decoded:
    """One file decoded with every transform of ``options``, or the reason it is not kept (see the module's
    docstring for the rules). Never raises for a bad file."""
    img, reason = _open(Path(path))
    if img is None:
        return Decoded(reason=reason)
    background = BACKGROUNDS[options.alpha_background]
    if _is_high_bit(img):
        if options.high_bit_depth != "minmax":
            return Decoded(reason=f"{REASON_HIGH_BIT} (mode {img.mode}); --high-bit-depth minmax scales it")
        img = _minmax(img)
    img = _to_l_or_rgb(img, background)
    if options.channels == "1":
        img = img.convert("L")
    img, upscaled = _fit(img, options.size, options.crop, background)
    return Decoded(pixels=np.asarray(img, dtype=np.uint8).copy(), upscaled=upscaled)


def decode_all(paths: Sequence[Path], options: DecodeOptions) -> list[Decoded]:
    """``decode_image`` of every path, in order. One thread: Pillow holds the GIL for most of a small image's
    work, so a thread pool gains nothing (docs/results.md, "Data preparation")."""
    return [decode_image(p, options) for p in paths]


def stack_channels(decoded: Sequence[Decoded], channels: str) -> np.ndarray:
    """The kept images as uint8 [N, C, size, size]: C = 1 when ``channels`` is 1, or auto and every image is grey;
    otherwise 3, a grey image's channel replicated."""
    arrays = [d.pixels for d in decoded if d.pixels is not None]
    if not arrays:
        raise ValueError("no image to stack")
    one = channels == "1" or (channels == "auto" and all(a.ndim == 2 for a in arrays))
    size = arrays[0].shape[0]
    out = np.empty((len(arrays), 1 if one else 3, size, size), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # a grey image broadcasts over 3 channels
    return out


def reasons_summary(skipped: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Skipped entries counted by reason (the reason's text before any parenthesised detail)."""
    return dict(sorted(Counter(reason.split(" (")[0] for _, reason in skipped).items()))
