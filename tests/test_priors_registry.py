"""The prior registry: a prior of one's own goes through bayesianize, fit, save and load (in a fresh
interpreter too); the built-ins are registered the same way; the structure parameters that get
``structure_lr`` are the ones each prior declares."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune.priors import (
    Gaussian,
    GroupHorseshoe,
    Prior,
    SpikeAndSlab,
    prior_from_dict,
    register_prior,
    registered_priors,
)
from bayesprune.priors import base as prior_base
from bayesprune.priors.horseshoe import HalfCauchyScale

#: a prior written as a user would: the contract implemented from public pieces only (Pyro,
#: torch and bp.priors.Prior), in a module of its own that both interpreters import
USER_PRIOR = '''
"""Gaussian weights under a point-estimated positive scale per node."""

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch

import bayesprune as bp


def _kl(loc, sd, prior_sd):
    q, p = torch.distributions.Normal(loc, sd), torch.distributions.Normal(0.0, prior_sd)
    return torch.distributions.kl_divergence(q, p).sum()


def _normal_site(name, loc, sd):
    return pyro.sample(name, dist.Normal(loc, sd).to_event(loc.dim()))


@bp.register_prior
@dataclass(frozen=True)
class NodeScaledGaussian(bp.priors.Prior):
    scale: float = 0.5
    init_log_scale: float = 0.0

    uses_row_stats = False

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"NodeScaledGaussian scale must be positive, got {self.scale!r}")

    def setup(self, layer, init_scale):
        n = layer.weight_loc.shape[0]
        layer.node_log_scale = torch.nn.Parameter(
            layer.weight_loc.new_full((n,), self.init_log_scale)
        )

    def structure_parameter_names(self, layer):
        return ("node_log_scale",)

    def base_scale(self, layer):
        return self.scale

    def node_multiplier(self, layer, batch=None):
        m = torch.exp(layer.node_log_scale)
        return m if batch is None else m.expand(batch, -1)

    def mean_multiplier(self, layer):
        return torch.exp(layer.node_log_scale)

    def kl(self, layer):
        kl = _kl(layer.weight_loc, layer.weight_scale, self.scale)
        if layer.bias_loc is not None:
            kl = kl + _kl(layer.bias_loc, layer.bias_scale, self.scale)
        return kl

    def model_sites(self, layer, path):
        w0 = layer.weight_loc.new_zeros(layer.weight_loc.shape)
        w = _normal_site(f"{path}.weight", w0, torch.full_like(w0, self.scale))
        b = None
        if layer.bias_loc is not None:
            b0 = layer.bias_loc.new_zeros(layer.bias_loc.shape)
            b = _normal_site(f"{path}.bias", b0, torch.full_like(b0, self.scale))
        return w, b, torch.exp(layer.node_log_scale)

    def guide_sites(self, layer, path):
        w = _normal_site(f"{path}.weight", layer.weight_loc, layer.weight_scale)
        b = None
        if layer.bias_loc is not None:
            b = _normal_site(f"{path}.bias", layer.bias_loc, layer.bias_scale)
        return w, b, torch.exp(layer.node_log_scale)
'''

#: run in a fresh interpreter: load before the prior is registered (refused), then after
LOAD_SCRIPT = """
import sys

import torch
from torch import nn

import bayesprune as bp

saved, inputs, out = sys.argv[1:4]
net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
try:
    bp.load(saved, net)
    refused = ""
except ValueError as exc:
    refused = str(exc)
import user_prior_module  # registers NodeScaledGaussian

bnet = bp.load(saved, net)
x = torch.load(inputs)
with torch.no_grad():
    result = {
        "refused": refused,
        "mean": bnet(x, mode="mean"),
        "plain": bnet.mean_module()(x),
        "type": bnet.priors["0"].to_dict()["type"],
        "scale": bnet.priors["0"].scale,
    }
