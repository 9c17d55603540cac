"""The search space (tune/spaces/default.yaml, read by tune/space_file.py) only yields valid configs (real
Optuna, no Ray)."""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from pdcbdm.config import apply_overrides
from pdcbdm.models import build_unet
from pdcbdm.presets import preset
from pdcbdm.training.trainer import network_levels
from tune import space_file
from tune.space_file import SpaceError, default_knobs, tsa_choices


def _default_space(base, fixed=()):
    """The default space file resolved against ``base``, as Ray pickles its define-by-run space."""
    spec = space_file.load(space_file.DEFAULT_SPACE, base, fixed)
    return spec, pickle.loads(pickle.dumps(functools.partial(space_file.suggest, spec=spec)))


def _preset_point(base) -> dict:
    """The preset's value of every knob the default file searches."""
    return {k: base.flat()[k] for k in default_knobs()}


@pytest.mark.parametrize("name", ["digits", "cifar100-lt"])
def test_every_suggestion_is_a_valid_config(name):
    base = preset(name)
    levels = network_levels(base)  # digits trains at 8x8: levels 8, 4, 2
    _, space = _default_space(base)
    low, high = base.loss.pd_weight / 10, base.loss.pd_weight * 10
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    seen_tsa = set()
    for _ in range(40):
        trial = study.ask()
        space(trial)
        assert set(trial.params) == set(default_knobs())
        cfg = apply_overrides(base, trial.params)
        assert low <= cfg.loss.pd_weight <= high and 0 < cfg.loss.split_ratio < 1
        assert cfg.sample.guidance == base.sample.guidance  # w is scored, never searched
        seen_tsa.add(cfg.model.tsa_resolutions)
        study.tell(trial, cfg.loss.pd_weight)
    assert seen_tsa <= set(tsa_choices(levels))
    for tsa in seen_tsa:  # every placement builds a network
        if name == "digits":
            build_unet(base.model.network, 10, tsa_resolutions=tsa, image_size=8)
    assert tsa_choices((16, 8, 4)) == ("", "8", "4", "8,4")
    assert "16" in tsa_choices((32, 16, 8, 4)) and "16,8,4" in tsa_choices((32, 16, 8, 4))


def test_pinned_fields_are_not_searched_and_the_default_point_is_in_the_space():
    study = optuna.create_study()
    trial = study.ask()
    _, space = _default_space(preset("digits"), fixed=("loss.pd_weight", "loss.split_ratio"))
    space(trial)
    assert "loss.pd_weight" not in trial.params and "loss.split_ratio" not in trial.params
    assert set(trial.params) == set(default_knobs()) - {"loss.pd_weight", "loss.split_ratio"}
    point = _preset_point(preset("digits"))
    assert set(point) == set(default_knobs())
    assert point["model.tsa_resolutions"] in tsa_choices(network_levels(preset("digits")))


def test_guidance_and_evaluation_fields_are_not_searched():
    """w needs no retraining and the evaluation's split and proxy w must be the same for every trial."""
    trial = optuna.create_study().ask()
    _default_space(preset("digits"))[1](trial)
    for key in ("sample.guidance", "eval.proxy_guidance", "eval.split_ratio", "eval.guidance_grid"):
        assert key not in default_knobs() and key not in trial.params


# --- the space file (--space): pure parsing and resolution, no Ray ---

