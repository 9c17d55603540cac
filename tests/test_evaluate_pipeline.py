"""The evaluation command end to end on a tiny checkpoint: metrics JSON, per-class table, grids, errors."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pdcbdm.config import apply_overrides
from pdcbdm.presets import preset
from pdcbdm.train import train
from pipelines.evaluate import UsageError, grid_of_classes, main, parse_guidance
from tests.searchutil import seed_cache

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = ("fid", "precision", "recall", "f8", "f1_8", "fid_tail", "kid", "reject_rate", "is_mean", "fid_floor",
               "fid_tail_floor", "kid_floor", "f8_floor", "reject_rate_floor", "tail_to_head_confusion_floor")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 10-step smoke checkpoint; 50 diffusion steps keep the DDPM test short."""
    out = tmp_path_factory.mktemp("evalrun")
    threads = torch.get_num_threads()
    cfg = apply_overrides(preset("smoke"), ["train.steps=10", "sample.steps=3", "diffusion.timesteps=50",
                                            "train.threads=1"])
    try:
        train(cfg, out, progress=False)
    finally:
        torch.set_num_threads(threads)  # train() sets the process-wide count from train.threads
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, digits_network) -> Path:
    """Shared by the module: the session's digits network; the first run caches the reference features."""
    out = tmp_path_factory.mktemp("evalcache")
    seed_cache(out, digits_network)
    return out / "cache"


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    # One thread per library: oversubscribed OpenMP pools on a busy 2-core machine are many times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PDCBDM_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "pipelines.evaluate", *args, "--cache-dir", str(cache), "--no-progress"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_here(*args: str, cache: Path) -> int:
    """The command's ``main`` in this process (threads already 1 here): for the runs after the first, which
    ``evaluated`` makes as a process, a Python start each is work the test does not need. The MLflow tracking URI
    that ``--tracking-uri`` sets for the process is put back."""
    import mlflow

    before = mlflow.get_tracking_uri()
    try:
        return main([*args, "--cache-dir", str(cache), "--no-progress"])
    finally:
        mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def evaluated(checkpoint, cache_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("evalout")
    proc = run_cli("--checkpoint", str(checkpoint), "--num-samples", "40", "--guidance", "0,1", "--steps", "3",
                   "--noise-error-images", "4", "--noise-error-stride", "250", "--device", "cpu", "--out", str(out),
                   cache=cache_dir)
    assert proc.returncode == 0, proc.stderr
    return proc, out


def test_metrics_json_scores_every_guidance_value(evaluated, checkpoint):
    _, out = evaluated
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["checkpoint"] == str(checkpoint.resolve())
    assert summary["step"] == 10 and summary["which"] == "ema"
    assert summary["guidance_values"] == [0.0, 1.0]
    assert set(summary["guidance"]) == {"0", "1"}
    for w, metrics in summary["guidance"].items():
        assert metrics["guidance"] == float(w)
        for key in METRIC_KEYS:
            assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), (w, key, metrics[key])
        assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["reject_rate"] <= 1
        # confusion counts confident decisions only: None when the judge reads no tail sample of this 10-step model
        confusion = metrics["tail_to_head_confusion"]
        assert (confusion is None and metrics["reject_rate_tail"] == 1.0) or 0 <= confusion <= 1
        assert metrics["fid"] > metrics["fid_floor"] > 0 and metrics["reject_rate_floor"] < 0.1
        assert metrics["num_generated"] == 40
    assert summary["best_guidance"] in (0.0, 1.0)
    best = summary["guidance"][f"{summary['best_guidance']:g}"]["fid"]
    assert best == min(m["fid"] for m in summary["guidance"].values())
    cfg = summary["config"]
    assert cfg["eval"]["num_samples"] == 40 and cfg["sample"]["steps"] == 3 and cfg["eval"]["guidance_grid"] == "0,1"
    assert sorted(summary["head_classes"] + summary["tail_classes"]) == list(range(10))


def test_head_tail_split_is_the_evaluation_split(evaluated, checkpoint):
    from pdcbdm.evaluation import evaluation_split
    from pdcbdm.train import load_data
    from pdcbdm.training import load_model

    _, cfg, _ = load_model(checkpoint)
    split = evaluation_split(cfg, load_data(cfg).counts())
    summary = json.loads((evaluated[1] / "metrics.json").read_text())
    assert tuple(summary["head_classes"]) == split.head and len(split.head) == 7  # eval.split_ratio 0.7
    assert tuple(summary["tail_classes"]) == split.tail


