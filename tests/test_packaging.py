"""Project hygiene: pyproject and environment.yml agree; the model library stays free of the platform."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    text = (ROOT / "environment.yml").read_text()
    assert "python=3.11" in text
    pip_section = text.split("- pip:", 1)[1].splitlines()
    pip_items = {_norm(l.strip()[2:]) for l in pip_section if l.strip().startswith("- ") and "-e ." not in l}
    assert pip_items == wanted, f"only in environment.yml: {pip_items - wanted}; only in pyproject: {wanted - pip_items}"


def test_lock_file_pins_the_required_stack():
    lock = (ROOT / "constraints.txt").read_text()
    for pin in ("torch==2.14.1", "torchvision==0.29.1", "ray==2.60."):
        assert pin in lock


def test_model_library_never_imports_the_platform():
    offenders = []
    for path in (ROOT / "pdcbdm").rglob("*.py"):
        for line in path.read_text().splitlines():
            if re.match(r"\s*(import|from)\s+(ray|mlflow|optuna)\b", line):
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, offenders
