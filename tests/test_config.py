"""Config dataclasses: validation, overrides, presets, JSON round trip."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys

import pytest

import pdcbdm.config
from pdcbdm.config import Config, ConfigError, LossConfig, apply_overrides
from pdcbdm.presets import PRESETS, preset


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


def test_a_renamed_field_is_named_with_its_new_name():
    """model.preset became model.network: a --set or a stored config with the old name is told the new one."""
    for bad in (lambda: apply_overrides(Config(), ["model.preset=cifar"]),
                lambda: Config.from_dict({"model": {"preset": "cifar"}})):
        with pytest.raises(ConfigError, match=r"model.preset is now called model.network"):
            bad()
    assert apply_overrides(Config(), ["model.network=cifar"]).model.network == "cifar"


# (the config's copy, the module that implements the choices, its name there): the config cannot import those
# modules (they import torch), so it names their choices itself
COPIES = [
    ("NETWORKS", "pdcbdm.models", "NETWORKS"),
    ("DATASETS", "pdcbdm.data.registry", "DATASET_NAMES"),
    ("PREPARED", "pdcbdm.data.own", "PREPARED"),
    ("REFERENCE_CHOICES", "pdcbdm.data.own", "REFERENCE_CHOICES"),
    ("JUDGE_CHOICES", "pdcbdm.evaluation.real_sets", "JUDGE_CHOICES"),
    ("EXTRACTORS", "pdcbdm.metrics.extractors", "EXTRACTOR_KINDS"),
    ("VAR_TYPES", "pdcbdm.diffusion", "VAR_TYPES"),
    ("PD_FORMS", "pdcbdm.losses", "PD_FORMS"),
    ("SPLIT_MODES", "pdcbdm.data.split", "SPLIT_MODES"),
    ("LR_SCHEDULES", "pdcbdm.training.trainer", "LR_SCHEDULES"),
    ("PRECISIONS", "pdcbdm.training.trainer", "PRECISIONS"),
    ("SAMPLERS", "pdcbdm.sampling", "SAMPLERS"),
    ("PROTOCOLS", "pdcbdm.evaluation.settings", "PROTOCOLS"),
]


@pytest.mark.parametrize("copy, owner, name", COPIES, ids=[c[0] for c in COPIES])
def test_each_choice_copy_equals_its_owners(copy, owner, name):
    """Every choice tuple the config copies names the same values as the module that implements them."""
    def values(x):
        return {x} if isinstance(x, str) else set(x)

    assert values(getattr(pdcbdm.config, copy)) == values(getattr(importlib.import_module(owner), name))


def test_every_choice_check_of_the_config_reads_a_named_tuple():
    """No field is checked against a literal tuple: each choice has a name that COPIES (or the config itself,
    for the choices only the config defines) keeps in step with its owner."""
    tree = ast.parse(inspect.getsource(pdcbdm.config))
    checks = [node.args[0] for node in ast.walk(tree) if isinstance(node, ast.Call)
              and getattr(node.func, "id", "") == "_check"]
    literal = [ast.unparse(c) for check in checks for c in ast.walk(check) if isinstance(c, ast.Compare)
               and isinstance(c.ops[0], ast.In) and isinstance(c.comparators[0], ast.Tuple)]
    assert literal == ["self.device.split(':')[0] in ('cpu', 'cuda')"], literal  # a device's prefix, no choice
    own = {"GPU_OPTIONS", "LABEL_DIST_NAMES", "LABEL_DIST_POWERS"}
    tuples = {t.id for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple)
              for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()}
    assert tuples - own <= {c[0] for c in COPIES}, tuples - own - {c[0] for c in COPIES}


def test_the_config_and_presets_import_no_torch():
    """The command lines check a config before anything heavy loads: pdcbdm.config and pdcbdm.presets stay
    torch-free (pdcbdm.labels, pdcbdm.training.gpu_options and pdcbdm.data.prep_report read their choices from
    the config)."""
    code = "import sys, pdcbdm.config, pdcbdm.presets; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
