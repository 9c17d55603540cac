"""Generated images back into a class folder (pipelines.generate): layout, PNG size and mode, manifest, resuming,
the seed rule, --classes tail, --top-up-to against a prepared folder, unsafe class names, refusals, MLflow models."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pdcbdm.config import apply_overrides
from pdcbdm.data import HeadTailSplit
from pdcbdm.data.prepared import write_prepared_meta, write_split
from pdcbdm.generate_folder import MANIFEST_COLUMNS, batch_seed, folder_names
from pdcbdm.presets import preset
from pdcbdm.train import train
from pdcbdm.training.checkpoint import save_checkpoint
from pdcbdm.training.trainer import build_network
from pipelines.generate import main

ROOT = Path(__file__).resolve().parents[1]
COUNTS = [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]  # the smoke preset's digits-lt training counts
FAST = ["--batch-size", "2", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 10-step smoke checkpoint at 8x8 (the digits' own size), 50 diffusion steps, 3 DDIM steps."""
    out = tmp_path_factory.mktemp("genrun")
    threads = torch.get_num_threads()
    cfg = apply_overrides(preset("smoke"), ["train.steps=10", "sample.steps=3", "diffusion.timesteps=50",
                                            "train.threads=1", "data.image_size=8", "model.tsa_resolutions=4"])
    try:
        train(cfg, out, progress=False)
    finally:
        torch.set_num_threads(threads)  # train() sets the process-wide count from train.threads
    return out / "checkpoint.pt"


def _variant(tiny: Path, path: Path, **changes) -> Path:
    """The tiny checkpoint with some fields replaced (class names, weights, image shape)."""
    data = torch.load(tiny, weights_only=True)
    data.update(changes)
    return save_checkpoint(path, data)


@pytest.fixture(autouse=True)
def _tracking_uri():
    """main() sets MLflow's tracking URI for --tracking-uri; it is restored after each test."""
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def run(*args: str) -> int:
    return main([*args, *FAST])


def manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def files_per_folder(out: Path) -> dict[str, int]:
    return {d.name: len(list(d.glob("*.png"))) for d in sorted(out.iterdir()) if d.is_dir()}


