"""A layer family bayesprune does not know (``nn.ConvTranspose2d``: weight ``[in, out, kH, kW]``,
nodes on axis 1), added by one ``register_layer`` call: then bayesianized, fitted, pruned exactly,
counted, folded and saved like a built-in layer, with no edit elsewhere."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune import registry
from bayesprune.layers import BayesianSpecLayer


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILY", dict(registry._FAMILY))
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))


def _tconv_forward(m, x, w, b):
    return F.conv_transpose2d(x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation)


def _tconv_macs(m, x, out):
    # every input position meets the whole kernel of every (in, out) channel pair
    per_input = x[0, 0].numel() * m.in_channels * (m.out_channels // m.groups)
    return per_input * math.prod(m.kernel_size) + (out[0].numel() if m.bias is not None else 0)


TCONV = bp.LayerSpec(
    node_axis=1,
    input_axis=0,
    width_attrs=("out_channels", "in_channels"),
    macs=_tconv_macs,
    forward=_tconv_forward,
    spatial_dims=2,
    hyperparameters=("kernel_size", "stride", "padding", "output_padding", "dilation", "groups"),
)


def _net(batchnorm: bool = False, output_padding: int = 1) -> nn.Module:
    """1x5x5 -> conv 4x5x5 -> transposed conv 6x10x10 (-> BatchNorm) -> conv 4x5x5 -> 3 logits."""
    torch.manual_seed(0)
    tconv = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=output_padding)
    norm = [nn.BatchNorm2d(6)] if batchnorm else []
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), tconv, *norm, nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3),
    )  # fmt: skip
    if batchnorm:
        with torch.no_grad():
            net[3].running_mean.uniform_(-0.5, 0.5)
            net[3].running_var.uniform_(0.5, 2.0)
            net[3].bias.fill_(0.3)  # a switched-off channel must not leave this bias behind
    return net.eval()


def _data() -> tuple[torch.Tensor, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 5, 5, generator=g)
    y = (x[:, 0, :2].mean((1, 2)) > 0).long() + (x[:, 0, 3:].mean((1, 2)) > 0).long()
    return x, DataLoader(TensorDataset(x, y), batch_size=16)


def _fit(bnet) -> None:
    _, data = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 2-epoch fit on noise need not separate the nodes
        bp.fit(bnet, data, epochs=2, progress=False, seed=0)


def test_an_unregistered_transposed_conv_is_unknown() -> None:
    net = _net()
    assert registry.layer_spec(net[2]) is None
    with pytest.warns(UserWarning, match="ConvTranspose2d"):
        bnet = bp.bayesianize(net)
    assert sorted(bnet.bayesian_layers) == ["0", "4", "7"]
    with pytest.raises(KeyError, match="not a Linear/Conv layer"):
        bp.prune_module(net, {"2": torch.ones(6, dtype=torch.bool)}, torch.zeros(1, 1, 5, 5))


@pytest.mark.parametrize("prior", ["node", "horseshoe"])
def test_a_registered_transposed_conv_is_bayesianized_fitted_and_pruned_exactly(prior) -> None:
    bp.register_layer(nn.ConvTranspose2d, TCONV)
    net = _net()
    kwargs = {} if prior == "node" else {"prior": bp.priors.GroupHorseshoe()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "stays deterministic" warning any more
        bnet = bp.bayesianize(net, **kwargs)
    twin = bnet.net[2]
    assert isinstance(twin, BayesianSpecLayer) and twin.plain_type is nn.ConvTranspose2d
    assert tuple(twin.weight_loc.shape) == (6, 4, 3, 3)  # node-first inside
    _fit(bnet)
    assert bnet.inclusion_probs()["2"].shape == (6,)

    mean = bnet.mean_module()
    assert type(mean[2]) is nn.ConvTranspose2d and tuple(mean[2].weight.shape) == (4, 6, 3, 3)
    if prior == "node":  # slab means: the twin's weights, moved back to the plain layout
        torch.testing.assert_close(mean[2].weight, twin.weight_loc.detach().movedim(0, 1))

    x, _ = _data()
    keep2 = torch.tensor([True, False, True, True, False, True])
    keep0 = torch.tensor([True, True, False, True])
    masks = {"0": keep0, "2": keep2}
    small = bp.prune(bnet, masks=masks, example_input=x[:1])  # verify=True: the exactness check
    assert tuple(small[2].weight.shape) == (3, 4, 3, 3) and tuple(small[2].bias.shape) == (4,)
    assert (small[2].in_channels, small[2].out_channels) == (3, 4)
    assert small[4].in_channels == 4 and small[0].out_channels == 3
    with torch.no_grad():
        reference = bnet.mean_module(masks).eval()(x)
        assert float((small(x) - reference).abs().max()) < 1e-5

    report = bp.compression_report(bnet.mean_module(), small, x[:1], batch_sizes=())
    row = next(s for s in report.layers if s.name == "2")
    assert (row.width_before, row.width_after, row.in_before, row.in_after) == (6, 4, 4, 3)
    # 5x5 input positions x in x out x 3x3 kernel, plus one bias add per output element
    assert row.flops_before == 25 * 4 * 6 * 9 + 6 * 100
    assert row.flops_after == 25 * 3 * 4 * 9 + 4 * 100
    assert (row.params_before, row.params_after) == (4 * 6 * 9 + 6, 3 * 4 * 9 + 4)
    assert report.flops_after == bp.count_flops(small, x[:1])


def test_a_transposed_conv_before_a_batchnorm_is_gated_after_it_and_folded(tmp_path) -> None:
    bp.register_layer(nn.ConvTranspose2d, TCONV)
    bnet = bp.bayesianize(_net(batchnorm=True))
    assert bnet.gate_after == {"2": "3"} and bnet.net[2].batchnorm_follows
    _fit(bnet)
    x, _ = _data()
    masks = {"2": torch.tensor([False, True, True, False, True, True])}
    small = bp.prune(bnet, masks=masks, example_input=x[:1])
    assert small[2].out_channels == 4 and small[3].num_features == 4
    with torch.no_grad():
        reference = bnet.mean_module(masks).eval()(x)
        assert float((small(x) - reference).abs().max()) < 1e-5
        folded = bp.fold_batchnorm(small, example_input=x)
        assert isinstance(folded[3], nn.Identity) and folded[2].bias is not None
        assert float((folded(x) - reference).abs().max()) < 1e-5

    path = tmp_path / "small.safetensors"
    bp.save_pruned(small, path)
    back = bp.load_pruned(path, lambda: _net(batchnorm=True)).eval()
    assert tuple(back[2].weight.shape) == (4, 4, 3, 3) and back[2].out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x))
    with pytest.raises(ValueError, match="output_padding"):
        bp.load_pruned(path, lambda: _net(batchnorm=True, output_padding=0))
    bp.save_pruned(folded, tmp_path / "folded.safetensors")
    again = bp.load_pruned(tmp_path / "folded.safetensors", lambda: _net(batchnorm=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), folded(x))


def test_the_generic_twin_computes_the_layer_and_its_local_reparameterization() -> None:
    bp.register_layer(nn.ConvTranspose2d, TCONV)
    plain = nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(4, 3, 6, 6)
    for weight_sd in ("per_weight", "rank1"):
        layer = BayesianSpecLayer.from_module(plain, bp.priors.Gaussian(), weight_sd=weight_sd)
        layer.mode = "mean"
        with torch.no_grad():
            torch.testing.assert_close(layer(x), plain(x))
            # variance of the pre-activation: forward(x**2, sigma**2) (+ the bias variance)
            var = _tconv_forward(plain, x * x, layer.plain_weight(layer.weight_scale**2), None)
            if weight_sd == "rank1":  # one output channel, scaled per node
                one = layer._input_variance(x * x, torch.exp(2 * layer.weight_log_scale_in))
                node = torch.exp(2 * layer.weight_log_scale_out).view(-1, 1, 1)
                torch.testing.assert_close(one * node, var)
        layer.mode = "sample"
        torch.manual_seed(0)
        draws = torch.stack([layer(x) for _ in range(400)])
        with torch.no_grad():
            total = var + (layer.bias_scale**2).view(-1, 1, 1)
            ratio = draws.var(0) / total
        assert 0.8 < float(ratio.mean()) < 1.2  # each pre-activation has its marginal variance
        layer.local_reparam = False  # one weight draw per minibatch (reparam="shared")
        assert layer(x).shape == plain(x).shape and layer.kl().item() > 0


def test_register_layer_errors_name_the_fix() -> None:
    with pytest.raises(TypeError, match="exactly one of a LayerSpec"):
        bp.register_layer(nn.ConvTranspose2d)
    with pytest.raises(TypeError, match="exactly one of a LayerSpec"):
        bp.register_layer(nn.ConvTranspose2d, TCONV, like=nn.Conv2d)
    with pytest.raises(TypeError, match=r"needs a bayesprune\.LayerSpec"):
        bp.register_layer(nn.ConvTranspose2d, {"node_axis": 1})
    with pytest.raises(TypeError, match="its own pruning rules"):
        bp.register_layer(nn.ConvTranspose2d, like=nn.Conv2d)
    with pytest.raises(ValueError, match="node_axis == input_axis"):
        bp.LayerSpec(0, 0, ("out_channels", "in_channels"), _tconv_macs)
    with pytest.raises(TypeError, match="width_attrs"):
        bp.LayerSpec(1, 0, "out_channels", _tconv_macs)
    with pytest.raises(TypeError, match="macs"):
        bp.LayerSpec(1, 0, ("out_channels", "in_channels"), macs=None)
    with pytest.raises(ValueError, match="built in"):
        bp.register_layer(nn.Linear, TCONV)

    bp.register_layer(nn.ConvTranspose2d, TCONV)
    bp.register_layer(nn.ConvTranspose2d, TCONV)  # again, the same spec: nothing happens
    other = bp.LayerSpec(0, 1, ("out_channels", "in_channels"), _tconv_macs, _tconv_forward)
    with pytest.raises(ValueError, match="already registered with another LayerSpec"):
        bp.register_layer(nn.ConvTranspose2d, other)

    class MyTConv(nn.ConvTranspose2d):
        pass

    bp.register_layer(MyTConv, like=nn.ConvTranspose2d)  # a subclass of a registered family
    assert registry.layer_spec(MyTConv) is TCONV and registry.layer_family(MyTConv) is (
        nn.ConvTranspose2d
    )
    with pytest.raises(ValueError, match="already registered like ConvTranspose2d"):
        bp.register_layer(MyTConv, TCONV)


def test_a_spec_that_misnames_the_node_axis_is_refused_with_the_fix() -> None:
    wrong = bp.LayerSpec(0, 1, ("out_channels", "in_channels"), _tconv_macs, _tconv_forward, 2)
    bp.register_layer(nn.ConvTranspose2d, wrong)
    net = _net()  # in 4 != out 6: the weight's axis 0 has 4 entries, not 6 nodes
    with pytest.raises(ValueError, match=r"node_axis=0.*Fix the spec's node_axis"):
        bp.prune_module(net, {"2": torch.ones(6, dtype=torch.bool)}, torch.zeros(1, 1, 5, 5))
    with pytest.raises(TypeError, match="fix the LayerSpec's node_axis"):
        bp.bayesianize(net)


def test_a_whole_registered_layer_switched_off_keeps_one_node() -> None:
    # RemovedLayer / ConstantLayer know the positions of built-in layers only
    bp.register_layer(nn.ConvTranspose2d, TCONV)
    net, x = _net(), torch.randn(2, 1, 5, 5)
    with pytest.warns(UserWarning, match="has no placeholder"):
        small = bp.prune_module(net, {"2": torch.zeros(6, dtype=torch.bool)}, x, min_nodes=0)
    assert small[2].out_channels == 1
