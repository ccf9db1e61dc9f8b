"""The package's import structure: no cycles between modules, and no private names imported from
another module (shared helpers live in private modules of their own, such as ``_utils.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import bayesprune

PACKAGE = Path(bayesprune.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(module imported from, imported name, line) of every ``from ... import`` of the package,
    at any depth, except those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in skip:
            continue
        if node.level:
            base = package[: len(package) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source.split(".")[0] == "bayesprune":
            found += [(source, alias.name, node.lineno) for alias in node.names]
    return found


def test_no_private_names_are_imported_across_modules() -> None:
    bad = [
        f"{name}:{line}: from {source} import {imported}"
        for name, path in _modules().items()
        for source, imported, line in _imports(name, path)
        if imported.startswith("_")
        and imported != "__version__"
        and not source.split(".")[-1].startswith("_")  # a private module is the shared place
    ]
    assert not bad, "\n".join(bad)


def test_the_module_graph_has_no_cycles() -> None:
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for source, imported, _ in _imports(name, path):
            target = f"{source}.{imported}" if f"{source}.{imported}" in modules else source
            # a package's __init__ only re-exports: an edge into it is an edge into its modules
            if target in modules and target != name and modules[target].name != "__init__.py":
                edges[name].add(target)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_check_finds_a_cycle_and_a_private_import(tmp_path) -> None:
    # the two checks above can fail: they see function-level imports and relative imports
    pkg = tmp_path / "bayesprune"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from .a import f\nfrom .a import _hidden\n")
    a = _imports("bayesprune.a", pkg / "a.py")
    b = _imports("bayesprune.b", pkg / "b.py")
    assert ("bayesprune.b", "g", 2) in a and ("bayesprune.a", "_hidden", 2) in b
