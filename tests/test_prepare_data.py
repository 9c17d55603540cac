"""End-to-end tests of `python -m pipelines.prepare_data` (run as a subprocess, as a user would; a repeated run of
the same command calls its main in the test's process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from pdcbdm.data import ParquetImageDataset, build_dataset, longtail_counts
from pipelines.prepare_data import build_parser, main
from tests.fake_cifar import write_fake_cifar10

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.prepare_data", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_digits_lt_end_to_end_and_idempotent(tmp_path, capsys):
    out = tmp_path / "digits"
    first = _run("--dataset", "digits-lt", "--out", str(out), "--shard-rows", "200")
    assert first.returncode == 0, first.stderr
    expected = build_dataset("digits-lt")
    assert f"{len(expected)} rows" in first.stdout and "tail: 3 classes" in first.stdout
    back = ParquetImageDataset(out)
    assert torch.equal(back.images, expected.images) and torch.equal(back.labels, expected.labels)
    meta = json.loads((out / "_meta.json").read_text())
    assert meta["dataset"] == "digits-lt" and meta["params"]["imbalance"] == 10
    assert meta["num_rows"] == len(expected) and len(meta["shards"]) == 3 and meta["image_shape"] == [1, 16, 16]
    counts = pq.read_table(out / "_counts.parquet").to_pylist()
    assert [r["count"] for r in counts] == expected.counts()
    assert [r["group"] for r in counts] == ["head"] * 7 + ["tail"] * 3

    _opens_as_parquet_dataset(out, expected)

    before = _snapshot(out)
    # the same command again, in this process (the command's own process start is checked above)
    assert main(["--dataset", "digits-lt", "--out", str(out), "--shard-rows", "200"]) == 0
    assert "nothing written" in capsys.readouterr().out
    assert _snapshot(out) == before


def _opens_as_parquet_dataset(out: Path, expected) -> None:
    """The folder is a Parquet data set as pandas and pyarrow discover it: the shards' rows, no side file."""
    table = pd.read_parquet(out)
    assert list(table.columns) == ["image", "label", "class_name"] and len(table) == len(expected)
    assert sorted(table["label"]) == sorted(expected.labels.tolist())
    dataset = pads.dataset(out)
    assert all(Path(f).name.startswith("part-") for f in dataset.files) and len(dataset.files) == 3
    assert dataset.count_rows() == len(expected)
    assert dataset.to_table(filter=pads.field("label") == 9).num_rows == expected.counts()[9]


def test_fake_cifar10_lt_end_to_end(tmp_path):
    root = tmp_path / "cifar"
    write_fake_cifar10(root, train_per_class=30, test_per_class=4, seed=7)
    out = tmp_path / "c10lt"
    run = _run("--dataset", "cifar10-lt", "--root", str(root), "--imbalance", "10", "--seed", "1",
               "--out", str(out))
    assert run.returncode == 0, run.stderr
    counts = longtail_counts(30, 10, 10)
    assert f"{sum(counts)} rows" in run.stdout and "airplane" in run.stdout
    back = ParquetImageDataset(out)
    assert back.counts() == counts and back.image_shape == (3, 32, 32) and back.hflip
    source = build_dataset("cifar10-lt", root=root, imbalance=10, seed=1)
    assert torch.equal(back.images, source.images) and back.class_names == source.class_names


def test_different_arguments_need_overwrite(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["--dataset", "digits-lt", "--out", str(out), "--imbalance", "5"]) == 0
    with pytest.raises(SystemExit) as stop:
        main(["--dataset", "digits-lt", "--out", str(out), "--imbalance", "20"])
    assert stop.value.code == 2
    assert "params.imbalance" in capsys.readouterr().err
    assert main(["--dataset", "digits-lt", "--out", str(out), "--imbalance", "20", "--overwrite"]) == 0
    assert ParquetImageDataset(out).counts() == build_dataset("digits-lt", imbalance=20).counts()


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar10-lt", "--root", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--dataset", "cifar100-lt"], "root is required"),
    (["--dataset", "digits-lt", "--imbalance", "0.5"], "imbalance"),
    (["--dataset", "digits-lt", "--head-ratio", "1.0"], "ratio"),
])
def test_errors_are_clear(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--out", str(tmp_path / "x")])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x" / "_meta.json").exists()


def test_unknown_dataset_and_help_text(capsys):
    with pytest.raises(SystemExit):
        main(["--dataset", "imagenet", "--out", "/tmp/never"])
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err
    text = build_parser().format_help()
    for option in ("--dataset", "--root", "--imbalance", "--split", "--seed", "--shard-rows", "--download",
                   "--out", "--overwrite", "--head-ratio", "--head-mode"):
        assert option in text
    assert all(action.help for action in build_parser()._actions)
