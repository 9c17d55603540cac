"""The prepared folder of a user's own data (pdcbdm.data.prepared): written split by split, _meta.json last, read
back memory-mapped with the same pixels and labels, and refused with the reason when incomplete or altered."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pdcbdm.data import HeadTailSplit
from pdcbdm.data.prepared import (is_prepared, load_prepared, read_prepared_meta, write_prepared_meta,
                                  write_split)

NAMES = ["apple", "pear", "plum"]
SPLIT = HeadTailSplit((0, 1), (2,))


def _prepare(root, n=(30, 15, 5)):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), n)
    images = rng.integers(0, 256, (len(labels), 3, 8, 8), dtype=np.uint8)
    entry = write_split(root, "train", images, labels, NAMES, SPLIT)
    assert not is_prepared(root)  # not complete before _meta.json
    write_prepared_meta(root, class_names=NAMES, image_shape=(3, 8, 8), splits={"train": entry},
                        transforms={"size": 8}, source={"kind": "test"})
    return images, labels


def test_a_prepared_split_reads_back_memory_mapped_with_the_same_pixels(tmp_path):
    images, labels = _prepare(tmp_path)
    data = load_prepared(tmp_path)
    assert is_prepared(tmp_path) and data.class_names == NAMES and data.counts() == [30, 15, 5]
    assert np.array_equal(data.images.numpy(), images) and np.array_equal(data.labels.numpy(), labels)
    table = pd.read_parquet(tmp_path / "train")  # the portable copy: Parquet tools open the split
    assert len(table) == 50 and list(table["class_name"].unique()) == NAMES
    on_disk = np.load(tmp_path / "train" / "_images.npy", mmap_mode="r+")
    on_disk[0, 0, 0, 0] = 255 - images[0, 0, 0, 0]
    on_disk.flush()
    assert int(data.images[0, 0, 0, 0]) == 255 - images[0, 0, 0, 0]  # the file's pages themselves, not a copy
    meta = read_prepared_meta(tmp_path)
    assert len(meta["digest"]) == 64 and meta["splits"]["train"]["counts"] == [30, 15, 5]


def test_an_altered_or_missing_array_and_a_foreign_folder_are_refused_by_name(tmp_path):
    _prepare(tmp_path)
    with pytest.raises(ValueError, match="no 'heldout' split"):
        load_prepared(tmp_path, "heldout")
    array = tmp_path / "train" / "_images.npy"
    array.write_bytes(array.read_bytes()[:-10])
    with pytest.raises(ValueError, match="_images.npy: missing or not the file _meta.json recorded"):
        load_prepared(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a prepared data set .*pipelines.prepare_data"):
        read_prepared_meta(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "_meta.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not a prepared data set of format"):
        read_prepared_meta(tmp_path / "other")
