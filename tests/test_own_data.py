"""A user's own data end to end (data.dataset=parquet, data.root=D): config, data sets, the own U-Nets, the domain
CNN, floors with short classes, the evaluation, the commands, the trial's MLflow records and a real search."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pdcbdm.assets import cache_payload, evaluation_assets
from pdcbdm.config import ConfigError, apply_overrides
from pdcbdm.data import (build_calibration_dataset, build_dataset, build_floor_dataset, build_reference_dataset,
                         prepared_summary, reference_kind)
from pdcbdm.data.own import prepared_identity
from pdcbdm.data.prepared import read_prepared_meta
from pdcbdm.evaluation import Evaluator, evaluation_split
from pdcbdm.evaluation.real_sets import calibrated_judge, judge_accuracy, readable_reference
from pdcbdm.metrics import FeatureSet, FloorUnavailable, evaluate_features, noise_floor, reference_features
from pdcbdm.metrics.domain_net import DomainExtractor
from pdcbdm.metrics.floor import floor_draw
from pdcbdm.models import OWN_NETWORKS, build_unet
from pdcbdm.models.attention import SelfAttention, TimestepSelfAttention
from pdcbdm.presets import PRESETS, preset
from pdcbdm.train import load_data
from pdcbdm.train import main as train_main
from tests.own_data import NAMES, write_own_data
from tests.searchutil import ROOT, artifact_paths, run_search, seed_cache, trial_runs


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A 16 px RGB long-tailed set: 4 classes of 40, 20, 8, 4 training images, 10 held out per class."""
    return write_own_data(tmp_path_factory.mktemp("own") / "D")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def own_config(root, *items: str):
    """The smoke budget on own 16 px data (the small U-Net takes 16 px; the own presets are sized 32 and up)."""
    return apply_overrides(preset("smoke"), ["data.dataset=parquet", f"data.root={root}", "eval.extractor=domain",
                                             "data.imbalance=none", "eval.num_samples=20", "eval.proxy_samples=8",
                                             *items])


# ---------------------------------------------------------------- config and data

def test_config_names_the_field_of_every_own_data_mistake(own):
    for name in OWN_NETWORKS:
        assert preset(name).data.dataset == "parquet" and preset(name).model.network == name
    # absolute: a trial's worker runs in another folder
    assert apply_overrides(preset("own32"), ["data.root=rel/D"]).data.root == os.path.abspath("rel/D")
    cases = [(["data.dataset=parquet", "data.root=none"], "data.root: required with data.dataset=parquet"),
             ([f"data.root={own}", "data.dataset=parquet", "eval.extractor=domain", "data.imbalance=10"],
              "data.imbalance"),
             ([f"data.root={own}", "data.dataset=parquet", "data.imbalance=none"],
              "eval.extractor: 'digits' reads the 16x16 digits"),
             (["eval.extractor=domain"], "eval.extractor: 'domain' is trained on a prepared data set"),
             ([f"data.root={own}", "data.dataset=parquet", "eval.extractor=domain", "data.imbalance=none",
               "data.image_size=32"],
              "data.image_size: 32, but .* holds 16x16 images")]
    for items, message in cases:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(preset("smoke"), items)
    with pytest.raises(ConfigError, match="model.network: 'own32' is sized for 32x32 images, the data are 16x16"):
        load_data(apply_overrides(preset("own32"), [f"data.root={own}"]))


