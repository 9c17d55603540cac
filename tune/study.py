"""The search's Optuna study: where it lives (--optuna-storage, else PDCBDM_OPTUNA_STORAGE, else sqlite in the
search folder), its storage opened with the URL's secrets masked, a new search's name checked free in a storage
shared between searches, a --resume's storage taken back where search.json keeps it masked, the verdicts a
resume honours, and the study brought in line with Tune's final states (``reconcile``). A grid (tune/grid.py) has no
study.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from tune import tracking, verdicts
from tune.redact import OPTUNA_STORAGE_ENV, is_redacted, redact_text, redact_url, remember, reveal
from tune.runner import SearchError, SearchPlan


class MaskedRDBStorage(RDBStorage):
    """Optuna's RDB storage whose pickled form holds its URL with the password masked (``tune.redact``): Tune
    pickles the searcher, and the study's storage with it, into searcher-state-*.pkl and tuner.pkl in the search
    folder. Unpickled (a --resume restores the searcher in the driver), it takes the real URL back from this
    process: the URL the search was given (``tune.redact.remember``) or PDCBDM_OPTUNA_STORAGE."""

    def __getstate__(self) -> dict[Any, Any]:
        return {**super().__getstate__(), "url": redact_url(self.url)}

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__({**state, "url": reveal(state["url"], (OPTUNA_STORAGE_ENV,))})


def study_location(spec: str | None, search_dir: Path) -> str:
    """The Optuna storage: an RDB URL (a relative sqlite path made absolute), a journal file path (absolute), or
    by default sqlite in the search folder."""
    if not spec:
        return f"sqlite:///{search_dir / 'optuna.db'}"
    if "://" in spec:
        return tracking.absolute_uri(spec)
    return str(Path(spec).resolve())


def optuna_storage(spec: str | Path) -> Any:
    """Optuna's storage for a location: an RDB URL (``sqlite:///``, ``postgresql://``, ...), or a journal file
    (any other path; Optuna's file journal, safe on shared storage; a ``.db`` path is a sqlite file). An RDB
    storage pickles with its URL masked (``MaskedRDBStorage``); a masked ``spec`` (an earlier
    search's search.json, a --warm-start) is taken back from what this process was given or
    PDCBDM_OPTUNA_STORAGE."""
    spec = reveal(str(spec), (OPTUNA_STORAGE_ENV,))
    if is_redacted(spec):
        raise SearchError(f"the Optuna storage {spec} is recorded without its password; give the URL in the "
                          f"{OPTUNA_STORAGE_ENV} environment variable")
    if "://" in spec:
        return MaskedRDBStorage(spec)
    if spec.endswith(".db"):
        return MaskedRDBStorage(f"sqlite:///{Path(spec).resolve()}")
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(spec))


def load_study(p: SearchPlan) -> Any:
    """The search's Optuna study."""
    return optuna.load_study(study_name=p.name, storage=optuna_storage(p.optuna_storage))


def check_study_name_free(location: str, name: str, shared: bool) -> None:
    """A new search's Optuna study must not exist yet: in a storage shared between searches (--optuna-storage,
    PDCBDM_OPTUNA_STORAGE) a second search of the same name would otherwise continue the first one's study. The
    default storage lives in the search's own folder, which search.json already guards."""
    if not shared:
        return
    try:
        names = optuna.study.get_all_study_names(storage=optuna_storage(location))
    except SearchError:
        raise
    except Exception as exc:  # noqa: BLE001 - a driver's or a file's error: the storage is unusable
        raise SearchError(f"--optuna-storage {redact_url(location)}: cannot be opened ({redact_text(str(exc))[:200]})"
                          ) from None
    if name in names:
        raise SearchError(f"the Optuna storage {redact_url(location)} already holds a study named {name!r} (another "
                          f"search's); choose another --name, or --resume that search")


def resumed_study_location(saved: str, given: str | None, folder: Path) -> str:
    """The Optuna storage of a --resume: search.json's (``saved``); where search.json keeps the URL masked, the
    real one from this command's --optuna-storage or PDCBDM_OPTUNA_STORAGE, whichever masks to it (same scheme,
    host and database), remembered for the searcher Tune unpickles (``MaskedRDBStorage``). A
    --optuna-storage naming another storage, or a masked URL given neither way, is a SearchError."""
    given = study_location(given, folder) if given else None
    if given and redact_url(given) != saved:
        raise SearchError(f"--optuna-storage {redact_url(given)} is not the Optuna storage of the search in {folder} "
                          f"({saved}); give that one, or leave the flag out")
    if not is_redacted(saved):
        return saved
    env = os.environ.get(OPTUNA_STORAGE_ENV)
    for candidate in (given, study_location(env, folder) if env else None):
        if candidate and redact_url(candidate) == saved:
            return remember(candidate)
    raise SearchError(f"--resume {folder}: search.json keeps the Optuna storage URL without its password ({saved}); "
                      f"give it again with --optuna-storage URL or the {OPTUNA_STORAGE_ENV} environment variable")


def study_verdicts(p: SearchPlan) -> dict[str, Any]:
    """A resume's Optuna verdicts (``tune.verdicts``) by Tune trial id, for ``tune.runner.trial_settings``; none
    for a plan without a study (a grid) or when the study was never created (a search killed before its first
    trial)."""
    if not p.optuna_storage:
        return {}
    try:
        study = load_study(p)
    except KeyError:
        return {}
    return verdicts.from_study(study)


def reconcile(study: Any, outcomes: dict[str, tuple[str, list[float] | None]]) -> list[int]:
    """Bring the study in line with Tune's final states after a resumed search: ``outcomes`` maps a Tune trial id
    to (status, values) with status ``completed``, ``stopped`` or ``failed``; an Optuna trial of one of them still
    RUNNING (its end was never told: the driver died between Tune's end of the trial and the searcher's save) is
    told COMPLETE (values), PRUNED or FAIL. Returns the numbers of the trials told."""
    state = {"completed": TrialState.COMPLETE, "stopped": TrialState.PRUNED, "failed": TrialState.FAIL}
    told = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        status, values = outcomes.get(t.user_attrs.get(verdicts.TUNE_TRIAL_ATTR), (None, None))
        if status is None:
            continue
        if status == "completed" and not values:
            status = "failed"
        study.tell(t.number, values if status == "completed" else None, state=state[status])
        told.append(t.number)
    return told
