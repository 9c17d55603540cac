"""Reference statistics as a separate, cached step (as edm's `fid.py ref`): features of the reference set.

The paper compares generated samples with the full balanced training set (docs/method.md "Metrics"); the data package's
`build_reference_dataset` gives that set. Features, logits and labels are cached as an .npz keyed by the data set's
identity (a content hash unless given) and the extractor's weights identity, so a different network or different
images never reuse a stale file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write, dataset_identity, resolve_cache_dir, sha256_text
from .scoring import FeatureSet
from .extractors import FeatureExtractor, extract_feature_set

__all__ = ["reference_cache_path", "reference_features", "load_feature_set", "save_feature_set"]

_FORMAT = "pdcbdm-reference-v1"


def reference_cache_path(dataset_id: str, extractor_identity: str,
                         cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the reference features of (`dataset_id`, `extractor_identity`) are cached.

    Args:
        dataset_id: identity string of the reference images.
        extractor_identity: `FeatureExtractor.identity`.
        cache_dir: cache root (default $PDCBDM_CACHE or ~/.cache/pdcbdm); files go to its "reference" folder.
    """
    folder = resolve_cache_dir(cache_dir) / "reference"
    folder.mkdir(exist_ok=True)
    return folder / f"ref-{sha256_text(_FORMAT, dataset_id, extractor_identity)[:24]}.npz"


def _compact(values: np.ndarray) -> np.ndarray:
    """float32 when that loses nothing (network outputs are float32; halves a 50,000 x 2048 file), else as is."""
    single = values.astype(np.float32)
    return single if np.array_equal(single, values) else values


def save_feature_set(path: str | os.PathLike[str], features: FeatureSet, dataset_id: str) -> Path:
    """Write a FeatureSet to an .npz atomically, with its extractor and data set identities."""
    arrays: dict[str, Any] = {"features": _compact(features.features), "labels": features.labels,
                              "format": np.array(_FORMAT), "dataset_id": np.array(dataset_id),
                              "extractor": np.array(features.extractor), "logits_note": np.array(features.logits_note)}
    if features.logits is not None:
        arrays["logits"] = _compact(features.logits)
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_feature_set(path: str | os.PathLike[str]) -> FeatureSet:
    """Read a FeatureSet written by `save_feature_set` (no pickles are loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as data:
        if "format" not in data.files or str(data["format"]) != _FORMAT:
            raise ValueError(f"{str(path)!r} is not a {_FORMAT} file")
        logits = data["logits"] if "logits" in data.files else None
        return FeatureSet(data["features"], logits, data["labels"], extractor=str(data["extractor"]),
                          logits_note=str(data["logits_note"]))


def _cached(path: Path) -> FeatureSet | None:
    """The cached feature set at ``path``, or None when there is none or the file is not one (truncated by a crash
    on another writer's disk, foreign): then the features are computed and written again."""
    if not path.is_file():
        return None
    try:
        return load_feature_set(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def reference_features(extractor: FeatureExtractor, dataset: Any,
                       cache_dir: str | os.PathLike[str] | None = None, *, dataset_id: str | None = None,
                       batch_size: int = 100, progress: bool = True) -> FeatureSet:
    """Features of a reference data set, computed once and then read from the cache.

    Args:
        extractor: the feature network.
        dataset: ImageDataset-like object with uint8 `.images` [N, C, H, W] and int `.labels` [N].
        cache_dir: cache root (default $PDCBDM_CACHE or ~/.cache/pdcbdm).
        dataset_id: identity string of `dataset`; None = its content hash (pixels, labels, class names).
        batch_size: images per forward pass when computing.
        progress: show a progress bar when computing.

    Returns:
        The reference FeatureSet (labels from the data set, extractor identity set).
    """
    if not hasattr(dataset, "images") or not hasattr(dataset, "labels"):
        raise ValueError(f"dataset must have .images and .labels tensors, got {type(dataset).__name__}")
    if dataset_id is None:
        dataset_id = dataset_identity(dataset.images, dataset.labels, getattr(dataset, "class_names", None))
    path = reference_cache_path(dataset_id, extractor.identity, cache_dir)
    cached = _cached(path)
    if cached is not None and cached.extractor == extractor.identity and len(cached) == len(dataset.labels):
        return cached
    result = extract_feature_set(extractor, dataset, batch_size=batch_size, progress=progress)
    save_feature_set(path, result, dataset_id)
    return result