def _mapped_file(address: int) -> str:
    """The file mapped at ``address`` in this process ("" for anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else ""
    return ""


def test_prepared_data_come_from_meta_and_are_memory_mapped(own):
    data = load_data(own_config(own))
    meta = read_prepared_meta(own)
    assert data.counts() == [40, 20, 8, 4] and data.class_names == list(NAMES[:4]) and data.image_shape == (3, 16, 16)
    assert _mapped_file(data.images.data_ptr()).endswith("train/_images.npy")  # the file's pages, not a copy
    summary = prepared_summary(own)
    assert summary["rho"] == 10.0 and summary["num_images"] == 72 and summary["digest"] == meta["digest"]
    assert summary["reference_folder"] is False and summary["heldout_images"] == 40
    heldout = build_dataset("parquet", root=own, split="test")
    assert heldout.counts() == [10] * 4
    with pytest.raises(ValueError, match="data.imbalance"):
        build_dataset("parquet", root=own, imbalance=5.0)


def test_reference_and_floor_split_the_held_out_images_without_overlap(own, tmp_path):
    """eval.reference: auto is the training set (re-weighted by the evaluator); the judge's calibration images and
    the floors' split heldout/ without overlap; "heldout" scores against the calibration part; a user's reference
    folder is the reference (and the calibration set) under auto, every held-out image then a floor image."""
    train = build_reference_dataset("parquet", root=own)
    assert train.counts() == [40, 20, 8, 4] and train.identity == prepared_identity(own, "train") and not train.hflip
    assert reference_kind("parquet", own) == "balanced-train"
    reference = build_calibration_dataset("parquet", root=own)
    floor = build_floor_dataset("parquet", root=own)
    assert build_reference_dataset("parquet", root=own, choice="heldout").identity == reference.identity
    assert reference.counts() == [5] * 4 and floor.counts() == [5] * 4
    heldout = build_dataset("parquet", root=own, split="test").images.flatten(1)
    rows = {tuple(r.tolist()) for r in heldout}
    ref_rows = {tuple(r.tolist()) for r in reference.images.flatten(1)}
    floor_rows = {tuple(r.tolist()) for r in floor.images.flatten(1)}
    assert not ref_rows & floor_rows and ref_rows | floor_rows == rows
    assert build_calibration_dataset("parquet", root=own).identity == reference.identity  # fixed, not per run
    # a user-supplied reference split: it is the reference, every held-out image a floor image
    other = write_own_data(tmp_path / "R", counts=(12, 6, 3, 3), heldout=(4, 2, 1, 0), reference=6)
    assert build_reference_dataset("parquet", root=other).counts() == [6, 6, 6, 6]
    assert build_floor_dataset("parquet", root=other).counts() == [4, 2, 1, 0]
    assert prepared_summary(other)["reference_folder"] is True and reference_kind("parquet", other) == "folder"
    assert build_calibration_dataset("parquet", root=other).counts() == [6, 6, 6, 6]
    assert build_reference_dataset("parquet", root=other, choice="train").counts() == [12, 6, 3, 3]
    with pytest.raises(ValueError, match="eval.reference: 'folder' needs a reference split"):
        build_reference_dataset("parquet", root=own, choice="folder")
    small = write_own_data(tmp_path / "S", counts=(12, 6, 3, 3), heldout=(5, 2, 1, 0))
    assert build_calibration_dataset("parquet", root=small).counts() == [3, 2, 1, 0]  # 2 per class for the judge
    assert build_floor_dataset("parquet", root=small).counts() == [2, 0, 0, 0]


def test_identities_come_from_the_digest_without_hashing_images(own, cache):
    meta = read_prepared_meta(own)
    cfg = own_config(own)
    assets = evaluation_assets(cfg, cache)
    assert all(meta["digest"] in assets[name] for name in ("training data", "reference data", "floor data"))
    assert len(set(assets.values())) == 4 and assets["feature extractor"].startswith("domain-cnn/sha256:")
    payload = cache_payload(cfg, cache)  # the trained network ships to the cluster's nodes like the digits CNN
    assert len(payload) == 1 and next(iter(payload)).startswith("domain-cnn-")


# ---------------------------------------------------------------- networks

@pytest.mark.parametrize("name", OWN_NETWORKS)
def test_own_unets_have_attention_and_tsa_at_16_and_take_any_channels(name):
    side = int(name.removeprefix("own"))
    for channels in (1, 3):
        net = build_unet(name, 5, tsa_resolutions="16", in_channels=channels).eval()
        assert 16 in net.spec.resolutions and net.spec.resolutions[-1] == 8
        kinds = {type(m) for m in net.modules()}
        assert TimestepSelfAttention in kinds and SelfAttention in kinds  # TSA at 16, plain in the middle at 8
        if name == "own32":  # the CPU net: one forward pass here; the others are checked by construction
            x = torch.randn(2, channels, side, side)
            assert net(x, torch.tensor([3, 500]), torch.tensor([0, 5])).shape == x.shape
    assert PRESETS[name]["model.network"] == name and PRESETS[name]["model.tsa_resolutions"] == "16"


def test_domain_network_learns_the_classes_and_is_cached_by_digest(own, cache):
    first = DomainExtractor.load_or_train(own, cache_dir=cache)
    (path,) = first.cache_files
    mtime = path.stat().st_mtime_ns
    again = DomainExtractor.load_or_train(own, cache_dir=cache)
    assert again.identity == first.identity and path.stat().st_mtime_ns == mtime  # read, not trained again
    assert first.accuracy is not None and first.accuracy >= 0.9  # distinct shapes: an easy set
    assert first.judges(NAMES[:4]) and not first.judges(["a", "b", "c", "d"])
    feats, logits = first.extract(build_calibration_dataset("parquet", root=own).images)
    assert feats.shape == (20, 64) and logits.shape == (20, 4)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        first.extract(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


def test_only_a_network_trained_on_the_data_classes_judges_them(own, cache):
    extractor = DomainExtractor.load_or_train(own, cache_dir=cache)
    reference = reference_features(extractor, build_calibration_dataset("parquet", root=own), cache, progress=False)
    assert calibrated_judge(extractor, reference, 4, NAMES[:4], cache) is not None
    # the same count of logits over other classes (Inception's 1,008 against a 1,008-class set): no judge, and the
    # metrics get no logits to calibrate one on
    extractor.logit_classes = ("a", "b", "c", "d")
    assert calibrated_judge(extractor, reference, 4, NAMES[:4], cache) is None
    assert readable_reference(extractor, reference, NAMES[:4], 4).logits is None
    # given the training images' features, a class-balanced linear probe on the features judges instead (what
    # Inception gets on a user's set): it reads features only, and knows the held-out images' classes
    train = reference_features(extractor, load_data(own_config(own)), cache, progress=False)
    judge = calibrated_judge(extractor, reference, 4, NAMES[:4], cache, train=train)
    assert judge is not None and judge.probe is not None and judge.probe.heldout_accuracy >= 0.75
    decided = judge.decide(reference.features, None)
    assert (decided == reference.labels).mean() >= 0.75
    assert judge_accuracy(reference, judge) == pytest.approx(
        float((judge.probe.logits(reference.features).argmax(1) == reference.labels).mean()))


# ---------------------------------------------------------------- floors and the evaluation

def _pool(counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(0)
    return FeatureSet(rng.normal(size=(len(labels), 4)) + labels[:, None], None, labels, extractor="x")


def test_a_short_class_loses_only_its_own_floor(tmp_path):
    pool, reference = _pool([8, 8, 8, 2]), _pool([10, 10, 10, 10])
    floors = noise_floor(pool, reference, [4, 4, 4, 4], head_classes=(0, 1), tail_classes=(2, 3), num_classes=4,
                         seeds=2, cache_dir=tmp_path, prd_runs=1)
    assert floors["floor_short_classes"] == "3" and "class(es) 3 (2 < 4)" in floors["floor_note"]
    assert "fid_class_0_floor" in floors and "fid_class_3_floor" not in floors
    assert isinstance(floors["fid_floor"], float) and isinstance(floors["fid_tail_floor"], float)
    assert np.bincount(floor_draw(pool, [4, 4, 4, 4], 0, allow_short=True).labels).tolist() == [4, 4, 4, 2]
    with pytest.raises(FloorUnavailable, match="class 0"):
        noise_floor(pool, reference, [9, 9, 9, 9], head_classes=(0, 1), tail_classes=(2, 3), num_classes=4,
                    seeds=1, cache_dir=tmp_path)


def test_evaluation_of_own_data_scores_with_judge_and_floors(own, cache):
    cfg = own_config(own)
    data = load_data(cfg)
    split = evaluation_split(cfg, data.counts())
    evaluator = Evaluator.build(cfg, num_classes=4, head=split.head, tail=split.tail, cache_dir=cache,
                                train_counts=data.counts())
    assert evaluator.reference_kind == "balanced-train" and evaluator.judge is not None
    assert np.allclose(evaluator.reference.class_shares, 0.25) and len(evaluator.reference) == 72
    assert evaluator.scoring()["reference_kind"] == "balanced-train" and evaluator.judge_accuracy >= 0.75
    assert evaluator.scoring()["judge"].startswith("domain-cnn (4 of 4 classes, held-out accuracy ")
    real = build_floor_dataset("parquet", root=own)
    metrics, rows = evaluator.score(real.images, real.labels)
    assert metrics["consistency_mean"] >= 0.75 and isinstance(metrics["fid_floor"], float)
    assert all(row["fid_floor"] is not None for row in rows[:2])  # 40 and 20 training (reference) images
    assert rows[3]["fid"] is None and rows[3]["kid"] is not None  # 4: too few for a class FID, KID stands in
    short = evaluator.floors(torch.arange(28) % 4)  # 7 per class, the floor part holds 5: every class short
    assert set(short) == {"floor_note"}
    # the memorisation check: real unseen images sit at their floor, copies of training images are all flagged
    assert 0.0 <= metrics["memorisation_floor"] <= 1.0 and rows[3]["memorisation_floor"] is not None
    fresh = build_calibration_dataset("parquet", root=own)  # unseen real images, outside the floor pool
    unseen, _ = evaluator.score(fresh.images, fresh.labels)
    assert abs(unseen["memorisation"] - unseen["memorisation_floor"]) < 0.35, unseen
    train = load_data(cfg)
    copies, _ = evaluator.score(train.images[:40:2], train.labels[:40:2])
    assert copies["memorisation"] == 1.0 and metrics["fid_few"] is not None  # classes of 8 and 4: few-shot


def test_eval_judge_picks_the_network_that_judges_classes(own, cache, tmp_path):
    """eval.judge=cnn: the domain CNN judges beside a feature network with no head over the data's classes (the
    role of Inception, played here by a second, briefly trained CNN whose logits are not the classes: Inception on
    a CPU costs minutes); the metrics and the Inception Score stay the feature network's. eval.judge=probe: a
    linear probe even on a network that could judge itself."""
    from pdcbdm.evaluation import RealSets
    from pdcbdm.metrics.domain_net import DomainNetConfig

    features = DomainExtractor.load_or_train(own, cache_dir=tmp_path,
                                             config=DomainNetConfig(seed=1, min_steps=20, max_steps=20))
    features.logit_classes = None  # a head over other classes, as Inception's
    cfg = own_config(own, "eval.extractor=inception", "eval.judge=cnn")
    split = evaluation_split(cfg, load_data(cfg).counts())
    real = RealSets.load(cfg, features, 4, cache)
    evaluator = Evaluator(cfg, features, real.reference, 4, split.head, split.tail, (3, 16, 16), torch.device("cpu"),
                          score_shape=real.score_shape, judge=real.judge, floor_pool=real.floor_pool,
                          floor_note=real.floor_note, cache_dir=cache, reference_kind=real.kind,
                          train_features=real.train, judge_accuracy=real.judge_accuracy,
                          judge_network=real.judge_network)
    domain = DomainExtractor.load_or_train(own, cache_dir=cache)
    assert real.judge_network.identity == domain.identity != features.identity
    assert real.judge.extractor == domain.identity and real.judge.probe is None
    assert real.floor_pool.judged.extractor == domain.identity and real.floor_pool.extractor == features.identity
    assert evaluator.scoring()["judge"].startswith("domain-cnn (4 of 4 classes, held-out accuracy ")
    floor = build_floor_dataset("parquet", root=own)
    metrics, _ = evaluator.score(floor.images, floor.labels)
    assert metrics["consistency_mean"] >= 0.75 and isinstance(metrics["consistency_mean_floor"], float)
    plain = evaluate_features(FeatureSet(features.extract(floor.images)[0], None, floor.labels), real.reference,
                              head_classes=split.head, tail_classes=split.tail, num_classes=4).to_dict()
    assert metrics["fid"] == pytest.approx(plain["fid"])  # the FID is the feature network's
    assert list(cache_payload(cfg, cache)) == [domain.cache_files[0].name]  # the judge is shipped to the nodes
    probe = Evaluator.build(own_config(own, "eval.judge=probe"), num_classes=4, head=split.head, tail=split.tail,
                            cache_dir=cache)
    assert probe.judge.probe is not None and probe.scoring()["judge"].startswith("linear probe on domain-cnn")
    for bad in ("eval.judge=cnn", "eval.judge=resnet"):  # cnn on a built-in set; an unknown judge
        with pytest.raises(ConfigError, match="eval.judge"):
            apply_overrides(preset("smoke"), [bad])


# ---------------------------------------------------------------- commands and records

def test_train_and_evaluate_commands_run_on_own_data(own, cache, tmp_path, capsys):
    """The commands on a copy of the module's cache: the domain network of ``own`` that the tests above trained
    is read, not trained again (about 8 s on one core)."""
    seed_cache(tmp_path, cache)
    env = {**os.environ, "PDCBDM_CACHE": str(tmp_path / "cache")}
    base = ["--set", "data.dataset=parquet", "--set", f"data.root={own}", "--set", "eval.extractor=domain", "--set",
            "data.imbalance=none"]
    run = subprocess.run([sys.executable, "-m", "pdcbdm.train", "--preset", "smoke", "--steps", "3", *base,
                          "--set", "sample.steps=2", "--out", str(tmp_path / "run"), "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "pipelines.evaluate", "--checkpoint", str(tmp_path / "run" /
                           "checkpoint.pt"), "--num-samples", "12", "--guidance", "1", "--steps", "2",
                           "--noise-error-images", "4", "--out", str(tmp_path / "eval"), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["reference_kind"] == "balanced-train" and summary["guidance"]["1"]["fid"] > 0
    assert summary["judge"].startswith("domain-cnn")
    assert summary["config"]["data"]["root"] == str(own)
    # a folder that is no prepared set, in this process (no third Python start): exit status 2, the reason, and no
    # exception escapes
    assert train_main(["--preset", "own32", "--set", f"data.root={tmp_path / 'missing'}", "--out",
                       str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not a prepared data set" in err and "Traceback" not in err


def test_a_trial_records_its_data_from_meta(own, tmp_path):
    from mlflow.tracking import MlflowClient

    from tune.run_logger import RankZeroLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("own", artifact_location=str(tmp_path / "art"))).info.run_id
    cfg = own_config(own)
    RankZeroLogger(uri, run).training_data(cfg, load_data(cfg))
    tags = client.get_run(run).data.tags
    assert tags["pdcbdm.data.num_images"] == "72" and tags["pdcbdm.data.num_classes"] == "4"
    assert tags["pdcbdm.data.rho"] == "10.0" and tags["pdcbdm.data.digest"] == read_prepared_meta(own)["digest"]
    assert {"data/_meta.json", "data/_report.json", "data/summary.json"} <= set(artifact_paths(uri, run))


# 4 steps with a report (proxy scores, checkpoint) at 2 and the final evaluation at 4; 4 images for the noise error
# (the preset's 100 would be all 72 training images, 20 forwards each) and two guidance values instead of four
OWN_SEARCH = [arg for item in (
    "train.steps=4", "train.eval_every=2", "train.log_every=2", "train.batch_size=8", "eval.num_samples=20",
    "eval.proxy_samples=8", "sample.steps=5", "eval.noise_error_images=4", "eval.guidance_grid=0,1")
    for arg in ("--set", item)]


@pytest.mark.slow
def test_a_search_on_own_data_scores_its_trials(tmp_path):
    """tune/search.py --preset own32 on a 32 px prepared set: one trial of the own32 U-Net, end to end, on a budget
    of its own (``OWN_SEARCH``: a step of own32 costs 0.8 s here, five times the smoke net's)."""
    root = write_own_data(tmp_path / "D", size=32)
    proc = run_search(tmp_path / "out", "own", "--preset", "own32", "--trials", "1", "--set", f"data.root={root}",
                      *OWN_SEARCH)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = trial_runs(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}", "own")
    assert len(runs) == 1
    for r in runs:
        assert r.data.metrics["fid"] > 0 and "proxy_fid_floor" in r.data.metrics
        assert r.data.tags["pdcbdm.extractor"].startswith("domain-cnn/sha256:")
        assert r.data.tags["pdcbdm.reference_kind"] == "balanced-train" and r.data.tags["pdcbdm.data.num_images"] == "72"
    from tune import analysis  # the notebooks' table says how each trial was scored

    results = analysis.load_search(tmp_path / "out" / "searches" / "own")
    assert results.trials["reference_kind"].tolist() == ["balanced-train"]
    assert results.trials["judge"][0].startswith("domain-cnn (") and not results.notes


def test_the_data_benchmark_measures_load_and_private_memory_of_workers(tmp_path):
    """pipelines.benchmark --sections data at a small scale: every worker loads in well under the target, and the
    data add no private copy (the array's pages stay in the shared page cache)."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "pipelines.benchmark", "--sections", "data", "--data-images",
                           "2000", "--data-size", "32", "--data-workers", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    section = json.loads(out.read_text())["data"]
    assert section["array_bytes"] > 2000 * 3 * 32 * 32 and section["meta_digest_s"] < section["decode_png_s"]
    workers = [w for run in section["runs"].values() for w in run["workers"]]
    assert len(workers) == 4 and all(w["images"] == 2000 and w["data_anon_mb"] < 5 for w in workers)
    assert all(c["ok"] for c in section["checks"]), section["checks"]
    assert "data load < 5 s" in done.stdout and "MISS" not in done.stdout
