"""The documentation stays true: every relative link in README.md and docs/ resolves, and every command its code
blocks give names a module that runs and flags that module's ``--help`` lists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
BLOCK = re.compile(r"```(?:bash|sh|console)?\n(.*?)```", re.S)
COMMAND = re.compile(r"python3?\s+(?:-m\s+([\w.]+)|(tune/search\.py))((?:[^\n\\]|\\\n)*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to hyphens)."""
    heads = re.findall(r"^#+\s+(.*)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def _links() -> list[tuple[Path, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        out += [(doc, target) for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]
    return out


@pytest.mark.parametrize("doc,target", _links(), ids=lambda v: str(v)[-40:])
def test_every_relative_link_resolves(doc, target):
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    assert file.exists(), f"{doc.name}: link to {target} names no file"
    assert ROOT in file.parents or file == ROOT, f"{doc.name}: {target} points outside the repository"
    if anchor and file.suffix == ".md":
        assert anchor in _anchors(file.read_text()), f"{doc.name}: no heading for #{anchor} in {file.name}"


def _commands() -> dict[str, set[str]]:
    """Each module the docs run (``python -m M`` or ``python tune/search.py``) and the flags given to it."""
    found: dict[str, set[str]] = {}
    for doc in DOCS:
        for block in BLOCK.findall(doc.read_text()):
            for module, script, rest in COMMAND.findall(block):
                name = module or script
                found.setdefault(name, set()).update(FLAG.findall(rest.split("#")[0]))
    return found


_HELP = """
import runpy, sys
name = sys.argv[1]
sys.argv = [name, "--help"]
try:
    if name.endswith(".py"):
        runpy.run_path(name, run_name="__main__")
    else:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    sys.exit(exc.code)
"""


def test_every_documented_command_runs_and_takes_the_flags_it_is_shown_with():
    commands = _commands()
    assert {"tune/search.py", "pipelines.prepare_data", "pipelines.confirm"} <= set(commands)
    for name, flags in sorted(commands.items()):
        if name in ("pip", "venv"):
            continue
        proc = subprocess.run([sys.executable, "-c", _HELP, name], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"python {'-m ' * (not name.endswith('.py'))}{name} --help: {proc.stderr[-800:]}"
        unknown = sorted(f for f in flags if f not in proc.stdout and f != "--help")
        assert not unknown, f"the docs give {name} flags its --help does not list: {unknown}"


CITATION = re.compile(r"docs/([\w-]+\.md),\s+\"([^\"]+)\"")


def _citations() -> list[tuple[str, str, str]]:
    """Every ``docs/NAME.md, "Heading"`` a docstring or comment of the code cites (one per line it starts on)."""
    out = []
    for package in ("pdcbdm", "tune", "pipelines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = re.sub(r"\n\s*(#\s*)?", " ", path.read_text())  # a citation may wrap over lines
            out += [(str(path.relative_to(ROOT)), doc, heading) for doc, heading in CITATION.findall(text)]
    return out


def test_every_section_the_code_cites_exists():
    headings = {doc.name: {line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")}
                for doc in DOCS}
    cited = _citations()
    missing = [f"{where}: docs/{doc}, \"{heading}\"" for where, doc, heading in cited
               if heading not in headings.get(doc, set())]
    assert cited and not missing, "citations of sections that do not exist:\n" + "\n".join(missing)
