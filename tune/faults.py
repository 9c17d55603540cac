"""Faults injected by the reliability tests (tests/test_reliability.py, tests/test_fault_records.py), nowhere else.

``PDCBDM_FAULTS`` lists faults as ``KIND@WHEN`` (comma-separated) and ``PDCBDM_FAULT_DIR`` names a folder; each
fault fires once (a marker file created exclusively in that folder, so that concurrent trials or a resumed
search cannot take it twice). Without both variables nothing fires.

- ``nan@N``: the first trial whose rank 0 reaches step N gets NaN weights (a real divergence, which the trainer
  catches); ``kill@N``: the first to reach step N exits its worker process (a crash Ray Train recovers from);
  ``hold@N``: every trial's rank 0 waits at step N until the test creates ``release`` in the folder (so that a
  test acts before any trial passes step N, however fast the machine; at most ``HOLD_LIMIT_S``).
- ``die@fail``, ``die@pruned``, ``die@complete`` (Optuna's states): the driver kills itself (SIGKILL) right after
  the searcher told Optuna the first such end of a trial, before Tune saves its experiment state: the window in
  which Optuna and Tune's saved state disagree (``tune.verdicts``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAULTS_ENV, FAULT_DIR_ENV = "PDCBDM_FAULTS", "PDCBDM_FAULT_DIR"
RELEASE = "release"
HOLD_LIMIT_S = 300.0


def armed(kind: str) -> list[str]:
    """The WHEN parts of the armed faults of ``kind`` (none without both variables)."""
    spec, folder = os.environ.get(FAULTS_ENV), os.environ.get(FAULT_DIR_ENV)
    if not spec or not folder:
        return []
    return [when for k, _, when in (item.strip().partition("@") for item in spec.split(",")) if k == kind]


def take(kind: str, when: str) -> bool:
    """True the first time the fault ``kind@when`` is taken (its marker file created), False after that."""
    try:
        os.close(os.open(Path(os.environ[FAULT_DIR_ENV]) / f"{kind}@{when}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def driver_dies_after(state: str) -> None:
    """``die@STATE``: SIGKILL this process (the search's driver) once, after Optuna was told ``state``."""
    when = state.lower()
    if when in armed("die") and take("die", when):
        os.kill(os.getpid(), signal.SIGKILL)


def hold_at(step: int) -> None:
    """``hold@N``: wait at step N until ``release`` exists in the fault folder (every trial; not a one-off)."""
    if str(step) not in armed("hold"):
        return
    release, deadline = Path(os.environ[FAULT_DIR_ENV]) / RELEASE, time.monotonic() + HOLD_LIMIT_S
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
