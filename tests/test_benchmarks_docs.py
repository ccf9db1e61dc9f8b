"""Results as data: ``benchmarks/README.md`` is short, generated from ``benchmarks/results/``, and
the package's docstrings link to it instead of quoting commits.

Fast (no torch import): ``benchmarks/tables.py`` uses the standard library only.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
README = BENCH / "README.md"
RESULTS = BENCH / "results"
MAX_LINES = 160


def _sections(text: str) -> dict[str, str]:
    """Table name -> the text of its section (from its ``## `` heading to its closing marker)."""
    out = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        for name in re.findall(r"<!-- table:([\w-]+) -->", section):
            out[name] = section
    return out


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"{README} has {len(lines)} lines (at most {MAX_LINES})"


def test_the_old_results_page_is_gone() -> None:
    assert not (BENCH / "RESULTS.md").exists(), "history lives in git and docs/notes/"


def test_every_table_has_its_commands() -> None:
    """Each table: one generated block, the command that regenerates it from the JSON, and the
    command of the benchmark script that measures it."""
    text = README.read_text()
    sections = _sections(text)
    assert sections, "no <!-- table:NAME --> markers in benchmarks/README.md"
    for name, section in sections.items():
        assert text.count(f"<!-- table:{name} -->") == 1, name
        assert text.count(f"<!-- /table:{name} -->") == 1, name
        assert f"python benchmarks/tables.py --write {name}`" in section, name
        scripts = set(re.findall(r"python (benchmarks/\w+\.py)", section)) - {
            "benchmarks/tables.py"
        }
        assert scripts, f"section {name}: no command of a benchmark script"
        assert all((ROOT / s).exists() for s in scripts), (name, scripts)


def test_tables_match_the_json() -> None:
    """``python benchmarks/tables.py --check``: every table is what its JSON renders."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "tables.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _strict(name: str):
    raise ValueError(f"{name} is not JSON")


def test_every_results_file_is_json() -> None:
    files = sorted(RESULTS.rglob("*.json"))
    assert files
    for path in files:
        payload = json.loads(path.read_text(), parse_constant=_strict)
        assert isinstance(payload, dict), path
        source = payload.get("source")
        if source is not None:  # numbers transcribed from the old page say from where
            assert re.match(
                r"transcribed from benchmarks/RESULTS\.md at commit [0-9a-f]{7,40}\b", source
            ), (path, source)
            assert "produced by" in source, (path, source)


def _docstrings(path: Path):
    """(line, text) of every docstring of a Python file."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                yield body[0].value.lineno, body[0].value.value


# a 7-40 hex-digit word with a digit in it, at most a few characters from the word "commit"
_HASH = r"\b(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b"
COMMIT = re.compile(rf"commit\W{{0,4}}{_HASH}|{_HASH}\W{{0,4}}commit", re.I)


def test_no_commit_hashes_in_package_docstrings() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line + doc.count(chr(10), 0, m.start())}: {m.group(0)}"
        for path in sorted((ROOT / "bayesprune").rglob("*.py"))
        for line, doc in _docstrings(path)
        for m in COMMIT.finditer(doc)
    ]
    assert not found, "docstrings link to tables, they do not quote commits:\n" + "\n".join(found)


def test_nothing_points_to_the_old_results_page() -> None:
    paths = [
        *(ROOT / "bayesprune").rglob("*.py"),
        *(ROOT / "tutorials").glob("*.py"),
        *(p for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name),
        *(ROOT / "docs").glob("*.md"),
        ROOT / "README.md",
        ROOT / "ARCHITECTURE.md",
    ]
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in paths
        if p.exists()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "RESULTS.md" in line
    ]
    assert not found, "these still name benchmarks/RESULTS.md:\n" + "\n".join(found)
