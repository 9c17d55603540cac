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


# ---------------------------------------------------------------- the CUDA 12.6 override of the lock file

CU126_FILE = "constraints-cu126.txt"
CU126_INDEX = "https://download.pytorch.org/whl/cu126"
CU126_INSTALL = f"pip install -c {CU126_FILE} --extra-index-url {CU126_INDEX} -e '.[dev]'"
CU126_HEADER = f"""\
# constraints.txt for a torch built for CUDA 12.6, for machines whose NVIDIA driver is 525 or newer but older than 580
# (the pinned torch is built for CUDA 13: README, "NVIDIA driver and CUDA"). In a fresh virtual environment:
#   {CU126_INSTALL}
# The same stack as constraints.txt, torch and torchvision at the same versions with PyTorch's +cu126 label; the
# CUDA 13 lines (cuda-*, nvidia-* but nvidia-ml-py, triton) are left out: the cu126 torch wheel names its own CUDA 12
# libraries (exact versions) and triton. tests/test_packaging.py checks that this file is that derivation of
# constraints.txt.
"""
_CUDA_LABELLED = ("torch", "torchvision")


def _pin_name(line: str) -> str:
    """The normalised project name of a ``name==version`` line (PEP 503: lower case, runs of -_. as -)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>~!;\[ ]", line, maxsplit=1)[0]).lower()


def _is_cuda13(name: str) -> bool:
    """The pins that belong to the CUDA 13 build of torch (its runtime libraries and triton); nvidia-ml-py is NVML's
    binding, which works with any driver, so it stays."""
    return name == "triton" or name.startswith("cuda-") or (name.startswith("nvidia-") and name != "nvidia-ml-py")


def cu126_constraints(lock: str) -> str:
    """constraints-cu126.txt as it derives from the lock file's text: every pin but the CUDA 13 ones, torch and
    torchvision with the +cu126 label, under CU126_HEADER."""
    pins = [line for line in lock.splitlines() if line.strip() and not line.startswith("#")]
    kept = [f"{line}+cu126" if _pin_name(line) in _CUDA_LABELLED else line
            for line in pins if not _is_cuda13(_pin_name(line))]
    return CU126_HEADER + "\n".join(kept) + "\n"


def _pins(text: str) -> dict[str, str]:
    return {_pin_name(line): line.split("==", 1)[1] for line in text.splitlines()
            if line.strip() and not line.startswith("#")}


def test_the_cu126_override_is_the_lock_file_with_a_cuda_12_torch():
    lock = (ROOT / "constraints.txt").read_text()
    assert (ROOT / CU126_FILE).read_text() == cu126_constraints(lock), \
        f"{CU126_FILE} no longer derives from constraints.txt: regenerate it (.venv/bin/python -m tests.test_packaging)"


def test_the_cu126_override_names_the_pinned_torch_and_torchvision():
    """Same versions, PyTorch's local label only: pyproject's ``torch==2.14.1`` admits ``2.14.1+cu126`` (PEP 440),
    so ``-e .`` keeps the CUDA 12 build, and every other package is pinned to the lock file's version."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    lock, cu126 = _pins((ROOT / "constraints.txt").read_text()), _pins((ROOT / CU126_FILE).read_text())
    deps = {_pin_name(r): Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())
            ["project"]["dependencies"]}
    for name in _CUDA_LABELLED:
        version = Version(cu126[name])
        assert version.local == "cu126" and version.public == lock[name]
        assert deps[name].specifier.contains(version) and deps[name].specifier.contains(Version(lock[name]))
    assert {k: v for k, v in cu126.items() if k not in _CUDA_LABELLED} == \
        {k: v for k, v in lock.items() if k not in _CUDA_LABELLED and not _is_cuda13(k)}
    assert not [k for k in cu126 if _is_cuda13(k)] and cu126["nvidia-ml-py"] == lock["nvidia-ml-py"]


def test_the_readme_installs_the_override_as_its_header_says():
    readme = (ROOT / "README.md").read_text()
    assert CU126_INSTALL in readme and CU126_INDEX in readme


def test_nvml_is_in_the_stack_for_mlflows_gpu_metrics():
    """MLflow's system-metrics monitor logs GPU utilisation and memory only when ``pynvml`` (nvidia-ml-py) imports."""
    deps = {_pin_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert "nvidia-ml-py" in deps and "nvidia-ml-py" in _pins((ROOT / "constraints.txt").read_text())


if __name__ == "__main__":  # regenerate the override after constraints.txt changed
    (ROOT / CU126_FILE).write_text(cu126_constraints((ROOT / "constraints.txt").read_text()))
