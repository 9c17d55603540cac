"""Named data sets: `build_dataset` (training / test data), `build_reference_dataset` (FID reference) and
`build_floor_dataset` (real images for the metrics' real-vs-real noise floors).

Names: "digits-lt" (the download-free default), "digits", "cifar10-lt", "cifar100-lt", "cifar10", "cifar100".
The "-lt" names apply the long-tail formula n_k = int(n_max * rho^(-k/(K-1))) (docs/method.md, "Data") to the train
split; the plain names are balanced. Test splits are always balanced.

"parquet" (``PREPARED``) is a user's own data prepared into a folder (``root``; ``pdcbdm.data.own``): its shape,
classes and counts come from the folder's _meta.json, its images are memory-mapped, its train split keeps its own
imbalance, and its reference and floor sets come from its held-out split (or its own reference split).
"""

from __future__ import annotations

from pathlib import Path

from .cifar import load_cifar
from .dataset import ImageDataset
from .digits import DIGITS_SIZE, check_digits_size, digits_pool_and_heldout, load_digits_uint8
from .longtail import check_imbalance, longtail_counts, longtail_indices
from .own import (PREPARED, REFERENCE_CHOICES, prepared_calibration, prepared_floor, prepared_heldout,
                  prepared_image_shape, prepared_reference, prepared_train)
from .own import reference_kind as _prepared_reference_kind

__all__ = ["DATASET_NAMES", "CONFIG_DATASET_NAMES", "PREPARED", "SPLITS", "DEFAULT_IMBALANCE", "build_dataset",
           "build_reference_dataset", "build_floor_dataset", "resolve_imbalance", "is_longtail",
           "reference_image_shape", "dataset_image_shape", "reference_kind", "build_calibration_dataset",
           "REFERENCE_CHOICES"]

# the built-in data sets (what pipelines.prepare_data --dataset writes); data.dataset also takes PREPARED
DATASET_NAMES = ("digits-lt", "digits", "cifar10-lt", "cifar100-lt", "cifar10", "cifar100")
CONFIG_DATASET_NAMES = (*DATASET_NAMES, PREPARED)
SPLITS = ("train", "test")
# The paper's headline setting for CIFAR; rho = 10 keeps every digit class at >= 12 training images.
DEFAULT_IMBALANCE = {"digits-lt": 10.0, "cifar10-lt": 100.0, "cifar100-lt": 100.0}


def _check_name(name: str, prepared: bool = False) -> str:
    valid = CONFIG_DATASET_NAMES if prepared else DATASET_NAMES
    if name not in valid:
        raise ValueError(f"unknown data set name {name!r}; choose one of {valid}")
    return name


def is_longtail(name: str) -> bool:
    """Whether data set `name` is a long-tailed ("-lt") variant; a prepared set keeps its own counts, taken as
    long-tailed."""
    return name == PREPARED or _check_name(name).endswith("-lt")


def resolve_imbalance(name: str, imbalance: float | None) -> float:
    """The imbalance factor rho actually used for `name`'s train split.

    Args:
        name: one of DATASET_NAMES.
        imbalance: rho >= 1, or None for the default (100 for cifar*-lt, 10 for digits-lt, 1 for balanced names).
            Balanced names accept only None or 1.
    """
    if not is_longtail(name):
        if imbalance is not None and check_imbalance(imbalance) != 1.0:
            raise ValueError(f"imbalance={imbalance!r} given for the balanced data set {name!r}; "
                             f"use {name}-lt for a long-tailed version (or leave imbalance unset)")
        return 1.0
    return DEFAULT_IMBALANCE[name] if imbalance is None else check_imbalance(imbalance)


def _apply_longtail(data: ImageDataset, rho: float, seed: int) -> ImageDataset:
    """Keep n_k = int(n_max rho^(-k/(K-1))) images per class, n_max = the smallest class size (Sec. "Data")."""
    n_max = min(data.counts())
    if n_max < 1:
        raise ValueError(f"a class has no images (counts {data.counts()}); cannot build a long-tailed set")
    counts = longtail_counts(n_max, data.num_classes, rho)
    return data.subset(longtail_indices(data.labels, counts, seed))


