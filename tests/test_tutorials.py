"""Every tutorial runs top to bottom on its small default settings.

The tutorials are jupytext percent-format ``.py`` files, so they run as plain scripts. They are
executed in-process with :mod:`runpy` (one interpreter: torch and Pyro are imported once) in a
temporary working directory, headless (Agg), with ``BAYESPRUNE_TUTORIAL_FULL`` unset.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
# Tutorials on Fashion-MNIST need the Debian dataset package; the digits ones do not.
FMNIST = {"01_quickstart.py", "02_priors.py", "03_guarantees.py", "04_your_own_network.py",
          "05_baselines.py"}  # fmt: skip


def _tutorials() -> list[Path]:
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))


def test_tutorials_are_present_and_jupytext_percent():
    names = [p.name for p in _tutorials()]
    assert [n[:2] for n in names] == ["01", "02", "03", "04", "05", "06"][: len(names)]
    for p in _tutorials():
        text = p.read_text()
        assert "format_name: percent" in text, p.name
        assert text.count("# %%") >= 4, p.name


def test_tutorials_open_as_notebooks():
    jupytext = pytest.importorskip("jupytext")
    for p in _tutorials():
        nb = jupytext.read(p)
        kinds = [c.cell_type for c in nb.cells]
        assert kinds[0] == "markdown" and "code" in kinds, p.name
        assert nb.cells[0].source.startswith(f"# {p.name[:2]} "), p.name  # numbered title


@pytest.mark.slow
@pytest.mark.parametrize("path", _tutorials(), ids=lambda p: p.stem)
def test_tutorial_runs(path: Path, tmp_path, monkeypatch, request):
    if path.name in FMNIST:
        request.getfixturevalue("fmnist_available")
    monkeypatch.delenv("BAYESPRUNE_TUTORIAL_FULL", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(path), run_name="__main__")