def test_folder_layout_png_size_mode_and_manifest(tiny, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["--model", str(tiny), "--per-class", "3", "--batch-size", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "generating" in captured.err and "30/30" in captured.err  # the progress bar, on stderr
    assert files_per_folder(out) == {str(k): 3 for k in range(10)}
    for k in range(10):
        assert sorted(p.name for p in (out / str(k)).iterdir()) == ["0.png", "1.png", "2.png"]
    img = Image.open(out / "7" / "2.png")
    assert img.mode == "L" and img.size == (8, 8)  # the network's size: the digits' 8x8, never upsampled
    rows = manifest(out)
    assert tuple(rows[0]) == MANIFEST_COLUMNS and len(rows) == 30
    row = next(r for r in rows if r["file"] == "7/2.png")
    assert (row["class"], row["label"], row["index"], row["batch_row"]) == ("7", "7", "2", "0")
    assert (row["sampler"], row["steps"], row["eta"], row["guidance"]) == ("ddim", "3", "1", "1")
    assert row["model"] == str(tiny.resolve()) and row["model_step"] == "10" and row["batch_size"] == "2"
    assert row["noise_seed"] == str(batch_seed(0, 7, 1))
    assert "wrote 30 image(s)" in captured.out and not list(out.rglob(".*.tmp"))
    preview = Image.open(out / "preview.png")  # a row per class to look at, named
    assert preview.format == "PNG" and preview.size[1] > 10 * 80 and "preview.png" in captured.out


def test_resume_keeps_existing_files_and_fills_the_missing_ones_with_the_same_images(tiny, tmp_path):
    out, fresh = tmp_path / "gen", tmp_path / "fresh"
    assert run("--model", str(tiny), "--per-class", "3", "--classes", "3,5", "--out", str(out)) == 0
    first = {p: pixels(p) for p in out.glob("*/*.png")}
    (out / "3" / "1.png").unlink()
    (out / "5" / "2.png").unlink()
    kept = {p: p.stat().st_mtime_ns for p in out.glob("*/*.png")}
    assert run("--model", str(tiny), "--per-class", "5", "--classes", "3,5", "--out", str(out)) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # existing files are never rewritten
    assert files_per_folder(out) == {"3": 5, "5": 5}
    rows = manifest(out)
    assert sorted(r["file"] for r in rows) == sorted(f"{k}/{n}.png" for k in (3, 5) for n in range(5))
    # the seed rule: image n is the same whichever rows of its batch a run makes (here 1 of 2, then both)
    assert run("--model", str(tiny), "--per-class", "5", "--classes", "3,5", "--out", str(fresh)) == 0
    for path in out.glob("*/*.png"):
        again = pixels(fresh / path.relative_to(out))
        assert np.abs(pixels(path) - again).max() <= 1  # the network at another batch size: float noise only
        if path in first:  # kept ones untouched, the deleted two made again as they were
            assert np.abs(first[path] - pixels(path)).max() <= 1
    assert not np.array_equal(pixels(out / "3" / "0.png"), pixels(out / "3" / "1.png"))


def test_a_rerun_with_nothing_missing_generates_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "gen"
    assert run("--model", str(tiny), "--per-class", "2", "--classes", "0", "--out", str(out)) == 0
    before = (out / "manifest.csv").read_text()
    assert run("--model", str(tiny), "--per-class", "2", "--classes", "0", "--out", str(out), "--guidance", "2") == 0
    captured = capsys.readouterr()
    assert "wrote 0 image(s), kept 2" in captured.out
    assert "made with other settings" in captured.err  # kept images of w = 1 while w = 2 is asked for
    assert (out / "manifest.csv").read_text() == before


def test_classes_tail_generates_the_tail_at_eval_split_ratio(tiny, tmp_path):
    out = tmp_path / "gen"
    assert run("--model", str(tiny), "--per-class", "1", "--classes", "tail", "--out", str(out)) == 0
    assert files_per_folder(out) == {"7": 1, "8": 1, "9": 1}  # eval.split_ratio 0.7 of 10 classes: 7 head


def _prepared(root: Path, train_counts: list[int], heldout_counts: list[int], names: list[str],
              shape: tuple[int, int, int] = (1, 8, 8)) -> Path:
    """A prepared folder with the given per-class counts (random pixels)."""
    rng = np.random.default_rng(0)
    split = HeadTailSplit(tuple(range(len(names) - 1)), (len(names) - 1,))
    entries = {}
    for name, counts in (("train", train_counts), ("heldout", heldout_counts)):
        labels = np.repeat(np.arange(len(names)), counts)
        images = rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8)
        entries[name] = write_split(root, name, images, labels, names, split)
    write_prepared_meta(root, class_names=names, image_shape=shape, splits=entries, transforms={},
                        source={"kind": "test"})
    return root


def test_top_up_to_counts_the_real_images_of_a_prepared_folder(tiny, tmp_path):
    # class names in another order than the model's: counts are matched by name
    names = [str(k) for k in reversed(range(10))]
    train_counts = [int(n) for n in names]  # class k has k training images ...
    data = _prepared(tmp_path / "prepared", train_counts, [1] * 10, names)  # ... and one held out
    out = tmp_path / "gen"
    assert run("--model", str(tiny), "--top-up-to", "8", "--data", str(data), "--out", str(out)) == 0
    assert files_per_folder(out) == {str(k): 7 - k for k in range(7)}  # 8 - (k + 1); none for k >= 7
    only_train = tmp_path / "only-train"
    assert run("--model", str(tiny), "--top-up-to", "8", "--data", str(data), "--real-splits", "train",
               "--classes", "6,7,8", "--out", str(only_train)) == 0
    assert files_per_folder(only_train) == {"6": 2, "7": 1}


def test_top_up_to_without_data_counts_the_models_training_images(tiny, tmp_path, capsys):
    out = tmp_path / "gen"
    assert run("--model", str(tiny), "--top-up-to", "15", "--classes", "0,8,9", "--out", str(out)) == 0
    assert files_per_folder(out) == {"9": 3}  # 15 - 12; classes 0 (124) and 8 (16) are full
    assert "the model's training class counts" in capsys.readouterr().err


def test_top_up_refuses_a_prepared_folder_that_does_not_match_the_model(tiny, tmp_path, capsys):
    other_size = _prepared(tmp_path / "size", [2] * 10, [1] * 10, [str(k) for k in range(10)], shape=(1, 16, 16))
    assert run("--model", str(tiny), "--top-up-to", "5", "--data", str(other_size), "--out", str(tmp_path / "a")) == 2
    assert "would mix sizes" in capsys.readouterr().err
    other_names = _prepared(tmp_path / "names", [2] * 3, [1] * 3, ["cat", "dog", "0"])
    assert run("--model", str(tiny), "--top-up-to", "5", "--data", str(other_names), "--out", str(tmp_path / "b")) == 2
    assert "no class '1'" in capsys.readouterr().err
    assert run("--model", str(tiny), "--top-up-to", "5", "--data", str(tmp_path / "none"),
               "--out", str(tmp_path / "c")) == 2
    assert "not a prepared data set" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_unknown_class_names_are_refused_with_exit_2_naming_them(tiny, tmp_path):
    out = tmp_path / "gen"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.generate", "--model", str(tiny), "--per-class", "1",
                           "--classes", "3,nope,Seven", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "'nope', 'Seven'" in proc.stderr and "'0', '1', '2'" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_bad_flags_exit_2_naming_the_flag(tiny, tmp_path, capsys):
    out = str(tmp_path / "gen")
    assert run("--model", str(tiny), "--per-class", "0", "--out", out) == 2
    assert "--per-class" in capsys.readouterr().err
    assert run("--model", str(tiny), "--per-class", "1", "--steps", "500", "--out", out) == 2
    assert "--steps 500" in capsys.readouterr().err
    assert run("--model", str(tiny), "--per-class", "1", "--guidance", "-1", "--out", out) == 2
    assert "--guidance" in capsys.readouterr().err
    assert run("--model", str(tmp_path / "missing.pt"), "--per-class", "1", "--out", out) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert run("--model", str(tiny), "--per-class", "1", "--data", str(tmp_path), "--out", out) == 2
    assert "--data counts real images for --top-up-to" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert run("--model", str(tiny), "--per-class", "1", "--out", str(tmp_path / "file")) == 2
    assert "is a file" in capsys.readouterr().err
    assert not (tmp_path / "gen").exists()


def test_folder_names_are_safe_unique_and_stable():
    names = ["../up", "a/b", "a_b", "Cat", "cat", ".hidden", "CON", "ok", "ok.", " x "]
    folders = folder_names(names)
    assert folders == ["__up", "a_b~1", "a_b~2", "Cat~3", "cat~4", "_hidden", "_CON", "ok", "ok_", "_x_"]
    assert len({f.casefold() for f in folders}) == len(folders)
    assert all("/" not in f and not f.startswith(".") for f in folders)
    assert folder_names(["a" * 300])[0] == "a" * 120


def test_unsafe_class_names_get_safe_folders_and_keep_their_names_in_the_manifest(tiny, tmp_path):
    names = ["../up", "a/b", "a_b", "Cat", "cat", ".hidden", "CON", "tail", "ok", "x"]
    model = _variant(tiny, tmp_path / "named.pt", class_names=names)
    out = tmp_path / "gen"
    # "tail," is the class named tail (the comma makes it a list of names), not the keyword
    picked = "../up,a/b,a_b,cat,tail,"
    assert run("--model", str(model), "--per-class", "1", "--classes", picked, "--out", str(out)) == 0
    assert files_per_folder(out) == {"__up": 1, "a_b~1": 1, "a_b~2": 1, "cat~4": 1, "tail": 1}
    assert not (tmp_path / "up").exists()
    assert {r["file"]: r["class"] for r in manifest(out)} == {
        "__up/0.png": "../up", "a_b~1/0.png": "a/b", "a_b~2/0.png": "a_b", "cat~4/0.png": "cat", "tail/0.png": "tail"}


def test_an_rgb_model_writes_rgb_pngs(tiny, tmp_path):
    cfg = apply_overrides(preset("smoke"), ["diffusion.timesteps=50", "sample.steps=3", "data.image_size=8",
                                            "model.tsa_resolutions=4"])
    state = build_network(cfg, 10, (3, 8, 8)).state_dict()
    model = _variant(tiny, tmp_path / "rgb.pt", image_shape=[3, 8, 8], ema=state, net=state)
    out = tmp_path / "gen"
    assert run("--model", str(model), "--per-class", "1", "--classes", "0", "--out", str(out)) == 0
    img = Image.open(out / "0" / "0.png")
    assert img.mode == "RGB" and img.size == (8, 8)


def test_an_mlflow_model_generates_the_checkpoints_images(tiny, tmp_path):
    from mlflow.tracking import MlflowClient

    from pdcbdm.training import load_model
    from tune.mlflow_model import log_ema_model

    net, _, data = load_model(tiny)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("gen", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    log_ema_model(uri, run_id, net, data)
    model_uri = f"runs:/{run_id}/model"
    from_run, from_file = tmp_path / "run", tmp_path / "file"
    assert run("--model", model_uri, "--tracking-uri", uri, "--per-class", "2", "--classes", "4",
               "--out", str(from_run)) == 0
    assert run("--model", str(tiny), "--per-class", "2", "--classes", "4", "--out", str(from_file)) == 0
    assert {r["model"] for r in manifest(from_run)} == {model_uri}
    for n in range(2):
        assert np.array_equal(pixels(from_run / "4" / f"{n}.png"), pixels(from_file / "4" / f"{n}.png"))
    # the registered version (a search's winner): the manifest names the version the alias pointed to
    from tune.registry import version_of_run

    registry = MlflowClient(uri, registry_uri=uri)
    registry.set_registered_model_alias("pdcbdm-gen", "best", version_of_run(registry, "pdcbdm-gen", run_id, {}))
    from_registry = tmp_path / "registry"
    assert run("--model", "models:/pdcbdm-gen@best", "--tracking-uri", uri, "--per-class", "2", "--classes", "4",
               "--out", str(from_registry)) == 0
    assert {r["model"] for r in manifest(from_registry)} == {"models:/pdcbdm-gen/1"}
    for n in range(2):
        assert np.array_equal(pixels(from_registry / "4" / f"{n}.png"), pixels(from_file / "4" / f"{n}.png"))
