"""Data sets for PD-CBDM: long-tailed CIFAR and digits, head/tail class splits, group samplers, Parquet storage.

Entry points: `build_dataset`, `build_reference_dataset`, `build_floor_dataset`, `head_tail_split`, `ClassGroupSampler`,
`ParquetImageDataset`, `write_parquet`; a user's own prepared folder (``data.dataset=parquet``): `pdcbdm.data.prepared`
(the folder) and `pdcbdm.data.own` (its sets and summary). Nothing here imports ray, mlflow or optuna.
"""

from __future__ import annotations

from .cifar import load_cifar
from .dataset import ImageDataset, to_unit_range
from .digits import load_digits_uint8
from .longtail import longtail_counts, longtail_indices
from .parquet import ParquetImageDataset, WriteReport, write_parquet
from .own import PREPARED, prepared_summary
from .registry import (CONFIG_DATASET_NAMES, DATASET_NAMES, DEFAULT_IMBALANCE, REFERENCE_CHOICES,
                       build_calibration_dataset, build_dataset, build_floor_dataset,
                       build_reference_dataset, dataset_image_shape, is_longtail, reference_image_shape,
                       reference_kind, resolve_imbalance)
from .split import SPLIT_MODES, ClassGroupSampler, HeadTailSplit, head_tail_split

__all__ = [
    "ImageDataset", "to_unit_range", "build_dataset", "build_reference_dataset", "build_floor_dataset", "DATASET_NAMES",
    "DEFAULT_IMBALANCE", "is_longtail", "resolve_imbalance", "longtail_counts", "longtail_indices",
    "head_tail_split", "HeadTailSplit", "SPLIT_MODES", "ClassGroupSampler", "ParquetImageDataset",
    "write_parquet", "WriteReport", "load_cifar", "load_digits_uint8", "dataset_image_shape", "reference_image_shape",
    "CONFIG_DATASET_NAMES", "PREPARED", "prepared_summary", "reference_kind", "REFERENCE_CHOICES",
    "build_calibration_dataset",
]