@pytest.mark.parametrize("name", ["digits", "cifar100-lt"])
def test_default_file_searches_the_six_knobs(name):
    """tune/spaces/default.yaml resolves, for each preset, to the six PD-CBDM knobs in file order: lambda on a log
    scale a decade either side of the preset's, tau, gamma, q, the head/tail split on a 0.1 grid and the TSA
    placements of the preset's U-Net; the preset's own point lies inside it."""
    base = preset(name)
    spec = space_file.load(space_file.DEFAULT_SPACE, base)
    assert default_knobs() == ("loss.pd_weight", "loss.cbdm_tau", "loss.cbdm_gamma", "loss.label_dist",
                               "loss.split_ratio", "model.tsa_resolutions")
    assert list(spec) == list(default_knobs())
    lam = base.loss.pd_weight
    assert space_file.distributions(spec) == {
        "loss.pd_weight": FloatDistribution(lam / 10, lam * 10, log=True),
        "loss.cbdm_tau": FloatDistribution(0.1, 2.0), "loss.cbdm_gamma": FloatDistribution(0.05, 1.0),
        "loss.label_dist": CategoricalDistribution(["cbdm", "inverted", "uniform", "power:0.5"]),
        "loss.split_ratio": FloatDistribution(0.5, 0.9, step=0.1),
        "model.tsa_resolutions": CategoricalDistribution(list(tsa_choices(network_levels(base))))}
    point, outside = space_file.preset_point(spec, base.flat())
    assert point == _preset_point(base) and outside == []


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_custom_file_searches_what_it_names(tmp_path):
    """Only the file's knobs are searched, pinned ones are left out, integers stay integers, JSON is read too,
    and a preset value outside the space leaves the first point (Optuna samples it)."""
    base = preset("smoke")
    path = _write(tmp_path, "loss.cbdm_tau: {range: [1.5, 2.0]}\nloss.pd_pairs: {range: [0, 8], step: 2}\n"
                            "train.lr: {range: [0.0001, 0.01], scale: log}\n"
                            "model.tsa_resolutions: {choices: ['', 8, '8,4']}\nloss.split_ratio: {range: [0.5, 0.9]}\n")
    spec = space_file.load(path, base, fixed=("loss.split_ratio",))
    assert list(spec) == ["loss.cbdm_tau", "loss.pd_pairs", "train.lr", "model.tsa_resolutions"]
    assert spec["loss.pd_pairs"] == {"type": "int", "low": 0, "high": 8, "log": False, "step": 2}
    assert spec["model.tsa_resolutions"]["choices"] == ["", "8", "8,4"]  # text, as the field and the preset hold
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        space_file.suggest(trial, spec)
        assert set(trial.params) == set(spec)
        cfg = apply_overrides(base, trial.params)
        assert cfg.loss.pd_pairs in (0, 2, 4, 6, 8) and 1e-4 <= cfg.train.lr <= 1e-2
        study.tell(trial, 1.0)
    point, outside = space_file.preset_point(spec, base.flat())
    assert outside == ["loss.cbdm_tau"] and point == {"loss.pd_pairs": 0, "train.lr": base.train.lr,
                                                      "model.tsa_resolutions": "8"}
    as_json = _write(tmp_path, json.dumps({"loss.cbdm_gamma": {"range": [0.1, 0.5]}}), "space.json")
    assert space_file.load(as_json, base) == {"loss.cbdm_gamma": {"type": "float", "low": 0.1, "high": 0.5,
                                                                  "log": False, "step": None}}


@pytest.mark.parametrize("text, says", [
    ("loss.nope: {range: [0, 1]}", "not a config field"),
    ("eval.proxy_guidance: {range: [0, 2]}", "cannot be searched"),
    ("train.steps: {range: [10, 20]}", "cannot be searched"),
    ("loss.cbdm_tau: {range: [2.0, 0.1]}", "empty or inverted range"),
    ("loss.cbdm_tau: {range: [1.0, 1.0]}", "empty or inverted range"),
    ("loss.cbdm_tau: {range: [0.1]}", "range must be [LOW, HIGH]"),
    ("loss.cbdm_tau: {range: [0.1, 2.0], scale: cubic}", "scale must be linear or log"),
    ("loss.cbdm_gamma: {range: [0.0, 1.0], scale: log}", "log scale needs LOW > 0"),
    ("loss.split_ratio: {range: [0.5, 0.9], step: 0.3}", "does not fit the range"),
    ("loss.split_ratio: {range: [0.5, 0.9], step: 0.1, scale: log}", "cannot be combined with a log scale"),
    ("loss.label_dist: {choices: []}", "non-empty list"),
    ("loss.label_dist: {choices: [cbdm, cbdm]}", "repeat"),
    ("loss.label_dist: {choices: [cbdm, zipf]}", "'zipf' is not a valid value"),
    ("loss.label_dist: {range: [0, 1]}", "not a number"),
    ("loss.split_ratio: {range: [0.5, 1.5]}", "1.5 is not a valid value"),
    ("loss.pd_pairs: {range: [1.5, 4]}", "must hold integers"),
    ("loss.pd_weight: {range_around_preset: 0.5}", "number > 1"),
    ("loss.cbdm_tau: {choices: auto}", "only for model.tsa_resolutions"),
    ("model.tsa_resolutions: {choices: ['8', '32']}", "does not have"),
    ("loss.cbdm_tau: {range: [0.1, 2.0], choices: [1]}", "exactly one of"),
    ("loss.cbdm_tau: {rnage: [0.1, 2.0]}", "unknown key"),
    ("loss.cbdm_tau: 0.5", "expected a mapping"),
    ("", "expected a mapping of knob names"),
    ("loss.cbdm_tau: {range: [0.1, 2.0]\n", "not valid YAML"),
])
def test_bad_files_are_refused_naming_the_file_and_the_entry(tmp_path, text, says):
    path = _write(tmp_path, text)
    with pytest.raises(SpaceError) as err:
        space_file.load(path, preset("smoke"))
    assert says in str(err.value) and str(path) in str(err.value)
    knob = text.split(":", 1)[0].strip()
    if knob.startswith(("loss.", "model.", "eval.", "train.")) and "YAML" not in says:
        assert f"entry {knob!r}" in str(err.value)