def _require_root(name: str, root: str | Path | None) -> Path:
    if root is None:
        raise ValueError(f"root is required for {name!r}: the folder holding (or to receive, with download=True) "
                         "cifar-10-batches-py/ or cifar-100-python/")
    return Path(root)


def _digits(split: str, size: int = DIGITS_SIZE) -> ImageDataset:
    images, labels, names = load_digits_uint8(size)
    pool, heldout = digits_pool_and_heldout()
    idx = pool if split == "train" else heldout
    return ImageDataset(images[idx], labels[idx], names, hflip=False)


def _cifar(name: str, root: str | Path | None, split: str, download: bool) -> ImageDataset:
    variant = name.removesuffix("-lt")
    images, labels, names = load_cifar(variant, _require_root(name, root), split, download=download)
    # Flips only for training: test and reference statistics use the images as they are.
    return ImageDataset(images, labels, names, hflip=(split == "train"))


def build_dataset(name: str, *, root: str | Path | None = None, imbalance: float | None = None,
                  split: str = "train", seed: int = 0, download: bool = False,
                  image_size: int | None = None) -> ImageDataset:
    """Build a named data set.

    Args:
        name: one of DATASET_NAMES.
        root: CIFAR folder (holding cifar-10-batches-py/ or cifar-100-python/); ignored for digits.
        imbalance: rho >= 1 for the "-lt" names (default 100 for CIFAR, 10 for digits); balanced names accept
            only None or 1. Ignored for split="test", which is always balanced.
        split: "train", or "test" (CIFAR: the test batches; digits: the held-out balanced split, 50 per class).
        seed: seed of the per-class shuffle choosing which images the long-tailed set keeps.
        download: fetch CIFAR with torchvision when the files are missing.
        image_size: digits only: the side the images are served at (8, their native size, or larger by bilinear
            upsampling); None: the size the evaluation scores at (``reference_image_shape``). CIFAR takes only
            None or 32.

    Returns:
        An ImageDataset; CIFAR train splits have hflip=True, everything else hflip=False (a prepared set: as its
        preparation recorded). A prepared set (name PREPARED, root its folder) serves its train split or, for
        "test", its held-out split, memory-mapped; it takes no imbalance.
    """
    if name == PREPARED:
        return _prepared(root, imbalance, split, image_size)
    rho = resolve_imbalance(name, imbalance)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    shape = dataset_image_shape(name, image_size)
    data = _digits(split, shape[1]) if name.startswith("digits") else _cifar(name, root, split, download)
    if split == "test":
        return data
    # Balanced digits still go through the formula (rho = 1) so every class has exactly n_max images.
    return _apply_longtail(data, rho, seed) if (rho != 1.0 or name.startswith("digits")) else data