def test_evaluation_split_ignores_the_loss_split_ratio():
    """Runs whose PD loss splits differently (a searched loss.split_ratio) are scored on the same classes."""
    from pdcbdm.data import head_tail_split, longtail_counts
    from pdcbdm.evaluation import evaluation_split

    counts = longtail_counts(120, 10, 10)
    splits = [evaluation_split(apply_overrides(preset("smoke"), [f"loss.split_ratio={r}"]), counts)
              for r in (0.5, 0.7, 0.9)]
    assert splits[0] == splits[1] == splits[2] == head_tail_split(counts, 0.7)
    assert splits[0].tail == (7, 8, 9)
    # the evaluation's own ratio decides
    assert evaluation_split(apply_overrides(preset("smoke"), ["eval.split_ratio=0.6"]), counts).tail == (6, 7, 8, 9)


def test_noise_error_is_a_positive_float(evaluated):
    noise = json.loads((evaluated[1] / "metrics.json").read_text())["noise_error"]
    assert isinstance(noise["value"], float) and noise["value"] > 0
    assert noise["images"] == 4 and noise["stride"] == 250


def test_sample_grids_are_png_with_a_row_per_class(evaluated):
    _, out = evaluated
    for w in ("0", "1"):
        with Image.open(out / f"samples_w{w}.png") as img:
            img.verify()
        with Image.open(out / f"samples_w{w}.png") as img:
            # 10 rows (classes) of 4 samples (40 samples / 10 classes), 16 px + 1 px padding, 4x enlarged
            assert img.size == ((4 * 17 + 1) * 4, (10 * 17 + 1) * 4)
    assert not list(out.glob("*.pt")) and not list(out.glob(".*tmp"))


