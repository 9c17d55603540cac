"""Config dataclasses: validation, overrides, presets, JSON round trip."""

from __future__ import annotations

import json

import pytest

from pdcbdm.config import PRESETS, Config, ConfigError, LossConfig, apply_overrides, preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid_and_round_trip(name, tmp_path):
    cfg = preset(name)
    cfg.save_json(tmp_path / "c.json")
    assert Config.load_json(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["loss"]["pd_weight"] == cfg.loss.pd_weight


def test_overrides_convert_types_and_keep_search_names():
    cfg = apply_overrides(Config(), ["loss.pd_weight=0.05", "model.tsa_resolutions=16,8", "data.imbalance=none",
                                     "data.dataset=cifar10-lt", "data.download=true",
                                     "train.steps=7", "sample.guidance=1.4",
                                     "loss.label_dist=power:0.5"])
    assert cfg.loss.pd_weight == 0.05 and cfg.model.tsa_resolutions == "16,8" and cfg.data.imbalance is None
    assert cfg.data.download is True and cfg.train.steps == 7 and cfg.sample.guidance == 1.4
    flat = cfg.flat()
    for key in ("loss.pd_weight", "loss.cbdm_tau", "loss.cbdm_gamma", "loss.label_dist", "loss.split_ratio",
                "model.tsa_resolutions", "sample.guidance"):
        assert key in flat
    assert apply_overrides(cfg, {"loss.cbdm_tau": 0.5}).loss.cbdm_tau == 0.5


@pytest.mark.parametrize("item, message", [
    ("loss.pd_weight=-1", "loss.pd_weight must be >= 0, got -1.0"),
    ("loss.split_ratio=1.0", "loss.split_ratio must be in (0, 1)"),
    ("loss.label_dist=zipf", "loss.label_dist must be one of"),
    ("train.steps=ten", "train.steps expects int, got 'ten'"),
    ("loss.nope=1", "unknown config field 'loss.nope'"),
    ("optim.lr=1", "unknown config section 'optim'"),
    ("loss.pd_weight", "must look like section.field=value"),
    ("model.tsa_resolutions=16,x", "model.tsa_resolutions must be comma-separated integers"),
    ("data.dataset=imagenet", "data.dataset must be one of"),
    ("data.imbalance=0.5", "data.imbalance must be >= 1"),
    ("train.precision=fp16", "train.precision must be 'fp32', 'bf16' or 'auto'"),
    ("eval.guidance_grid=a,b", "eval.guidance_grid must be comma-separated numbers"),
    ("eval.split_ratio=0", "eval.split_ratio must be in (0, 1)"),
    ("eval.proxy_guidance=-0.5", "eval.proxy_guidance must be >= 0"),
])
def test_bad_values_name_the_field(item, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [item])
    assert message in str(err.value)


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="loss.cbdm_gamma"):
        LossConfig(cbdm_gamma=-0.1)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("imagenet")
    with pytest.raises(ConfigError, match="unknown field"):
        Config.from_dict({"loss": {"pd_wieght": 1}})


def test_data_image_size_is_checked_by_the_data_sets_rule():
    """data.image_size: digits take 8 or a larger multiple of 4, CIFAR only its own 32; a bad value is a config
    error naming the field and the sizes."""
    assert apply_overrides(preset("digits"), {"data.image_size": "8"}).data.image_size == 8
    with pytest.raises(ConfigError, match=r"data.image_size: digits image size must be 8 .* got 6"):
        apply_overrides(preset("digits"), {"data.image_size": "6"})
    with pytest.raises(ConfigError, match="data.image_size: .*cifar10-lt is served only at its own size 32"):
        apply_overrides(preset("cifar10-lt"), {"data.image_size": "16"})
