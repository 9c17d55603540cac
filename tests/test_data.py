"""Tests of pdcbdm.data: long-tail counts, CIFAR reader, digits, head/tail split, samplers, Parquet storage."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from pdcbdm.data import (DATASET_NAMES, ClassGroupSampler, HeadTailSplit, ImageDataset, ParquetImageDataset,
                         build_dataset, build_reference_dataset, head_tail_split, load_cifar, longtail_counts,
                         longtail_indices, write_parquet)
from pdcbdm.data.digits import HELDOUT_PER_CLASS, digits_pool_and_heldout, load_digits_uint8
from tests.fake_cifar import write_fake_cifar10, write_fake_cifar100

C10_TRAIN, C10_TEST = 20, 5


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory):
    """A folder holding small fake CIFAR-10 and CIFAR-100 in torchvision's pickle layout."""
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root, C10_TRAIN, C10_TEST, seed=1)
    write_fake_cifar100(root, 6, 2, seed=2)
    return root


def _toy_dataset(n: int = 40, classes: int = 4, channels: int = 3, seed: int = 0, hflip: bool = False):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, 5, 7), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return ImageDataset(images, labels, [f"c{k}" for k in range(classes)], hflip=hflip)


# ---------------------------------------------------------------- long-tail formula


def test_longtail_counts_match_the_paper_totals():
    c10 = longtail_counts(5000, 10, 100)
    assert sum(c10) == 12406
    assert c10[0] == 5000 and c10[-1] == 50
    assert sum(longtail_counts(500, 100, 100)) == 10847
    assert longtail_counts(5000, 10, 1) == [5000] * 10
    assert longtail_counts(7, 1, 50) == [7]


@pytest.mark.parametrize("rho", [1, 3.7, 10, 100, 250])
def test_longtail_counts_are_non_increasing_with_ratio_rho(rho):
    counts = longtail_counts(1000, 12, rho)
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 1000
    assert counts[-1] == int(1000 / rho + 1e-9)


@pytest.mark.parametrize("rho", [0.5, 0, -3, float("nan"), float("inf"), "x"])
def test_longtail_counts_reject_bad_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        longtail_counts(100, 10, rho)


def test_longtail_indices_keep_counts_seeded_and_nested():
    labels = torch.arange(300) % 10
    counts = longtail_counts(30, 10, 10)
    idx = longtail_indices(labels, counts, seed=3)
    assert torch.bincount(labels[idx], minlength=10).tolist() == counts
    assert torch.equal(idx, longtail_indices(labels, counts, seed=3))
    assert not torch.equal(idx, longtail_indices(labels, counts, seed=4))
    assert torch.equal(idx, idx.sort().values)
    stronger = longtail_indices(labels, longtail_counts(30, 10, 30), seed=3)
    assert set(stronger.tolist()) <= set(idx.tolist())


def test_longtail_indices_reject_counts_above_class_size():
    labels = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match=r"counts\[1\]"):
        longtail_indices(labels, [2, 2], seed=0)


# ---------------------------------------------------------------- CIFAR


def test_cifar_reader_returns_the_pickled_pixels(cifar_root):
    images, labels, names = load_cifar("cifar10", cifar_root, "train")
    with (cifar_root / "cifar-10-batches-py" / "data_batch_1").open("rb") as f:
        first = pickle.load(f, encoding="bytes")
    n1 = len(first[b"labels"])
    assert images.shape == (10 * C10_TRAIN, 3, 32, 32) and images.dtype == torch.uint8
    assert np.array_equal(images[:n1].numpy(), first[b"data"].reshape(n1, 3, 32, 32))
    assert labels[:n1].tolist() == first[b"labels"]
    assert names[0] == "airplane" and len(names) == 10


def test_cifar10_lt_counts_and_flip(cifar_root):
    data = build_dataset("cifar10-lt", root=cifar_root, imbalance=10, seed=0)
    assert data.counts() == longtail_counts(C10_TRAIN, 10, 10)
    assert data.image_shape == (3, 32, 32) and data.hflip
    full, _, _ = load_cifar("cifar10", cifar_root)
    kept = {bytes(im.numpy()) for im in data.images}
    assert kept <= {bytes(im.numpy()) for im in full}
    default = build_dataset("cifar10-lt", root=cifar_root)
    assert default.counts() == longtail_counts(C10_TRAIN, 10, 100)