def test_per_class_table_has_a_row_per_guidance_and_class(evaluated):
    _, out = evaluated
    with open(out / "per_class.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 10
    keys = sorted((float(r["guidance"]), int(r["label"])) for r in rows)
    assert keys == [(w, k) for w in (0.0, 1.0) for k in range(10)]
    summary = json.loads((out / "metrics.json").read_text())
    for r in rows:
        assert int(r["n"]) == 4
        assert r["group"] == ("head" if int(r["label"]) in summary["head_classes"] else "tail")
        flat = summary["guidance"][f"{float(r['guidance']):g}"]
        assert float(r["fid"]) == pytest.approx(flat[f"fid_class_{r['label']}"])


def test_printed_table_lists_each_w(evaluated):
    proc, out = evaluated
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["w", "FID", "IS"]
    assert [ln.split()[0] for ln in lines[1:3]] == ["0", "1"]
    assert "best w by FID" in proc.stdout and "noise error" in proc.stdout and str(out) in proc.stdout


def test_ddpm_run_saves_the_samples(checkpoint, cache_dir, evaluated, tmp_path):
    assert run_here("--checkpoint", str(checkpoint), "--which", "net", "--sampler", "ddpm", "--guidance", "0.5",
                    "--num-samples", "20", "--batch-size", "8", "--noise-error-images", "0", "--save-samples",
                    "--out", str(tmp_path), cache=cache_dir) == 0
    saved = torch.load(tmp_path / "samples_w0.5.pt", weights_only=True)
    assert saved["images"].dtype == torch.uint8 and saved["images"].shape == (20, 1, 16, 16)
    assert torch.equal(saved["labels"], torch.arange(20) % 10) and saved["guidance"] == 0.5
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["which"] == "net" and summary["noise_error"] is None
    assert summary["config"]["sample"]["sampler"] == "ddpm" and summary["config"]["eval"]["batch_size"] == 8
    assert (tmp_path / "samples_w0.5.png").is_file()


def test_corrupt_checkpoint_exits_2_without_traceback(checkpoint, cache_dir, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    data = checkpoint.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    assert run_here("--checkpoint", str(bad), "--out", str(tmp_path / "o"), cache=cache_dir) == 2  # no exception
    err = capsys.readouterr().err
    assert "corrupt" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["a,b", "1,-1", ",", "1,1"])
def test_bad_guidance_exits_2_naming_the_option(spec, checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", str(checkpoint), "--guidance", spec, "--out", str(tmp_path)]) == 2
    assert "--guidance" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("flag,value,field", [("--num-samples", "1", "eval.num_samples"),
                                              ("--steps", "0", "sample.steps"),
                                              ("--device", "tpu", "train.device")])
def test_invalid_override_exits_2_naming_option_and_field(flag, value, field, checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", str(checkpoint), flag, value, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert field in err and flag in err


def test_inception_weights_with_the_digits_network_exits_2(checkpoint, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert main(["--checkpoint", str(checkpoint), "--inception-weights", str(weights), "--out", str(tmp_path)]) == 2
    assert "--inception-weights" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_exits_2(checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", str(checkpoint), "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_parse_guidance():
    assert parse_guidance("0, 1.5,2") == (0.0, 1.5, 2.0)
    with pytest.raises(UsageError, match="--guidance"):
        parse_guidance("nan")


def test_grid_of_classes_pads_short_rows_and_caps_the_classes():
    images = torch.arange(25, dtype=torch.uint8).view(25, 1, 1, 1).expand(25, 1, 2, 2).contiguous()
    labels = torch.tensor([0] * 12 + [2] * 3 + list(range(10, 20)))
    grid, n = grid_of_classes(images, labels, 30, max_classes=20, per_row=10)
    assert n == 10 and grid.shape == (20 * 10, 1, 2, 2)
    assert torch.equal(grid[:10, 0, 0, 0], torch.arange(10, dtype=torch.uint8))  # class 0: its first 10 samples
    assert (grid[10:20] == 255).all()  # class 1 has no samples: a white row
    assert torch.equal(grid[20:23, 0, 0, 0], torch.tensor([12, 13, 14], dtype=torch.uint8))
    assert (grid[23:30] == 255).all()
    few, n_few = grid_of_classes(images[:4], torch.tensor([0, 1, 0, 1]), 2)
    assert n_few == 2 and few.shape == (4, 1, 2, 2)


# ---------------------------------------------------------------- the MLflow model of a trial


def test_mlflow_model_of_the_ema_network_samples_like_the_checkpoint(checkpoint, cache_dir, evaluated, tmp_path):
    """The EMA network logged as a pt2 MLflow model (as a search's trial does) loads with mlflow.pytorch at any
    batch size, and `--checkpoint runs:/ID/model` scores exactly what the checkpoint file scores."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pdcbdm.training import load_model
    from tune.mlflow_model import log_ema_model, model_uri_of_run

    net, cfg, data = load_model(checkpoint)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("models", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    log_ema_model(uri, run_id, net, data)
    assert client.get_run(run_id).info.status == "RUNNING"  # logging a model does not end the run

    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"  # the archive must hold no pickle
    try:
        loaded = mlflow.pytorch.load_model(model_uri_of_run(run_id))
    finally:
        os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    for batch in (1, 3, 8):  # sampling calls the network at several batch sizes
        x, t = torch.randn(batch, *data["image_shape"]), torch.randint(0, 50, (batch,))
        y = torch.randint(0, data["num_classes"] + 1, (batch,))
        with torch.no_grad():
            assert torch.allclose(loaded(x, t, y), net(x, t, y), atol=1e-5)

    out = tmp_path / "out"
    assert run_here("--checkpoint", model_uri_of_run(run_id), "--tracking-uri", uri, "--log-to-run",
                    "--num-samples", "40", "--guidance", "0,1", "--steps", "3", "--noise-error-images", "4",
                    "--noise-error-stride", "250", "--device", "cpu", "--out", str(out), cache=cache_dir) == 0
    from_model = json.loads((out / "metrics.json").read_text())
    from_file = json.loads((evaluated[1] / "metrics.json").read_text())
    assert from_model["checkpoint"] == model_uri_of_run(run_id) and from_model["step"] == from_file["step"]
    for w in ("0", "1"):
        assert from_model["guidance"][w]["fid"] == pytest.approx(from_file["guidance"][w]["fid"], rel=1e-4)
    run = client.get_run(run_id)
    assert run.data.metrics["evaluate_fid"] == pytest.approx(from_model["best"]["fid"])
    assert "evaluate/metrics.json" in [a.path for a in client.list_artifacts(run_id, "evaluate")]


def test_an_mlflow_model_uri_that_is_not_there_is_a_clear_error(tmp_path, cache_dir, capsys):
    import mlflow

    before = mlflow.get_tracking_uri()
    try:
        code = main(["--checkpoint", "runs:/0123456789abcdef/model", "--tracking-uri",
                     f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(tmp_path / "o"), "--no-progress"])
    finally:
        mlflow.set_tracking_uri(before)
    assert code == 2 and "runs:/0123456789abcdef/model" in capsys.readouterr().err