def _prepared(root: str | Path | None, imbalance: float | None, split: str,
              image_size: int | None) -> ImageDataset:
    if imbalance is not None:
        raise ValueError(f"data.imbalance: {imbalance!r} given, but a prepared data set keeps its own class counts "
                         f"(its rho is recorded in _meta.json); leave it unset with data.dataset={PREPARED}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test":
        prepared_image_shape(root, image_size)
        return prepared_heldout(root)
    return prepared_train(root, image_size)


def reference_image_shape(name: str, *, root: str | Path | None = None) -> tuple[int, int, int]:
    """The shape of the images a data set's evaluation scores (its reference set's, ``build_reference_dataset``):
    samples of a network trained at another size are resized to it (``pdcbdm.evaluation``). A prepared set
    (``root`` required): the prepared shape."""
    if name == PREPARED:
        return prepared_image_shape(root)
    return (1, DIGITS_SIZE, DIGITS_SIZE) if _check_name(name).startswith("digits") else (3, 32, 32)


def reference_kind(name: str, root: str | Path | None = None, choice: str = "auto") -> str:
    """What the evaluation's reference set is (``eval.reference`` resolved): "heldout" (digits' balanced held-out
    split), "train" (CIFAR's balanced training set, the paper's); for a prepared set "balanced-train", "train",
    "heldout" or "folder" (``pdcbdm.data.own``). A built-in set takes only "auto" (its balanced set)."""
    if name == PREPARED:
        return _prepared_reference_kind(root, choice)
    if choice != "auto":
        raise ValueError(f"eval.reference: {choice!r} applies to a prepared set (data.dataset={PREPARED}); "
                         f"{name} is scored against its balanced set (leave it auto)")
    return "heldout" if _check_name(name).startswith("digits") else "train"


def dataset_image_shape(name: str, image_size: int | None = None, *,
                        root: str | Path | None = None) -> tuple[int, int, int]:
    """The image shape ``build_dataset(name, image_size=image_size)`` serves (what the network is built for), or
    ValueError naming the sizes the data set takes. A prepared set (``root`` required) is served at its prepared
    shape only."""
    if name == PREPARED:
        return prepared_image_shape(root, image_size)
    ref = reference_image_shape(name)
    if image_size is None:
        return ref
    if name.startswith("digits"):
        size = check_digits_size(image_size)
        return (1, size, size)
    if image_size != ref[1]:
        raise ValueError(f"image_size {image_size!r}: {name} is served only at its own size {ref[1]} (leave it unset)")
    return ref


def build_reference_dataset(name: str, *, root: str | Path | None = None, download: bool = False,
                            choice: str = "auto") -> ImageDataset:
    """The balanced set FID reference statistics are computed against (docs/method.md, "Metrics").

    CIFAR names: the full balanced training set, as the paper. Digits names: the held-out balanced split. Never
    flipped.

    Args:
        name: one of DATASET_NAMES.
        root: CIFAR folder (ignored for digits).
        download: fetch CIFAR with torchvision when the files are missing.

    A prepared set (name PREPARED, root its folder): the reference ``choice`` (``eval.reference``) names
    (``pdcbdm.data.own``).
    """
    if name == PREPARED:
        return prepared_reference(root, choice)
    reference_kind(name, root, choice)
    _check_name(name)
    if name.startswith("digits"):
        return _digits("test")
    data = _cifar(name, root, "train", download)
    data.hflip = False
    return data


def build_floor_dataset(name: str, *, root: str | Path | None = None, download: bool = False,
                        choice: str = "auto") -> ImageDataset:
    """Real images, disjoint from `build_reference_dataset(name)`, that the evaluation's noise floors are drawn from
    (pdcbdm.metrics.floor: each metric computed for real images against the reference at the generated set's size).

    Digits names: the whole training pool outside the held-out reference (about 130 images per class), never its
    long-tailed subset; the floor draws the same count from every class. CIFAR names: the test split (1,000 or 100
    images per class), disjoint from the training-set reference. Never flipped.

    Args:
        name: one of DATASET_NAMES.
        root: CIFAR folder (ignored for digits).
        download: fetch CIFAR with torchvision when the files are missing.

    A prepared set (name PREPARED, root its folder): its held-out images outside the judge's calibration images and
    a heldout reference, for the reference ``choice`` (``pdcbdm.data.own``).
    """
    if name == PREPARED:
        return prepared_floor(root, choice)
    _check_name(name)
    if name.startswith("digits"):
        return _digits("train")
    return _cifar(name, root, "test", download)


def build_calibration_dataset(name: str, *, root: str | Path | None = None, download: bool = False,
                              choice: str = "auto") -> ImageDataset:
    """The real images the class judge is calibrated on (images its classifier never trained on, disjoint from
    the floors'): the reference set of a built-in set (digits' held-out split), for a prepared set
    ``pdcbdm.data.own.prepared_calibration``."""
    if name == PREPARED:
        return prepared_calibration(root, choice)
    return build_reference_dataset(name, root=root, download=download)