def test_cifar_balanced_test_and_reference_sets(cifar_root):
    assert build_dataset("cifar10", root=cifar_root).counts() == [C10_TRAIN] * 10
    test = build_dataset("cifar10-lt", root=cifar_root, split="test", imbalance=100)
    assert test.counts() == [C10_TEST] * 10 and not test.hflip
    ref = build_reference_dataset("cifar10-lt", root=cifar_root)
    assert ref.counts() == [C10_TRAIN] * 10 and not ref.hflip


def test_cifar100_lt_uses_fine_labels_and_names(cifar_root):
    data = build_dataset("cifar100-lt", root=cifar_root, imbalance=3)
    assert data.num_classes == 100 and data.class_names[7] == "fine_07"
    assert data.counts() == longtail_counts(6, 100, 3)
    assert build_dataset("cifar100", root=cifar_root, split="test").counts() == [2] * 100


def test_missing_cifar_root_and_file_are_named(tmp_path, cifar_root):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*download=True.*--set data.download=true"):
        build_dataset("cifar10-lt", root=missing)
    write_fake_cifar10(tmp_path / "partial", 2, 1)
    (tmp_path / "partial" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.*cifar-10-python.tar.gz"):
        build_dataset("cifar10", root=tmp_path / "partial")
    with pytest.raises(ValueError, match="root is required"):
        build_dataset("cifar100-lt")


def test_bad_names_and_imbalance_are_rejected(cifar_root):
    with pytest.raises(ValueError, match="'mnist'.*digits-lt"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="'svhn'"):
        build_reference_dataset("svhn")
    with pytest.raises(ValueError, match="imbalance"):
        build_dataset("cifar10-lt", root=cifar_root, imbalance=0.5)
    with pytest.raises(ValueError, match="imbalance"):
        build_dataset("digits-lt", imbalance=0.99)
    with pytest.raises(ValueError, match="cifar10-lt"):
        build_dataset("cifar10", root=cifar_root, imbalance=10)
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", split="val")
    assert len(DATASET_NAMES) == 6


# ---------------------------------------------------------------- digits


def test_digits_lt_counts_shape_and_range():
    data = build_dataset("digits-lt")
    pool, _ = digits_pool_and_heldout()
    _, labels, _ = load_digits_uint8()
    n_max = min(torch.bincount(labels[pool]).tolist())
    assert data.counts() == longtail_counts(n_max, 10, 10)
    assert data.image_shape == (1, 16, 16) and data.images.dtype == torch.uint8 and not data.hflip
    x, y = data[0]
    assert x.dtype == torch.float32 and x.shape == (1, 16, 16) and isinstance(y, int)
    xs, _ = data.batch(torch.arange(len(data)))
    assert xs.min() >= -1 and xs.max() <= 1 and xs.min() == -1 and xs.max() > 0.9
    assert build_dataset("digits").counts() == [n_max] * 10


def test_digits_heldout_is_balanced_disjoint_and_the_reference():
    images, labels, _ = load_digits_uint8()
    pool, heldout = digits_pool_and_heldout()
    assert set(pool.tolist()).isdisjoint(heldout.tolist())
    assert len(pool) + len(heldout) == len(labels) == 1797
    test = build_dataset("digits-lt", split="test", seed=5)
    assert test.counts() == [HELDOUT_PER_CLASS] * 10
    assert torch.equal(test.images, images[heldout])
    train = build_dataset("digits-lt", seed=5)
    counts = longtail_counts(min(torch.bincount(labels[pool]).tolist()), 10, 10)
    assert torch.equal(train.images, images[pool][longtail_indices(labels[pool], counts, 5)])
    assert torch.equal(build_reference_dataset("digits-lt").images, test.images)


def test_digits_are_scikit_learns_digits_read_without_importing_it():
    from sklearn.datasets import load_digits

    from pdcbdm.data.digits import load_digits_uint8

    images, labels, _ = load_digits_uint8(8)
    bunch = load_digits()
    assert torch.equal(labels, torch.from_numpy(bunch.target).to(torch.int64))
    expected = (torch.from_numpy(bunch.images).float() * (255.0 / 16.0)).round().to(torch.uint8)
    assert torch.equal(images[:, 0], expected)


def test_digits_at_native_size_are_the_same_images_before_upsampling():
    """data.image_size=8: the same images and labels at the digits' own 8x8; upsampled as the default is (bilinear)
    they are the default 16x16 images to within one grey level (rounding); a size the U-Net cannot halve twice is
    refused with the sizes it takes."""
    from pdcbdm.data import dataset_image_shape, reference_image_shape
    from pdcbdm.evaluation import resize_samples

    native, default = build_dataset("digits-lt", image_size=8), build_dataset("digits-lt")
    assert native.image_shape == (1, 8, 8) and native.counts() == default.counts()
    assert torch.equal(native.labels, default.labels)
    up = resize_samples(native.images, reference_image_shape("digits-lt"))
    assert up.shape == default.images.shape and (up.int() - default.images.int()).abs().max() <= 1
    assert dataset_image_shape("digits-lt", 8) == (1, 8, 8) and dataset_image_shape("cifar10-lt") == (3, 32, 32)
    assert build_dataset("digits-lt", image_size=16).images.equal(default.images)
    with pytest.raises(ValueError, match="digits image size must be 8"):
        build_dataset("digits-lt", image_size=10)
    with pytest.raises(ValueError, match="served only at its own size 32"):
        dataset_image_shape("cifar10-lt", 16)


# ---------------------------------------------------------------- head / tail split


def test_head_tail_split_seven_three_by_frequency():
    counts = [5, 50, 10, 40, 30, 20, 45, 1, 15, 25]
    split = head_tail_split(counts)
    by_freq = sorted(range(10), key=lambda k: -counts[k])
    assert set(split.head) == set(by_freq[:7]) and set(split.tail) == set(by_freq[7:])
    assert split.tail == (0, 2, 7)  # counts 5, 10 and 1
    assert split.is_tail(torch.tensor([0, 1, 7, 8, 2])).tolist() == [True, False, True, False, True]
    assert split.is_head(torch.tensor([[1, 2]])).tolist() == [[True, False]]


def test_head_tail_split_ties_by_index_and_ratios():
    split = head_tail_split([9, 5, 5, 5, 5], 0.5)  # ceil(2.5) = 3 -> class 0 plus the two lowest tied indices
    assert split == HeadTailSplit(head=(0, 1, 2), tail=(3, 4))
    assert len(head_tail_split(longtail_counts(100, 10, 10), 0.6).head) == 6
    assert len(head_tail_split(longtail_counts(100, 10, 10), 0.8).head) == 8


def test_head_tail_split_balanced_is_a_seeded_shuffle():
    splits = [head_tail_split([7] * 10, seed=s) for s in range(6)]
    assert all(len(s.head) == 7 and len(s.tail) == 3 for s in splits)
    assert head_tail_split([7] * 10, seed=2) == splits[2]
    assert len({s.tail for s in splits}) > 1
    assert any(s.head != tuple(range(7)) for s in splits)


def test_head_tail_split_samples_mode():
    split = head_tail_split([10, 30, 5, 50, 5], 0.7, mode="samples")
    assert split.head == (1, 3) and split.tail == (0, 2, 4)  # 50 + 30 = 80% >= 70%
    assert head_tail_split([10, 30, 5, 50, 5], 0.5, mode="samples").head == (3,)


@pytest.mark.parametrize("ratio", [0, 1, -0.2, 1.5, float("nan")])
def test_head_tail_split_rejects_ratio_outside_open_interval(ratio):
    with pytest.raises(ValueError, match="ratio"):
        head_tail_split([5, 4, 3, 2], ratio)


def test_head_tail_split_always_keeps_a_tail_and_needs_two_classes():
    assert head_tail_split([5, 4, 3, 2], 0.9) == HeadTailSplit(head=(0, 1, 2), tail=(3,))  # ceil(3.6) = 4: capped
    assert head_tail_split([900, 40]) == HeadTailSplit(head=(0,), tail=(1,))  # two classes at the paper's 7:3
    assert head_tail_split([50, 900, 40]) == HeadTailSplit(head=(0, 1), tail=(2,))
    assert head_tail_split([900, 40], 0.99, mode="samples") == HeadTailSplit(head=(0,), tail=(1,))
    with pytest.raises(ValueError, match="at least 2"):
        head_tail_split([5])
    with pytest.raises(ValueError, match="mode"):
        head_tail_split([5, 4], mode="pixels")


# ---------------------------------------------------------------- group sampler


def test_class_group_sampler_yields_only_its_classes():
    labels = torch.tensor([0, 1, 2, 3, 2, 1, 0, 3, 3, 2])
    sampler = ClassGroupSampler(labels, (2, 3))
    draws = sampler.sample(500, torch.Generator().manual_seed(0))
    assert draws.dtype == torch.int64 and draws.shape == (500,)
    assert set(labels[draws].tolist()) == {2, 3}
    assert set(draws.tolist()) == {2, 3, 4, 7, 8, 9}
    again = sampler.sample(500, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_class_group_sampler_errors():
    labels = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="no image"):
        ClassGroupSampler(labels, [2])
    with pytest.raises(ValueError, match="classes is empty"):
        ClassGroupSampler(labels, [])
    with pytest.raises(ValueError, match="n must"):
        ClassGroupSampler(labels, [0]).sample(-1)


# ---------------------------------------------------------------- ImageDataset


def test_image_dataset_interface_and_normalisation():
    data = _toy_dataset(n=10, classes=6)
    assert data.counts() == [2, 2, 2, 2, 1, 1] and data.num_classes == 6
    x, y = data.batch([3, 4])
    assert torch.allclose(x, data.images[[3, 4]].float() / 127.5 - 1) and y.tolist() == [3, 4]
    sub = data.subset(torch.tensor([0, 6]))
    assert sub.counts() == [2, 0, 0, 0, 0, 0] and torch.equal(sub.images[1], data.images[6])
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(data.images.float(), data.labels, data.class_names)
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(data.images, data.labels[:3], data.class_names)
    with pytest.raises(ValueError, match="class_names"):
        ImageDataset(data.images, data.labels, ["a", "b"])


def test_hflip_flips_half_and_only_when_enabled():
    flipping = _toy_dataset(n=64, hflip=True)
    x, _ = flipping.batch(torch.arange(64), torch.Generator().manual_seed(0))
    plain = flipping.images.float() / 127.5 - 1
    same = (x == plain).flatten(1).all(1)
    mirrored = (x == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54
    still = _toy_dataset(n=64, hflip=False)
    assert torch.equal(still.batch(torch.arange(64), torch.Generator().manual_seed(0))[0], plain)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        items = torch.stack([flipping[0][0] for _ in range(40)])
    assert any(torch.equal(i, plain[0].flip(-1)) for i in items) and any(torch.equal(i, plain[0]) for i in items)


def test_hflip_only_for_cifar_training_data(cifar_root):
    assert build_dataset("cifar100-lt", root=cifar_root).hflip
    assert not build_dataset("digits-lt").hflip and not build_dataset("digits").hflip


# ---------------------------------------------------------------- Parquet


@pytest.mark.parametrize("channels", [1, 3])
def test_parquet_round_trip_is_exact(tmp_path, channels):
    data = _toy_dataset(n=23, classes=5, channels=channels, hflip=channels == 3)
    report = write_parquet(data, tmp_path / "out", shard_rows=10, meta={"dataset": "toy"})
    assert report.written[-1] == "_meta.json"
    back = ParquetImageDataset(tmp_path / "out")
    assert torch.equal(back.images, data.images) and torch.equal(back.labels, data.labels)
    assert back.class_names == data.class_names and back.hflip == data.hflip
    meta = json.loads((tmp_path / "out" / "_meta.json").read_text())
    assert meta["num_rows"] == 23 and [s["rows"] for s in meta["shards"]] == [10, 10, 3]
    assert meta["image_shape"] == [channels, 5, 7] and meta["dataset"] == "toy"
    shard = pq.read_table(tmp_path / "out" / "part-00001.parquet")
    assert shard.schema.field("label").type == "int64" and shard["class_name"][0].as_py() == "c0"
    counts = pq.read_table(tmp_path / "out" / "_counts.parquet").to_pylist()
    assert [r["count"] for r in counts] == data.counts()
    assert {r["group"] for r in counts} == {"head", "tail"}


def test_parquet_of_real_loaders_round_trips(tmp_path, cifar_root):
    for name in ("digits-lt", "cifar10-lt"):
        data = build_dataset(name, root=cifar_root, imbalance=5)
        write_parquet(data, tmp_path / name, shard_rows=40, meta={"dataset": name})
        back = ParquetImageDataset(tmp_path / name)
        assert torch.equal(back.images, data.images) and torch.equal(back.labels, data.labels)
        assert back.class_names == data.class_names and back.hflip == data.hflip


def test_parquet_writes_are_idempotent_and_guarded(tmp_path):
    out = tmp_path / "out"
    data = _toy_dataset(n=30)
    write_parquet(data, out, shard_rows=8, meta={"dataset": "toy", "params": {"seed": 0}})
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    again = write_parquet(data, out, shard_rows=8, meta={"dataset": "toy", "params": {"seed": 0}})
    assert again.written == [] and {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="params.seed"):
        write_parquet(data, out, shard_rows=8, meta={"dataset": "toy", "params": {"seed": 1}})
    smaller = data.subset(torch.arange(12))
    report = write_parquet(smaller, out, shard_rows=8, meta={"dataset": "toy", "params": {"seed": 1}},
                           overwrite=True)
    assert sorted(report.removed) == ["part-00002.parquet", "part-00003.parquet"]
    assert len(ParquetImageDataset(out)) == 12


def test_parquet_reader_refuses_incomplete_or_changed_folders(tmp_path):
    out = tmp_path / "out"
    write_parquet(_toy_dataset(n=30), out, shard_rows=8, meta={"dataset": "toy"})
    shard = out / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="part-00001.*sha256"):
        ParquetImageDataset(out)
    (out / "_meta.json").unlink()  # what an interrupted run leaves
    with pytest.raises(FileNotFoundError, match="_meta.json"):
        ParquetImageDataset(out)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        ParquetImageDataset(tmp_path / "missing_dir")
    write_parquet(_toy_dataset(n=30), out, shard_rows=8, meta={"dataset": "toy"})  # resumes: only its own files
    assert len(ParquetImageDataset(out)) == 30
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        write_parquet(_toy_dataset(), tmp_path / "foreign", shard_rows=8, meta={"dataset": "toy"})


def test_overwrite_removes_only_what_the_writer_listed(tmp_path):
    """--overwrite into a folder holding the user's own meta.json and counts.parquet (names the earlier layout
    used): they are kept, only the files an earlier write listed in its manifest are replaced or removed."""
    out = tmp_path / "mixed"
    out.mkdir()
    mine = {"meta.json": b'{"project": "my own notes"}', "counts.parquet": b"my own table", "notes.txt": b"mine"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    write_parquet(_toy_dataset(n=30), out, shard_rows=8, meta={"dataset": "toy"}, overwrite=True)
    report = write_parquet(_toy_dataset(n=12), out, shard_rows=8, meta={"dataset": "toy", "n": 12}, overwrite=True)
    assert sorted(report.removed) == ["part-00002.parquet", "part-00003.parquet"]
    assert all((out / name).read_bytes() == data for name, data in mine.items())
    assert len(ParquetImageDataset(out)) == 12


def test_parquet_folder_of_the_earlier_layout_is_read_and_moved(tmp_path):
    """meta.json and counts.parquet among the shards (the first layout) still read; a rewrite renames them."""
    out = tmp_path / "old"
    data = _toy_dataset(n=20)
    write_parquet(data, out, shard_rows=8, meta={"dataset": "toy"})
    (out / "_meta.json").rename(out / "meta.json")
    (out / "_counts.parquet").rename(out / "counts.parquet")
    assert torch.equal(ParquetImageDataset(out).images, data.images)
    report = write_parquet(data, out, shard_rows=8, meta={"dataset": "toy"})
    assert sorted(report.removed) == ["counts.parquet", "meta.json"]
    assert sorted(p.name for p in out.iterdir()) == ["_counts.parquet", "_meta.json", *[f"part-0000{i}.parquet"
                                                                                         for i in range(3)]]
    assert len(pd.read_parquet(out)) == 20 and pads.dataset(out).count_rows() == 20


def test_write_parquet_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="shard_rows"):
        write_parquet(_toy_dataset(), tmp_path / "a", shard_rows=0, meta={})
    with pytest.raises(ValueError, match="reserved"):
        write_parquet(_toy_dataset(), tmp_path / "b", shard_rows=5, meta={"shards": 1})
    with pytest.raises(ValueError, match="image_shape"):
        write_parquet(_toy_dataset(channels=2), tmp_path / "c", shard_rows=5, meta={})