def test_a_bad_space_file_stops_the_search_before_ray_or_mlflow(tmp_path, capsys):
    """Exit status 2, the file and the entry named, nothing written: the check runs before the tracking store
    or Ray is touched."""
    import ray

    from tune.search import main

    path = _write(tmp_path, "model.tsa_resolutions: {choices: ['8', '32']}\n")
    out = tmp_path / "out"
    assert main(["--preset", "smoke", "--space", str(path), "--out", str(out), "--name", "bad"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'model.tsa_resolutions'" in err and "does not have" in err
    assert not out.exists() and not ray.is_initialized()
    assert main(["--preset", "smoke", "--space", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert "cannot be read" in capsys.readouterr().err and not out.exists()


# -- start points -----------------------------------------------------------------------------------------------------
def test_the_default_file_runs_the_cbdm_baseline_right_after_the_preset():
    base = preset("digits")
    data = space_file.read_file(space_file.DEFAULT_SPACE)
    spec = space_file.resolve(data, base)
    (start,) = space_file.start_points(data, spec, "default")
    assert start == {"loss.label_dist": "cbdm", "loss.pd_weight": pytest.approx(base.loss.pd_weight / 10),
                     "model.tsa_resolutions": ""}  # `low`: the range's lower end
    points, outside = space_file.first_points(spec, base.flat(), [start])
    assert outside == [] and points[0] == _preset_point(base)
    assert points[1] == {**points[0], **start}
    # a knob pinned with --set is left out of the start point too; a start point equal to the preset's is dropped
    pinned = space_file.resolve(data, base, fixed=("loss.label_dist",))
    (kept,) = space_file.start_points(data, pinned, "default")
    assert "loss.label_dist" not in kept
    same = space_file.first_points(spec, base.flat(), [{"loss.cbdm_tau": base.loss.cbdm_tau}])[0]
    assert len(same) == 1


def test_the_searcher_proposes_the_preset_then_the_start_points_then_tpe(tmp_path):
    from tune.search import build_searcher, parse_args

    args = parse_args(["--preset", "smoke", "--out", str(tmp_path)])
    base = preset("smoke")
    data = space_file.read_file(space_file.DEFAULT_SPACE)
    spec = space_file.resolve(data, base)
    starts = space_file.start_points(data, spec, "default")
    searcher = build_searcher(args, base, "s", tmp_path / "optuna.db", 4, spec, starts=starts)
    first, second, third = (searcher.suggest(f"t{i}") for i in range(3))
    assert first == _preset_point(base)
    assert second["loss.label_dist"] == "cbdm" and second["model.tsa_resolutions"] == ""
    assert second["loss.pd_weight"] == pytest.approx(spec["loss.pd_weight"]["low"])
    assert set(third) == set(spec) and third not in (first, second)


@pytest.mark.parametrize("text, says", [
    ("start_points: {loss.cbdm_tau: 1.0}", "must be a list of mappings"),
    ("start_points:\n  - loss.label_dist: zipf", "start_points[0]: loss.label_dist = 'zipf' lies outside"),
    ("start_points:\n  - loss.cbdm_tau: 5.0", "range [0.1, 2.0]"),
    ("start_points:\n  - nope: 1", "'nope' is not a config field"),
])
def test_bad_start_points_are_refused_naming_the_point(tmp_path, text, says):
    path = _write(tmp_path, "loss.cbdm_tau: {range: [0.1, 2.0]}\nloss.label_dist: {choices: [cbdm, inverted]}\n"
                  + text + "\n")
    data = space_file.read_file(path)
    spec = space_file.resolve(data, preset("smoke"), source=str(path))
    with pytest.raises(SpaceError) as err:
        space_file.start_points(data, spec, str(path))
    assert says in str(err.value) and str(path) in str(err.value)


def test_tsa_choices_follow_the_size_the_data_are_served_at(tmp_path):
    """data.image_size=8: the small U-Net's levels are 8, 4, 2, so `auto` offers TSA below the 8x8 input, and
    16 (a level of the 16x16 net only) is refused, naming the levels."""
    cfg = apply_overrides(preset("digits"), {"data.image_size": 8, "model.tsa_resolutions": "4"})
    spec, _ = space_file.load_with_starts(space_file.DEFAULT_SPACE, cfg, [])
    assert spec["model.tsa_resolutions"]["choices"] == ["", "4", "2", "4,2"]
    bad = tmp_path / "bad.yaml"
    bad.write_text('model.tsa_resolutions: {choices: ["", "16"]}\n')
    with pytest.raises(SpaceError, match=r"levels: \[8, 4, 2\]"):
        space_file.load_with_starts(bad, cfg, [])
