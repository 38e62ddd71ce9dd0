"""docs/architecture.md stays true: every module it names exists and imports, every library module
is named there, and no module imports from a layer above its own."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def layers() -> dict[str, int]:
    """module name -> layer, from the table in docs/architecture.md (`a.py`, `b.py` shorthand included)."""
    found: dict[str, int] = {}
    for line in DOC.read_text().splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|(.*?)\|", line)
        if not row:
            continue
        folder = ""
        for path in re.findall(r"`([\w/]+\.py)`", row.group(2)):
            if "/" in path:
                folder = path.rsplit("/", 1)[0]
            else:
                path = f"{folder}/{path}"
            found[path[: -len(".py")].replace("/", ".")] = int(row.group(1))
    return found


def test_every_listed_module_imports() -> None:
    table = layers()
    assert len(table) > 30
    for name in table:
        importlib.import_module(name)


def test_every_library_module_is_listed() -> None:
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "slm_cli").rglob("*.py")
               if p.name != "__init__.py"}
    missing = modules - set(layers())
    assert not missing, f"modules missing from docs/architecture.md: {sorted(missing)}"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slm_cli"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("slm_cli"))
    return names


def test_no_import_runs_up_the_layers() -> None:
    table = layers()
    upward = []
    for module, layer in table.items():
        path = ROOT / (module.replace(".", "/") + ".py")
        for name in _imports(path):
            target = next((m for m in (name, name.rsplit(".", 1)[0]) if m in table), None)
            if target is not None and table[target] > layer:
                upward.append(f"{module} (layer {layer}) imports {target} (layer {table[target]})")
    assert not upward, "\n".join(upward)


def test_the_layer_check_can_fail(tmp_path: Path) -> None:
    """The parser sees an upward import (a module of layer 0 importing the top)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from slm_cli.__main__ import main\n")
    assert "slm_cli.__main__.main" in _imports(bad) and layers()["slm_cli.__main__"] > 0


def _package_graph(root: Path) -> dict[str, set[str]]:
    """module -> the slm_cli modules it imports, from every import statement in it (at the top, inside
    functions, under TYPE_CHECKING); a package's ``__init__.py`` is the package's own name."""
    modules = {}
    for path in (root / "slm_cli").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in modules.items():
        targets = (next((m for m in (name, name.rsplit(".", 1)[0]) if m in modules), None) for name in _imports(path))
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle: the strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    cycles = _cycles(_package_graph(ROOT))
    assert not cycles, "import circles in slm_cli:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_circle_check_can_fail(tmp_path: Path) -> None:
    """A circle through a function-level import and one through a TYPE_CHECKING import are found;
    a chain is not."""
    package = tmp_path / "slm_cli"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from slm_cli.b import g\n")
    (package / "b.py").write_text("from slm_cli import c\n")
    (package / "c.py").write_text("import slm_cli.a\n")
    (package / "data" / "x.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from slm_cli.data.y import Y\n")
    (package / "data" / "y.py").write_text("from slm_cli.data import x\n")
    (package / "data" / "z.py").write_text("from slm_cli.data.y import Y\n")
    assert _cycles(_package_graph(tmp_path)) == [["slm_cli.a", "slm_cli.b", "slm_cli.c"],
                                                 ["slm_cli.data.x", "slm_cli.data.y"]]


MAX_FUNCTION_LINES = 60


def long_functions(root: Path) -> list[str]:
    """Functions (and methods) of the modules under ``root`` longer than MAX_FUNCTION_LINES lines."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_is_longer_than_a_screen(tmp_path: Path) -> None:
    """Each part of the code can be read at once: no function in slm_cli over 60 lines (the check
    itself sees a long one)."""
    assert not long_functions(ROOT / "slm_cli"), "\n".join(long_functions(ROOT / "slm_cli"))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert long_functions(tmp_path / "pkg") == [f"pkg/m.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]
