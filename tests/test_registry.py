"""bayesprune.registry: the layer types written once, and a user's layer type registered."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune import registry
from bayesprune.layers import BayesianLinear


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILY", dict(registry._FAMILY))
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))


class HalfInitLinear(nn.Linear):
    """A user's Linear: its own initialisation and an extra buffer, the same function."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        with torch.no_grad():
            self.weight.mul_(0.5)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(HalfInitLinear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_an_unregistered_subclass_stays_deterministic() -> None:
    with pytest.warns(UserWarning, match="HalfInitLinear"):
        bnet = bp.bayesianize(_net())
    assert sorted(bnet.bayesian_layers) == ["2"]


def test_a_registered_subclass_is_bayesianized_pruned_exactly_and_counted() -> None:
    bp.register_layer(HalfInitLinear, like=nn.Linear)
    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "stays deterministic" warning any more
        bnet = bp.bayesianize(net)
    assert isinstance(bnet.net[0], BayesianLinear) and sorted(bnet.bayesian_layers) == ["0", "2"]
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 3-epoch fit on noise need not separate the nodes
        bp.fit(bnet, DataLoader(TensorDataset(x, y), batch_size=16), epochs=3, progress=False)
    keep = torch.zeros(16, dtype=torch.bool)
    keep[:5] = True
    mean = bnet.mean_module()
    assert type(mean[0]) is HalfInitLinear  # the user's class comes back, with posterior means
    small = bp.prune(bnet, masks={"0": keep}, example_input=x[:1])  # verify=True: the 1e-5 check
    assert type(small[0]) is HalfInitLinear and small[0].out_features == 5
    report = bp.compression_report(mean, small, x[:1], repeats=1, rounds=1)
    first = next(s for s in report.layers if s.name == "0")
    assert (first.width_before, first.width_after) == (16, 5)
    assert first.flops_before == 16 * 6 + 16 and first.flops_after == 5 * 6 + 5


def test_conv3d_is_counted_and_pruned() -> None:
    # Conv3d was pruned but missing from the FLOP counts (the type lists disagreed)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2 * 2, 3))
    x = torch.randn(1, 1, 4, 4, 4)
    keep = torch.tensor([True, False, True, True])
    small = bp.prune_module(net, {"0": keep}, x)
    report = bp.compression_report(net, small, x, repeats=1, rounds=1)
    conv = next(s for s in report.layers if s.name == "0")
    assert conv.flops_before == 4 * 8 * 27 + 4 * 8 and conv.flops_after == 3 * 8 * 27 + 3 * 8


def test_register_layer_refuses_what_it_cannot_honour() -> None:
    with pytest.raises(TypeError, match="needs a subclass of Linear"):
        bp.register_layer(nn.Conv2d, like=nn.Linear)
    with pytest.raises(TypeError, match="like= must be one of"):
        bp.register_layer(HalfInitLinear, like=nn.LSTM)
    bp.register_layer(HalfInitLinear, like=nn.Linear)
    bp.register_layer(HalfInitLinear, like=nn.Linear)  # again: nothing happens
    assert registry.layer_family(HalfInitLinear(2, 2)) is nn.Linear
    assert registry.registered_layers()[HalfInitLinear] is nn.Linear

    class Both(HalfInitLinear):
        pass

    assert registry.layer_family(Both) is None  # subclasses are not registered implicitly


def test_a_registered_conv_before_a_batchnorm_gets_its_gate_after_it() -> None:
    class MyConv(nn.Conv2d):
        pass

    bp.register_layer(MyConv, like=nn.Conv2d)
    torch.manual_seed(0)
    net = nn.Sequential(
        MyConv(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )
    with torch.no_grad():
        net[1].bias.fill_(2.0)  # a switched-off channel must not leave this bias behind
    bnet = bp.bayesianize(net.eval())
    assert bnet.net[0].batchnorm_follows and bnet.gate_after == {"0": "1"}
    keep = torch.tensor([True, False, True, False])
    small = bp.prune(bnet, masks={"0": keep}, example_input=torch.zeros(1, 1, 6, 6))
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(small(x), bnet.mean_module({"0": keep}).eval()(x))
