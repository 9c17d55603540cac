"""The search space only yields valid configs (real Optuna, no Ray)."""

from __future__ import annotations

import functools

import optuna
import pytest

from pdcbdm.config import apply_overrides, preset
from pdcbdm.models import PRESETS as MODEL_PRESETS
from pdcbdm.models import build_unet
from tune.space import SEARCHED, config_point, search_space, tsa_choices


@pytest.mark.parametrize("name", ["digits", "cifar100-lt"])
def test_every_suggestion_is_a_valid_config(name):
    base = preset(name)
    levels = MODEL_PRESETS[base.model.preset].resolutions
    space = functools.partial(search_space, tsa=tsa_choices(levels), pd_weight_center=base.loss.pd_weight)
    low, high = base.loss.pd_weight / 10, base.loss.pd_weight * 10
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    seen_tsa = set()
    for _ in range(40):
        trial = study.ask()
        space(trial)
        assert set(trial.params) == set(SEARCHED)
        cfg = apply_overrides(base, trial.params)
        assert low <= cfg.loss.pd_weight <= high and 0 < cfg.loss.split_ratio < 1
        assert cfg.sample.guidance == base.sample.guidance  # w is scored, never searched
        seen_tsa.add(cfg.model.tsa_resolutions)
        study.tell(trial, cfg.loss.pd_weight)
    for tsa in seen_tsa:  # every placement builds a network
        if name == "digits":
            build_unet(base.model.preset, 10, tsa_resolutions=tsa)
    assert tsa_choices((16, 8, 4)) == ("", "8", "4", "8,4")
    assert "16" in tsa_choices((32, 16, 8, 4)) and "16,8,4" in tsa_choices((32, 16, 8, 4))


def test_pinned_fields_are_not_searched_and_the_default_point_is_in_the_space():
    study = optuna.create_study()
    trial = study.ask()
    search_space(trial, fixed=("loss.pd_weight", "loss.split_ratio"))
    assert "loss.pd_weight" not in trial.params and "loss.split_ratio" not in trial.params
    assert set(trial.params) == set(SEARCHED) - {"loss.pd_weight", "loss.split_ratio"}
    point = config_point(preset("digits").flat())
    assert set(point) == set(SEARCHED)
    assert point["model.tsa_resolutions"] in tsa_choices(MODEL_PRESETS["small"].resolutions)


def test_guidance_and_evaluation_fields_are_not_searched():
    """w needs no retraining and the evaluation's split and proxy w must be the same for every trial."""
    trial = optuna.create_study().ask()
    search_space(trial)
    for key in ("sample.guidance", "eval.proxy_guidance", "eval.split_ratio", "eval.guidance_grid"):
        assert key not in SEARCHED and key not in trial.params
