"""The shape of the code base, as docs/development.md states it: no module over 600 lines, no import circle among
the project's modules, the library free of the platform's packages, and every import inside a function marked with
why it is there (``# deferred: REASON`` on the import or on the comment line right above a block of them), so that a
reader sees a module's neighbours at its top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pdcbdm", "tune", "pipelines", "tests")
MAX_LINES = 600
MARK = "# deferred:"
PLATFORM = ("ray", "mlflow", "optuna")


def _modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name (a package by its ``__init__``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _top_imports(tree: ast.Module):
    """Imports a module runs when it is imported: at its top level and under top-level ``if``/``try`` (not those
    only a type checker reads, not those inside functions or classes' methods)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)) and not _type_checking(node):
            stack.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)


def _targets(name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The project modules ``node`` (in module ``name``) imports: the most specific module each name resolves to."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    base = node.module or ""
    if node.level:
        here = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
        here = here[:len(here) - node.level + 1]
        base = ".".join([*here, base] if base else here)
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.add(sub if sub in MODULES else base)
    return {t for t in out if t in MODULES}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = set().union(*(_targets(name, n) for n in _top_imports(tree))) - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                part = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    part.append(member)
                    if member == node:
                        break
                if len(part) > 1:
                    out.append(sorted(part))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return out


def test_no_module_is_over_600_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_circle():
    circles = _circles(_graph())
    assert not circles, f"import circles: {circles}"


def test_the_circle_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_the_library_never_imports_the_platform():
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("pdcbdm"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in PLATFORM]
    assert not bad, bad


def _unmarked(path: Path) -> list[str]:
    """The imports inside functions of ``path`` without a ``# deferred:`` reason on their line or on the comment
    line right above their block of consecutive imports."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    inside = {node.lineno: node for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    out = []
    for node in (inside[k] for k in sorted(inside)):
        row = node.lineno - 1
        if any(MARK in lines[i] for i in range(row, node.end_lineno)):
            continue
        above = row - 1
        while above >= 0 and lines[above].strip().startswith(("import ", "from ")):
            above -= 1
        if above >= 0 and lines[above].strip().startswith(MARK):
            continue
        out.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[row].strip()}")
    return out


@pytest.mark.parametrize("package", PACKAGES[:3])
def test_every_import_inside_a_function_says_why(package):
    unmarked = [hit for name, path in MODULES.items() if name.split(".")[0] == package for hit in _unmarked(path)]
    assert not unmarked, f"{len(unmarked)} imports inside functions without '{MARK} REASON':\n" + "\n".join(unmarked)
