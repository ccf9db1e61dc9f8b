"""The reference networks (``bayesprune.models``): builders, ``get_model``/``list_models``, and how
they are installed (inside the package, never as a top-level ``models``)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from bayesprune.metrics import count_params
from bayesprune.models import MODELS, get_model, lenet5_caffe, list_models, resnet20

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list_models())
def test_models_build_and_run(name):
    net = get_model(name)
    out = net(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_reference_sizes():
    assert count_params(get_model("lenet_300_100")) == 266_610
    assert count_params(get_model("lenet5_caffe")) == 431_080
    # ResNet-20 has about 0.27M parameters (He et al. 2016)
    assert 0.26e6 < count_params(get_model("resnet20")) < 0.28e6


def test_list_models_is_sorted_names_of_MODELS():
    names = list_models()
    assert names == sorted(MODELS) == ["lenet5_caffe", "lenet_300_100", "resnet20", "vgg_small"]
    names.append("mine")  # a fresh list each call: the caller may change it
    assert "mine" not in list_models()


def test_get_model_passes_keyword_options():
    net = get_model("resnet20", in_channels=3, num_classes=4)
    assert isinstance(net, type(resnet20()))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert get_model("lenet_300_100", in_features=64)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(TypeError):
        get_model("lenet_300_100", 64)  # options are keyword-only


def test_get_model_follows_MODELS(monkeypatch):
    """A builder registered in ``MODELS`` is listed and built like the reference ones."""
    monkeypatch.setitem(MODELS, "tiny", lambda num_classes=2: torch.nn.Linear(4, num_classes))
    assert "tiny" in list_models()
    assert get_model("tiny", num_classes=5).out_features == 5


def test_get_model_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'") as info:
        get_model("nope")
    assert all(name in str(info.value) for name in list_models())  # the known names are listed
    with pytest.raises(ValueError, match=r"'resnet18' \(did you mean 'resnet20'\?\)"):
        get_model("resnet18")
    with pytest.raises(ValueError, match=r"lenet_300_100 has no option 'classes'.*num_classes"):
        get_model("lenet_300_100", classes=3)
    with pytest.raises(TypeError, match="must be a model name"):
        get_model(resnet20)
    with pytest.raises(ValueError, match="too small"):
        lenet5_caffe(image_size=8)


# --- installation: `models/` of the repository is `bayesprune.models`, nothing else -------------


def test_pyproject_installs_every_subpackage_under_bayesprune():
    """The package list of ``pyproject.toml`` is explicit (``packages.find`` cannot find a mapped
    folder): it must name every folder of modules, and only names under ``bayesprune``."""
    pyproject = REPO / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not run from a checkout of the repository")
    config = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"bayesprune.models": "models"}
    roots = {"bayesprune": REPO / "bayesprune", "bayesprune.models": REPO / "models"}
    on_disk = {
        ".".join((prefix, *py.parent.relative_to(root).parts))
        for prefix, root in roots.items()
        for py in root.rglob("*.py")
        if "__pycache__" not in py.parts
    }
    assert sorted(config["packages"]) == sorted(on_disk)


def test_installed_distribution_has_no_top_level_models():
    """Today's failure mode: the distribution listed ``models`` as a top-level package."""
    # installed distributions only (they have a RECORD): not a `bayesprune.egg-info` left by a
    # build in the checkout, which importlib.metadata also finds when the checkout is on sys.path
    installed = [
        d for d in importlib.metadata.distributions(name="bayesprune") if d.read_text("RECORD")
    ]
    if not installed:
        pytest.skip("bayesprune is not installed (only on sys.path)")
    for dist in installed:
        assert "models" not in (dist.read_text("top_level.txt") or "").split()
        files = [line.split(",")[0] for line in dist.read_text("RECORD").splitlines()]
        assert not any(f.startswith("models/") for f in files), files
        if any(f.startswith("bayesprune/") for f in files):  # a regular (not editable) install
            assert "bayesprune/models/__init__.py" in files


@pytest.mark.slow
def test_outside_the_repository_only_bayesprune_models_imports(tmp_path):
    """In a fresh interpreter started outside the checkout (editable or regular install alike),
    ``bayesprune.models`` imports and the installation provides no top-level ``models``."""
    code = (
        "import importlib.util, bayesprune.models as m\n"
        "spec = importlib.util.find_spec('models')\n"
        "print(m.__name__, m.list_models())\n"
        "print(spec.origin if spec else None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -P: the current folder is not put on sys.path (the repository's own `models/` is not seen)
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    if "No module named 'bayesprune'" in proc.stderr:
        pytest.skip("bayesprune is not installed (only on PYTHONPATH)")
    assert proc.returncode == 0, proc.stderr
    name_line, origin = proc.stdout.splitlines()
    assert name_line == f"bayesprune.models {list_models()}"
    assert origin == "None" or not Path(origin).resolve().is_relative_to(REPO), (
        f"a top-level `models` is installed from this repository: {origin}"
    )
