"""The docstring examples of the public API run in a fresh interpreter.

``pytest --doctest-modules`` runs each example with its module's globals, so an example that uses
``torch``, ``np`` or the documented function without importing it passes there and fails with a
NameError for a user who pastes it into Python. Here every example of every public object (module
docstrings, functions, classes and their methods and properties whose names do not start with
``_``) of every module under ``bayesprune/`` and of ``bayesprune.models`` (the repository's
``models/``, installed inside the package) runs with empty globals, under the doctest option
flags pytest is configured with (``doctest_optionflags``); ``# doctest: +SKIP`` still skips.
"""

from __future__ import annotations

import doctest
import importlib
import io
import sys
from pathlib import Path

import pytest

import bayesprune
import bayesprune.models

PACKAGE_DIR = Path(bayesprune.__file__).parent
# `bayesprune.models` is the repository's top-level `models/` folder (`package-dir` in
# pyproject.toml): in an editable install it is not under PACKAGE_DIR, so it is walked on its own.
ROOTS = {"bayesprune": PACKAGE_DIR, "bayesprune.models": Path(bayesprune.models.__file__).parent}


def _module_names() -> list[str]:
    """``bayesprune`` and its public submodules (every ``.py`` file under each of ``ROOTS``)."""
    names = set()
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = (prefix, *path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(p.startswith("_") for p in parts):
                continue  # a private module
            names.add(".".join(parts))
    return sorted(names)


def _public_examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(recurse=True, exclude_empty=True)
    tests = []
    for modname in _module_names():
        module = importlib.import_module(modname)
        for test in finder.find(module, modname, globs={}):
            # the names below the module: functions, classes, their methods and properties
            inner = test.name[len(modname) :].split(".")[1:]
            if test.examples and not any(n.startswith("_") for n in inner):
                tests.append(test)
    return sorted(tests, key=lambda t: t.name)


EXAMPLES = _public_examples()


def test_examples_found() -> None:
    """The collection itself works: the package documents its API with examples."""
    names = {t.name for t in EXAMPLES}
    assert len(EXAMPLES) > 50
    assert {
        "bayesprune",
        "bayesprune.pruning.api.prune_module",
        "bayesprune.priors.spike_slab.SpikeAndSlab",
        "bayesprune.models.get_model",
    } <= names


def _optionflags(config: pytest.Config) -> int:
    flags = 0
    for name in config.getini("doctest_optionflags"):
        if name not in doctest.OPTIONFLAGS_BY_NAME:
            raise ValueError(f"doctest_optionflags: {name} is not a standard doctest flag")
        flags |= doctest.OPTIONFLAGS_BY_NAME[name]
    return flags


@pytest.mark.parametrize("test", EXAMPLES, ids=[t.name for t in EXAMPLES])
def test_example_runs_with_empty_globals(
    test: doctest.DocTest,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if all(ex.options.get(doctest.SKIP) for ex in test.examples):
        pytest.skip("all examples are marked # doctest: +SKIP")
    monkeypatch.chdir(tmp_path)  # examples that write a relative path write it here
    test.globs = {}  # nothing but what the example imports itself
    runner = doctest.DocTestRunner(optionflags=_optionflags(request.config))
    report = io.StringIO()
    try:
        result = runner.run(test, out=report.write)
    finally:
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
    if result.failed:
        pytest.fail(
            f"{result.failed} of {result.attempted} examples of {test.name} fail in a fresh "
            f"interpreter (empty globals):\n{report.getvalue()}",
            pytrace=False,
        )