torch.save(result, out)
"""

NET_IN, NET_OUT = 4, 3


@pytest.fixture
def registry(monkeypatch):
    """The registry as it is now, restored after the test."""
    monkeypatch.setattr(prior_base, "_REGISTRY", dict(prior_base._REGISTRY))


@pytest.fixture
def user_prior(tmp_path, monkeypatch, registry):
    """The module of USER_PRIOR, imported (which registers its prior) from ``tmp_path``."""
    (tmp_path / "user_prior_module.py").write_text(USER_PRIOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_prior_module", raising=False)
    module = importlib.import_module("user_prior_module")
    yield module
    sys.modules.pop("user_prior_module", None)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(NET_IN, 8), nn.ReLU(), nn.Linear(8, NET_OUT))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, NET_IN, generator=g)
    y = (x @ torch.randn(NET_IN, NET_OUT, generator=g)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def test_a_prior_of_your_own_survives_fit_save_and_load_in_a_fresh_interpreter(
    user_prior, tmp_path: Path, monkeypatch
) -> None:
    prior = user_prior.NodeScaledGaussian(scale=0.7)
    bnet = bp.bayesianize(_net(), prior=prior)
    layers = list(bnet.bayesian_layers.values())
    # the parameters the prior declares are the ones that get structure_lr in bp.fit
    assert bnet.structure_parameters() == [layer.node_log_scale for layer in layers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bp.fit(bnet, _loader(), epochs=2, lr=1e-2, structure_lr=0.05, progress=False, seed=0)
    assert all(layer.node_log_scale.detach().abs().max() > 0 for layer in layers)  # fitted
    x = torch.randn(10, NET_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mean, plain = bnet(x, mode="mean"), bnet.mean_module()(x)
    saved = tmp_path / "bnet.safetensors"
    bnet.save(saved)

    # a fresh interpreter: the registry holds the built-ins only until the module is imported
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "load_it.py").write_text(LOAD_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(tmp_path / "load_it.py"), str(saved), str(tmp_path / "x.pt"),
         str(tmp_path / "out.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**_env(), "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    fresh = torch.load(tmp_path / "out.pt")
    assert "unknown prior type 'NodeScaledGaussian'" in fresh["refused"]
    assert "bp.register_prior(NodeScaledGaussian) before bp.load" in fresh["refused"]
    assert fresh["type"] == "NodeScaledGaussian" and fresh["scale"] == 0.7
    assert torch.equal(fresh["mean"], mean) and torch.equal(fresh["plain"], plain)

    # and in this interpreter: refused once the name is unregistered, rebuilt once registered again
    monkeypatch.delitem(prior_base._REGISTRY, "NodeScaledGaussian")
    with pytest.raises(
        ValueError, match=r"bp\.register_prior\(NodeScaledGaussian\) before bp\.load"
    ):
        bp.load(saved, _net())
    bp.register_prior(user_prior.NodeScaledGaussian)
    back = bp.load(saved, _net())
    assert back.priors["0"] == prior and type(back.priors["0"]) is user_prior.NodeScaledGaussian
    with torch.no_grad():
        assert torch.equal(back(x, mode="mean"), mean)
        assert torch.equal(back.mean_module()(x), plain)
    assert [p.data.tolist() for p in back.structure_parameters()] == [
        layer.node_log_scale.data.tolist() for layer in layers
    ]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_an_unregistered_prior_works_in_memory_and_its_file_says_how_to_load_it(
    tmp_path: Path,
) -> None:
    @dataclass(frozen=True)
    class WideGaussian(Gaussian):
        scale: float = 3.0

    bnet = bp.bayesianize(_net(), prior=WideGaussian())
    assert bnet(torch.zeros(2, NET_IN)).shape == (2, NET_OUT)
    bnet.save(tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"unknown prior type 'WideGaussian'") as info:
        bp.load(tmp_path / "wide.safetensors", _net())
    assert "bp.register_prior(WideGaussian) before bp.load" in str(info.value)
    assert "'GroupHorseshoe'" in str(info.value)  # the registered names are listed
    with pytest.raises(ValueError, match=r"bp\.register_prior\(MyPrior\) before bp\.load"):
        prior_from_dict({"scale": 1.0})  # no "type" at all


def test_the_built_in_priors_are_registered_like_any_other() -> None:
    found = registered_priors()
    assert {
        "Gaussian": Gaussian,
        "SpikeAndSlab": SpikeAndSlab,
        "GroupHorseshoe": GroupHorseshoe,
    }.items() <= found.items()
    found["Gaussian"] = None  # a copy: the registry changes through register_prior only
    assert registered_priors()["Gaussian"] is Gaussian
    assert register_prior(Gaussian) is Gaussian  # registering again does nothing
    assert bp.register_prior is register_prior and "register_prior" in bp.__all__


def test_register_prior_as_a_decorator_with_a_name(registry) -> None:
    @register_prior(name="wide-gaussian")
    @dataclass(frozen=True)
    class WideGaussian(Gaussian):
        scale: float = 3.0

    assert WideGaussian().to_dict() == {"type": "wide-gaussian", "scale": 3.0}
    assert prior_from_dict({"type": "wide-gaussian"}) == WideGaussian()
    assert registered_priors()["wide-gaussian"] is WideGaussian
    with pytest.raises(ValueError, match="already registered as 'wide-gaussian'"):
        register_prior(WideGaussian, name="other")


def test_register_prior_refuses_what_it_cannot_rebuild(registry) -> None:
    with pytest.raises(TypeError, match=r"subclass of bayesprune\.priors\.Prior"):
        register_prior(dict)
    with pytest.raises(TypeError, match=r"subclass of bayesprune\.priors\.Prior"):
        register_prior(Gaussian())  # an instance, not the class

    class Undecorated(Gaussian):  # its option would not be a field: to_dict would drop it
        width: float = 2.0

    with pytest.raises(TypeError, match=r"must be a dataclass \(@dataclass\(frozen=True\)\)"):
        register_prior(Undecorated)

    @dataclass(frozen=True)
    class Gaussian2(Gaussian):
        pass

    with pytest.raises(
        ValueError, match=r"the prior name 'Gaussian' is taken by .*gaussian\.Gaussian"
    ):
        register_prior(Gaussian2, name="Gaussian")
    with pytest.raises(ValueError, match="non-empty string"):
        register_prior(Gaussian2, name="")


def test_a_redefined_class_replaces_its_earlier_self(registry) -> None:
    """A re-run notebook cell defines the class again: same module and name, a new object."""

    def define(default: float) -> type[Prior]:
        @register_prior
        @dataclass(frozen=True)
        class Redefined(Gaussian):
            scale: float = default

        return Redefined

    first, second = define(1.0), define(2.0)
    assert first is not second and registered_priors()["Redefined"] is second
    assert prior_from_dict({"type": "Redefined"}).scale == 2.0


BUILT_INS = {
    "gaussian": lambda: Gaussian(),
    "ss-node-point": lambda: SpikeAndSlab(),
    "ss-node-gaussian": lambda: SpikeAndSlab(weights="gaussian"),
    "ss-group-lasso": lambda: SpikeAndSlab(slab="group_lasso"),
    "ss-horseshoe": lambda: SpikeAndSlab(slab="horseshoe"),
    "ss-weight": lambda: SpikeAndSlab(level="weight"),
    "ghs": lambda: GroupHorseshoe(),
    "ghs-unregularized": lambda: GroupHorseshoe(regularized=False),
}


@pytest.mark.parametrize("weight_sd", ["per_weight", "rank1"])
@pytest.mark.parametrize("make", BUILT_INS.values(), ids=BUILT_INS.keys())
def test_built_in_structure_parameters_are_those_of_the_old_name_rule(make, weight_sd) -> None:
    """Declared by each prior, the structure parameters are what the old rule (every layer
    parameter not named ``weight_*`` / ``bias_*``) gave: the same tensors, in the same order."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(),
        nn.Linear(5, 3, bias=False),
    )  # fmt: skip
    bnet = bp.bayesianize(net, prior=make(), weight_sd=weight_sd)
    old_rule = [
        p
        for layer in bnet.bayesian_layers.values()
        for n, p in layer.named_parameters(recurse=False)
        if not n.startswith(("weight_", "bias_"))
    ]
    declared = bnet.structure_parameters()
    assert len(declared) == len(old_rule) and all(
        a is b for a, b in zip(declared, old_rule, strict=True)
    )
    if isinstance(make(), Gaussian):
        assert declared == []


def test_a_declared_structure_parameter_must_exist() -> None:
    @dataclass(frozen=True)
    class Misnamed(Gaussian):
        def structure_parameter_names(self, layer):
            return ("gate_logits",)

    bnet = bp.bayesianize(_net(), prior=Misnamed())
    with pytest.raises(ValueError, match=r"gives \['gate_logits'\], which are not parameters"):
        bnet.structure_parameters()


def test_both_horseshoe_priors_use_one_half_cauchy_scale() -> None:
    ghs = GroupHorseshoe(global_scale=0.3, slab_scale=1.5)
    assert ghs.scales == HalfCauchyScale(global_scale=0.3, slab_width=1.5)
    assert GroupHorseshoe(regularized=False).scales.slab_width is None
    for prior in (ghs, SpikeAndSlab(slab="horseshoe", slab_scale=1.5)):
        bnet = bp.bayesianize(_net(), prior=prior)
        layer = bnet.net[0]
        assert prior.structure_parameter_names(layer)[-8:] == HalfCauchyScale.parameter_names
        torch.testing.assert_close(
            prior.mean_multiplier(layer), HalfCauchyScale(slab_width=1.5).mean(layer)
        )
