"""Warm start (``--warm-start SEARCH_DIR``): the finished trials of earlier searches enter a new search's Optuna
study before its first trial is proposed, so that TPE starts from what they learnt.

Which trials are copied, from each earlier search's own study (search.json gives its storage and name):

* COMPLETE trials, with their values, and PRUNED ones (ASHA-stopped, or cut by a time budget), with their
  intermediate values (proxy FIDs keyed by training step): Optuna's TPE uses pruned trials too, ranking them after
  the completed ones by how far they got and their last value, and counts them towards its random start-up.
  FAIL, RUNNING and WAITING trials are skipped.
* Only trials that search ran itself: trials it had copied from another search are skipped (pass that search's
  folder too), so that no trial enters twice.
* A trial is compatible when every knob the new search searches is among its params, with a value inside the new
  distribution, and every other param it has equals the new search's fixed value of that field (a trial of a
  different configuration would lie about the new space); the others are skipped and counted by reason.

Copied trials carry the user attribute ``WARM_START_ATTR`` (the source folder) and no ``tune_trial_id``: they are
no Tune trials, so they are not counted towards ``--trials``, never appear in trials.parquet, and the report's
Optuna figures leave them out. TPE counts them towards ``n_startup_trials`` (Optuna 5 counts every COMPLETE and
PRUNED trial of the study), so a study warm-started with at least that many trials proposes with TPE from its
first sampled trial on (the preset's point, enqueued, still comes first).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna

from tune.search_folder import read_search_json
from tune.space_file import contains

WARM_START_ATTR = "pdcbdm.warm_start"  # the folder of the search a copied trial comes from
SOURCE_TRIAL_ATTR = "pdcbdm.warm_start_trial"  # its number in that search's study
# fields that decide what a trial's scores are measured against: trials scored otherwise are never ranked together
SCORING_FIELDS = ("eval.reference", "eval.extractor", "eval.inception_weights", "eval.judge")
SAVED_KEYS = ("name", "optuna_storage", "search_dir", "space", "config")  # the search.json entries a warm start reads


class WarmStartError(ValueError):
    """A --warm-start folder that cannot be used; the message names it."""


@dataclass
class WarmStart:
    """The trials copied from one earlier search, and what was skipped (reason -> count)."""

    source: Path
    trials: list[Any] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    differs: list[str] = field(default_factory=list)  # fixed fields whose value differs between the two searches

    def summary(self) -> str:
        """``warm start: 5 trials from searches/X (2 skipped: 1 failed, 1 outside the space)``"""
        text = f"warm start: {len(self.trials)} trial(s) from {self.source}"
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            text += f" ({sum(self.skipped.values())} skipped: {reasons})"
        if self.differs:
            text += (f"; note: its base config differs in {', '.join(self.differs[:5])}"
                     f"{' and more' if len(self.differs) > 5 else ''} (its values are taken as they are)")
        return text


def source_study(folder: Path, open_storage: Callable[[str], Any]) -> tuple[Any, dict]:
    """The Optuna study of the search in ``folder`` and its search.json, refused with a message naming the folder
    when it is no search or its study cannot be read."""
    meta = read_search_json(folder, "--warm-start", WarmStartError, SAVED_KEYS)
    name, location = meta["name"], meta["optuna_storage"]
    if location == f"sqlite:///{Path(meta['search_dir']) / 'optuna.db'}":
        location = f"sqlite:///{folder / 'optuna.db'}"  # the default study lives in the folder, wherever it is now
    if location.startswith("sqlite:///") and not Path(location[len("sqlite:///"):]).is_file():
        raise WarmStartError(f"--warm-start {folder}: its Optuna study {location} does not exist")
    try:
        return optuna.load_study(study_name=name, storage=open_storage(location)), meta
    except Exception as exc:  # noqa: BLE001 - KeyError (no such study), SQLAlchemy and journal errors
        raise WarmStartError(f"--warm-start {folder}: cannot read its Optuna study {name!r} at {location} "
                             f"({type(exc).__name__}: {exc})") from None


def load(folder: str | Path, dists: Mapping[str, Any], directions: Sequence[str], fixed: Mapping[str, Any],
         open_storage: Callable[[str], Any]) -> WarmStart:
    """The trials of the search in ``folder`` that fit a new search: its space's ``dists`` (knob -> Optuna
    distribution), its study ``directions`` ("minimize" per objective) and ``fixed`` (its base config, flat)."""
    folder = Path(folder).resolve()
    study, meta = source_study(folder, open_storage)
    theirs = [d.name.lower() for d in study.directions]
    if theirs != [d.lower() for d in directions]:
        raise WarmStartError(f"--warm-start {folder}: its study optimises {len(theirs)} objective(s) "
                             f"({', '.join(theirs)}), this search {len(directions)} ({', '.join(directions)}); "
                             f"warm-start a --multi-objective search only from --multi-objective searches")
    out = WarmStart(folder, differs=config_differences(meta, fixed, dists))
    scored = [k for k in out.differs if k in SCORING_FIELDS]
    if scored:
        raise WarmStartError(f"--warm-start {folder}: its trials were scored differently ({', '.join(scored)} "
                             f"differ), so their FIDs are on another scale; warm-start only from searches that "
                             f"score as this one does")
    for trial in study.get_trials(deepcopy=False):
        why = skip_reason(trial, dists, fixed)
        if why:
            out.skipped[why] += 1
        else:
            out.trials.append(copy_trial(trial, dists, folder))
    return out


def config_differences(meta: Mapping[str, Any], fixed: Mapping[str, Any], dists: Mapping[str, Any]) -> list[str]:
    """The fields searched by neither search whose value differs between the earlier search's base config (its
    search.json) and this one's (a different budget or evaluation puts its values on another scale); the fields
    it searched are checked per trial (``skip_reason``)."""
    flat = {f"{s}.{k}": v for s, sec in meta["config"].items() for k, v in sec.items()}
    searched = set(meta["space"]["knobs"])
    return [k for k in fixed if k in flat and k not in dists and k not in searched and not _same(flat[k], fixed[k])]


def skip_reason(trial: Any, dists: Mapping[str, Any], fixed: Mapping[str, Any]) -> str | None:
    """Why a trial of an earlier search cannot enter the new study (None when it can)."""
    state = trial.state.name
    if state not in ("COMPLETE", "PRUNED"):
        return {"FAIL": "failed", "RUNNING": "unfinished", "WAITING": "unfinished"}.get(state, state.lower())
    if WARM_START_ATTR in trial.user_attrs:
        return "copied there from another search"
    missing = [k for k in dists if k not in trial.params]
    if missing:
        return f"without {missing[0]}"
    if any(not contains(dists[k], trial.params[k]) for k in dists):
        return "outside the space"
    extra = [k for k in trial.params if k not in dists]
    if any(k not in fixed or not _same(trial.params[k], fixed[k]) for k in extra):
        return "with a value of a knob fixed here"
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


def copy_trial(trial: Any, dists: Mapping[str, Any], source: Path) -> Any:
    """The trial as a new FrozenTrial over the new space's distributions (TPE reads every trial's params through
    the current distribution), labelled with its source; pruned ones keep their intermediate values."""
    params = {k: trial.params[k] for k in dists}
    attrs = {WARM_START_ATTR: str(source), SOURCE_TRIAL_ATTR: trial.number}
    return optuna.trial.create_trial(
        state=trial.state, values=trial.values if trial.state.name == "COMPLETE" else None, params=params,
        distributions=dict(dists), user_attrs=attrs, intermediate_values=dict(trial.intermediate_values))


def own_trials(study: Any) -> list[Any]:
    """The study's trials that this search ran (not copied by a warm start)."""
    return [t for t in study.get_trials(deepcopy=False) if WARM_START_ATTR not in t.user_attrs]
