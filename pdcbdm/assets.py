"""What an evaluation depends on, as one machine resolves it: the data sets and the feature network.

On a cluster every machine that scores trials must resolve the same ones, or trials land in different feature
spaces (another FID scale) without anyone noticing. ``evaluation_assets`` names them by content: a sha256 of the
training, reference and floor images and the extractor's identity (a sha256 of its weights). For a prepared set
(``data.dataset=parquet``) the data's identity is the digest in its _meta.json (a hash of the recorded file hashes):
no image is read or hashed, whatever the size of the set. A trained network (the digits CNN, the domain CNN of a
prepared set) is a cache file that other machines can copy (``cache_payload`` / ``install_cache_files``) instead of
training their own, which need not come out the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pdcbdm.config import Config
from pdcbdm.data import build_dataset, build_floor_dataset, build_reference_dataset, reference_kind
from pdcbdm.io import atomic_write_bytes
from pdcbdm.evaluation import feature_extractor
from pdcbdm.evaluation.settings import judge_network
from pdcbdm.metrics._io import dataset_identity, resolve_cache_dir

__all__ = ["ASSET_NAMES", "evaluation_assets", "cache_payload", "install_cache_files"]

ASSET_NAMES = ("training data", "reference data", "floor data", "feature extractor")


TRAINED_EXTRACTORS = ("digits", "domain")  # cache files, shipped from the driver to the nodes


def _identity(dataset: Any) -> str:
    """A prepared set's recorded identity (its digest: nothing is hashed), else the content hash of the images."""
    recorded = getattr(dataset, "identity", None)
    if recorded is not None:
        return recorded
    return dataset_identity(dataset.images, dataset.labels, getattr(dataset, "class_names", None))


def _floor_identity(cfg: Config) -> str:
    """The floor data set's identity, or why it is unavailable (an evaluation then reports no floors)."""
    try:
        data = build_floor_dataset(cfg.data.dataset, root=cfg.data.root, download=cfg.data.download,
                                   choice=cfg.eval.reference)
    except (OSError, ValueError) as exc:
        return f"unavailable ({exc})"
    return _identity(data)


def evaluation_assets(cfg: Config, cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """The identities of what a trial of ``cfg`` trains and is scored on, resolved here (``ASSET_NAMES``): the
    data sets' content hashes and ``eval.extractor``'s identity (its weights' sha256), read from ``cache_dir``
    ($PDCBDM_CACHE or ~/.cache/pdcbdm by default) as the trials read it. Raises what loading them raises."""
    d = cfg.data
    train = build_dataset(d.dataset, root=d.root, imbalance=d.imbalance, split="train", seed=d.seed,
                          download=d.download, image_size=d.image_size)
    reference = build_reference_dataset(d.dataset, root=d.root, download=d.download, choice=cfg.eval.reference)
    kind = reference_kind(d.dataset, d.root, cfg.eval.reference)  # the training images re-weighted are another set
    extractor = feature_extractor(cfg, cache_dir=cache_dir)
    judge = judge_network(cfg, cache_dir=cache_dir)
    networks = extractor.identity if judge is None else f"{extractor.identity}, judged by {judge.identity}"
    return dict(zip(ASSET_NAMES, (_identity(train), f"{_identity(reference)} as {kind}", _floor_identity(cfg),
                                  networks)))


def cache_payload(cfg: Config, cache_dir: str | os.PathLike | None = None) -> dict[str, bytes]:
    """The cache files of ``eval.extractor`` and of the judging network (``eval.judge=cnn``) that are trained
    networks (the digits CNN, the domain CNN of data.root: trained here if missing), by their path in the cache
    folder; {} for networks with no cache file (Inception: its weights come from a file or a download)."""
    root = resolve_cache_dir(cache_dir)
    networks = [feature_extractor(cfg, cache_dir=cache_dir)] if cfg.eval.extractor in TRAINED_EXTRACTORS else []
    networks += [judge for judge in [judge_network(cfg, cache_dir=cache_dir)] if judge is not None]
    files = [f for net in networks for f in net.cache_files]
    return {Path(f).relative_to(root).as_posix(): Path(f).read_bytes() for f in files}


def install_cache_files(payload: dict[str, bytes], cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write the files of ``cache_payload`` into this machine's cache folder where it lacks them (atomic); an
    existing file is kept (``evaluation_assets`` then tells whether it holds the same network). Returns the
    files written."""
    root = resolve_cache_dir(cache_dir).resolve()
    written = []
    for name, data in payload.items():
        path = root / name
        if root not in path.resolve().parents:
            raise ValueError(f"cache file name {name!r} leaves the cache folder")
        if not path.exists():
            written.append(atomic_write_bytes(path, data))
    return written
