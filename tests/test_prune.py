"""Tests of bayesprune.prune: structured pruning into a physically smaller network."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn

import bayesprune as bp
from bayesprune.metrics import count_flops, count_params
from bayesprune.models import lenet5_caffe, lenet_300_100, resnet20, vgg_small
from bayesprune.pruning import (
    CompressionReport,
    ConstantLayer,
    RemovedLayer,
    architecture_string,
    compression_report,
    dependency_groups,
    finetune,
    load_pruned,
    plan_pruning,
    prune,
    prune_module,
    save_pruned,
    zero_masked,
)

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _hidden_layers(net: nn.Module) -> dict[str, nn.Module]:
    """Linear / Conv layers except the output layer (the last Linear)."""
    layers = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    last = [n for n, m in layers.items() if isinstance(m, nn.Linear)][-1]
    return {n: m for n, m in layers.items() if n != last}


def _random_masks(net: nn.Module, p_keep: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        n: torch.rand(m.weight.shape[0], generator=gen) < p_keep
        for n, m in _hidden_layers(net).items()
    }


@torch.no_grad()
def _randomize_bn(net: nn.Module, gen: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.copy_(torch.randn(n, generator=gen))
            m.bias.copy_(torch.randn(n, generator=gen))


def _assert_exact(net: nn.Module, masks: dict, example: torch.Tensor, **kwargs) -> nn.Module:
    """prune_module(net, masks)(x) == zero_masked(net, effective masks)(x) on a fresh random x."""
    small = prune_module(net, masks, example, **kwargs)
    plan = plan_pruning(net, masks, example, **{k: v for k, v in kwargs.items() if k != "verify"})
    ref = zero_masked(net, plan.masks).eval()
    x = torch.randn_like(example)
    with torch.no_grad():
        diff = (small.eval()(x) - ref(x)).abs().max().item()
    assert diff <= 1e-5, diff
    return small


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# exactness on the reference networks
# ------------------------------------------------------------------------------------------------

REFERENCE_NETS = {
    "lenet_300_100": (lambda: lenet_300_100(), (3, 1, 28, 28)),
    "lenet5_caffe": (lambda: lenet5_caffe(), (3, 1, 28, 28)),
    "vgg_small": (lambda: vgg_small(), (3, 1, 28, 28)),
    "resnet20": (lambda: resnet20(), (3, 1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (2, 3, 32, 32)),
}


@pytest.mark.parametrize("name", list(REFERENCE_NETS))
def test_reference_nets_prune_exactly(name: str) -> None:
    build, shape = REFERENCE_NETS[name]
    gen = torch.Generator().manual_seed(1)
    net = build()
    _randomize_bn(net, gen)
    masks = _random_masks(net, 0.4, gen)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small = _assert_exact(net, masks, torch.randn(shape, generator=gen))
    # physically smaller, and the input network is untouched
    assert count_params(small) < 0.8 * count_params(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # no pruned layer is wider than its mask asks, unless tied to a wider one by an addition
    plan = plan_pruning(net, masks, torch.randn(shape))
    for g in plan.groups:
        if g.prunable:
            union = torch.zeros(g.width, dtype=torch.bool)
            for p in g.producers:
                union |= masks.get(p, torch.ones(g.width, dtype=torch.bool))
            assert torch.equal(g.keep, union)


def test_resnet20_groups_follow_the_residual_stages() -> None:
    groups = dependency_groups(resnet20(), torch.zeros(1, 1, 28, 28))
    tied = sorted(sorted(g.producers) for g in groups if len(g.producers) > 1)
    assert tied == [
        ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"],
        ["layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"],
        ["layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2", "layer3.2.conv2"],
    ]
    fc = next(g for g in groups if g.producers == ["fc"])
    assert not fc.prunable and "the network output" in fc.frozen


def test_resnet18_downsample_shortcuts_are_tied() -> None:
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    groups = dependency_groups(net, torch.zeros(1, 3, 32, 32))
    layer2 = next(g for g in groups if "layer2.0.downsample.0" in g.producers)
    assert sorted(layer2.producers) == ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    assert "layer2.0.downsample.1" in layer2.norms and layer2.prunable


# ------------------------------------------------------------------------------------------------
# one test per layer pattern
# ------------------------------------------------------------------------------------------------


def test_linear_to_linear_slices_rows_and_columns() -> None:
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    keep0 = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    keep2 = torch.tensor([0, 1, 0, 0, 1], dtype=torch.bool)
    small = _assert_exact(net, {"0": keep0, "2": keep2}, torch.randn(4, 6))
    assert small[0].weight.shape == (3, 6) and small[0].out_features == 3
    assert small[2].weight.shape == (2, 3) and small[2].in_features == 3
    assert small[4].weight.shape == (3, 2) and small[4].in_features == 2
    assert torch.equal(small[0].weight, net[0].weight[keep0])
    assert torch.equal(small[2].weight, net[2].weight[keep2][:, keep0])


def test_conv_batchnorm_conv_slices_filters_norm_and_channels() -> None:
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    _randomize_bn(net, gen)
    keep = torch.tensor([0, 1, 0, 0, 1, 1], dtype=torch.bool)
    small = _assert_exact(
        net, {"0": keep, "3": torch.tensor([1, 1, 0, 1]).bool()}, torch.randn(2, 2, 9, 9)
    )
    assert small[0].out_channels == 3 and small[1].num_features == 3
    assert small[3].in_channels == 3 and small[3].out_channels == 3 and small[4].num_features == 3
    assert torch.equal(small[1].running_mean, net[1].running_mean[keep])
    assert small[8].in_features == 3


def test_conv_flatten_linear_removes_whole_channel_blocks() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 2),
    )  # fmt: skip
    keep = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    small = _assert_exact(net, {"0": keep}, torch.randn(3, 1, 8, 8))
    assert small[4].in_features == 18
    # the Linear keeps the 3x3 column blocks of channels 0 and 2 (channel-major flatten order)
    cols = torch.cat([torch.arange(0, 9), torch.arange(18, 27)])
    assert torch.equal(small[4].weight, net[4].weight[:, cols])


def test_functional_flatten_view_and_mean_are_followed() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.conv2 = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 5, 3)
            self.fc1, self.fc2 = nn.Linear(6 * 2 * 2, 2), nn.Linear(5, 2)

        def forward(self, x):
            h = F.relu(self.conv(x))
            a = torch.flatten(F.max_pool2d(h, 2), 1)  # 6 x 2 x 2 features
            b = self.conv2(h).relu().mean((2, 3))
            return self.fc1(a) + self.fc2(b.view(b.size(0), -1))

    net = Net()
    masks = {"conv": torch.tensor([1, 0, 1, 1, 0, 0]).bool(), "conv2": torch.arange(5) < 2}
    small = _assert_exact(net, masks, torch.randn(2, 1, 6, 6))
    assert small.fc1.in_features == 12 and small.conv2.in_channels == 3
    assert small.fc2.in_features == 2 and small.fc1.out_features == 2


class _Residual(nn.Module):
    """conv1 -> BN -> ReLU -> h; out = ReLU(BN(conv2(h)) + h) -> conv3 -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 5, 3)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv3(out)), 1).flatten(1))


def test_residual_add_prunes_a_channel_only_when_every_producer_does() -> None:
    gen = torch.Generator().manual_seed(3)
    net = _Residual()
    _randomize_bn(net, gen)
    m1 = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    m2 = torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.bool)
    small = _assert_exact(net, {"conv1": m1, "conv2": m2}, torch.randn(2, 2, 7, 7))
    assert small.conv1.out_channels == small.conv2.out_channels == 4  # channels 0..3 survive
    assert small.conv2.in_channels == small.conv3.in_channels == 4
    assert small.bn1.num_features == small.bn2.num_features == 4
    # conv2 masks channels 0, 1 that conv1 keeps: they stay, zeroed in conv2 and its BatchNorm
    assert small.conv2.weight[:2].abs().sum() == 0 and small.bn2.weight[:2].abs().sum() == 0
    group = [g for g in dependency_groups(net, torch.zeros(1, 2, 7, 7)) if "conv1" in g.producers]
    assert sorted(group[0].producers) == ["conv1", "conv2"]


def test_batchnorm_not_directly_after_a_layer_keeps_the_group_whole() -> None:
    gen = torch.Generator().manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3),
        nn.Flatten(), nn.Linear(3 * 2 * 2, 2),
    )  # fmt: skip
    _randomize_bn(net, gen)
    with pytest.warns(UserWarning, match="BatchNorm '2' that does not directly follow"):
        small = _assert_exact(
            net, {"0": torch.tensor([1, 0, 0, 1]).bool()}, torch.randn(2, 1, 6, 6)
        )
    assert small[0].out_channels == 4 and small[3].in_channels == 4


def test_output_layer_and_input_space_are_never_removed() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with pytest.warns(UserWarning, match=r"\['2'\].*the network output"):
        small = _assert_exact(net, {"2": torch.tensor([1, 0, 0]).bool()}, torch.randn(2, 4))
    assert small[2].out_features == 3

    class InputResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc((self.conv(x) + x).mean((2, 3)))

    with pytest.warns(UserWarning, match="the network input"):
        small = _assert_exact(
            InputResidual(), {"conv": torch.tensor([1, 0, 0]).bool()}, torch.randn(2, 3, 5, 5)
        )
    assert small.conv.out_channels == 3


def test_unsupported_patterns_keep_their_groups_whole_with_a_warning() -> None:
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 4, 3, padding=1)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.dw(F.relu(self.a(x))).amax((2, 3)))

    mask = torch.tensor([1, 0, 1, 0]).bool()
    with pytest.warns(UserWarning, match="grouped convolution 'dw'"):
        small = _assert_exact(Grouped(), {"a": mask}, torch.randn(2, 2, 5, 5))
    assert small.a.out_channels == 4 and small.dw.in_channels == 4

    class Flip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.a(x)).flip(1))  # reorders channels: not followed

    with pytest.warns(UserWarning, match="node 'flip'"):
        small = _assert_exact(Flip(), {"a": mask}, torch.randn(2, 3))
    assert small.fc.in_features == 4


def test_concatenation_along_channels_keeps_each_piece_in_its_place() -> None:
    class Concat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1)
            self.c = nn.Conv2d(7, 5, 3)
            self.fc = nn.Linear(5 * 2 * 2 + 7, 2)

        def forward(self, x):
            h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)  # 4 + 3 channels
            wide = torch.cat([h, h], dim=2)  # along a spatial axis: the same channels
            feats = torch.cat([torch.flatten(self.c(h), 1), wide.amax((2, 3))], 1)
            return self.fc(feats)

    net = Concat()
    ma, mb = torch.tensor([1, 0, 1, 0]).bool(), torch.tensor([0, 1, 0]).bool()
    small = _assert_exact(
        net, {"a": ma, "b": mb, "c": torch.arange(5) < 2}, torch.randn(2, 2, 4, 4)
    )
    assert small.c.in_channels == 3 and small.fc.in_features == 2 * 4 + 3
    kept = torch.cat([ma, mb])
    assert torch.equal(small.c.weight, net.c.weight[torch.arange(5) < 2][:, kept])
    # fc reads c's kept channels (4 columns each), then the 3 kept channels of the concatenation
    cols = torch.cat([torch.arange(8), 20 + kept.nonzero().flatten()])
    assert torch.equal(small.fc.weight, net.fc.weight[:, cols])


def test_sigmoid_and_constant_offsets_keep_channels() -> None:
    class Offset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(
                torch.flatten(torch.stack([torch.sigmoid(self.a(x)), self.b(x) + 1], 1), 1)
            )

    mask = torch.tensor([1, 0, 1, 0]).bool()
    with pytest.warns(UserWarning):
        small = _assert_exact(Offset(), {"a": mask, "b": mask}, torch.randn(2, 3))
    assert small.a.out_features == 4 and small.b.out_features == 4


# ------------------------------------------------------------------------------------------------
# floors and rounding
# ------------------------------------------------------------------------------------------------


def test_floors_keep_the_best_nodes_and_warn_with_the_layer_name() -> None:
    net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2))
    scores = {"0": torch.arange(10.0), "2": -torch.arange(8.0)}
    nothing = {"0": torch.zeros(10, dtype=torch.bool), "2": torch.zeros(8, dtype=torch.bool)}
    # one warning names every layer that hit its floor
    match = r"keep 0 of 10 nodes of layer '0' \(now 1\); keep 0 of 8 nodes of layer '2' \(now 1\)"
    with pytest.warns(UserWarning, match=match) as caught:
        small = _assert_exact(net, nothing, torch.randn(2, 4), scores=scores)
    floors = [str(w.message) for w in caught if "floor" in str(w.message)]
    assert floors and all("layer '0'" in m and "layer '2'" in m for m in floors)
    assert small[0].out_features == 1 and small[2].out_features == 1
    plan = _quiet(plan_pruning, net, nothing, torch.randn(2, 4), scores=scores, min_fraction=0.25)
    assert plan.masks["0"].nonzero().flatten().tolist() == [7, 8, 9]  # ceil(2.5) best by score
    assert plan.masks["2"].nonzero().flatten().tolist() == [0, 1]
    plan = _quiet(plan_pruning, net, nothing, torch.randn(2, 4), scores=scores, min_nodes=4)
    assert int(plan.masks["0"].sum()) == 4 and int(plan.masks["2"].sum()) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough nodes kept: no warning
        plan_pruning(net, {"0": torch.arange(10) < 5}, torch.randn(2, 4))


def test_a_posterior_that_switches_a_layer_off_warns_with_the_remedy() -> None:
    net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2))
    bnet = bp.bayesianize(net, prior=bp.priors.SpikeAndSlab(level="node"))
    with torch.no_grad():
        bnet.bayesian_layers["0"].gate_logit.fill_(-5.0)  # every PIP of layer '0' ~ 0.007
    x = torch.zeros(1, 4)
    # never fitted: the PIPs are starting values, and the warning says so, not "the KL term"
    with pytest.warns(UserWarning, match="never fitted") as caught:
        bp.prune(bnet, threshold=0.5, example_input=x)
    assert not any("KL term" in str(w.message) for w in caught)
    bnet.num_data = 100  # as bp.fit leaves it
    with pytest.warns(
        UserWarning, match=r"switched off every node of layer\(s\) \['0'\].*kl_weight"
    ):
        with pytest.warns(UserWarning, match="keep 0 of 10 nodes of layer '0'"):
            small = bp.prune(bnet, threshold=0.5, example_input=x)
    assert small[0].out_features == 1 and small[2].out_features == 8
    for t in (1.5, -0.5):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]; got"):
            bp.prune(bnet, threshold=t, example_input=x)


def test_round_to_rounds_widths_up_with_the_next_best_nodes() -> None:
    net = nn.Sequential(nn.Linear(4, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 2))
    masks = {"0": torch.arange(20) < 3, "2": torch.arange(12) < 9}
    scores = {"0": -torch.arange(20.0), "2": torch.zeros(12)}
    small = _assert_exact(net, masks, torch.randn(2, 4), scores=scores, round_to=8)
    assert small[0].out_features == 8 and small[2].out_features == 12  # 3 -> 8, 9 -> 12 (capped)
    plan = plan_pruning(net, masks, torch.randn(2, 4), scores=scores, round_to=8)
    assert plan.masks["0"].nonzero().flatten().tolist() == list(range(8))
    assert plan.widths() == {"0": (20, 8), "2": (12, 12), "4": (2, 2)}


# ------------------------------------------------------------------------------------------------
# clear errors
# ------------------------------------------------------------------------------------------------


def test_bad_masks_and_options_give_clear_errors() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(2, 4)
    with pytest.raises(KeyError, match=r"'fc1'.*layers are"):
        prune_module(net, {"fc1": torch.ones(6, dtype=torch.bool)}, x)
    with pytest.raises(ValueError, match="has 5 entries but layer '0' has 6"):
        prune_module(net, {"0": torch.ones(5, dtype=torch.bool)}, x)
    with pytest.raises(TypeError, match=r"must be boolean.*pip >= 0\.5"):
        prune_module(net, {"0": torch.rand(6)}, x)
    with pytest.raises(TypeError, match="must be a dict"):
        prune_module(net, [torch.ones(6)], x)
    with pytest.raises(ValueError, match="min_fraction"):
        prune_module(net, {}, x, min_fraction=1.5)
    with pytest.raises(ValueError, match="min_nodes"):
        prune_module(net, {}, x, min_nodes=-1)
    with pytest.raises(ValueError, match="round_to"):
        prune_module(net, {}, x, round_to=0)
    with pytest.raises(ValueError, match="example_input"):
        prune_module(net, {}, torch.randn(2, 5))


def test_untraceable_and_hard_coded_networks_give_clear_errors() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(TypeError, match=r"torch\.fx"):
        prune_module(DataDependent(), {}, torch.randn(2, 3))

    class HardCoded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(-1, 64))

    with pytest.raises(RuntimeError, match="hard-codes a width"):
        prune_module(
            HardCoded(), {"conv": torch.tensor([1, 0, 1, 1]).bool()}, torch.randn(2, 1, 6, 6)
        )


# ------------------------------------------------------------------------------------------------
# prune(): from a posterior or scores
# ------------------------------------------------------------------------------------------------


class _FakeBayesian:
    """Follows the BayesianModule contract of ARCHITECTURE.md: inclusion_probs and mean_module."""

    def __init__(self, net: nn.Module, pips: dict[str, torch.Tensor]) -> None:
        self.net, self.pips, self.mean_calls = net, pips, []

    def inclusion_probs(self) -> dict[str, torch.Tensor]:
        return self.pips

    def mean_module(self, masks=None) -> nn.Module:
        self.mean_calls.append(masks)
        return self.net if masks is None else zero_masked(self.net, masks)


def test_prune_a_bayesian_module_by_threshold_and_global_keep() -> None:
    net = lenet_300_100(in_features=16)
    pips = {"1": torch.linspace(0, 1, 300), "3": torch.linspace(0, 0.5, 100), "5": torch.zeros(10)}
    bnet = _FakeBayesian(net, pips)
    small = prune(bnet, threshold=0.5)  # example input inferred from the first Linear
    assert small[1].out_features == int((pips["1"] >= 0.5).sum()) and small[3].out_features == 1
    assert torch.equal(bnet.mean_calls[-1]["1"], pips["1"] >= 0.5)
    assert "5" not in bnet.mean_calls[-1] and small[5].out_features == 10  # output: never masked
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(small(x), bnet.mean_module(bnet.mean_calls[-1])(x), atol=1e-5)
    # keep=0.1: the 40 highest PIPs of all 400 nodes, ranked across layers
    with pytest.warns(UserWarning, match="keep 0 of 100 nodes of layer '3'") as caught:
        small = prune(bnet, keep=0.1)
    assert not any("KL term" in str(w.message) for w in caught)  # the ranking, not the posterior
    assert small[1].out_features == 40 and small[3].out_features == 1  # floor: one node in "3"
    with pytest.raises(ValueError, match="only the output layer has node scores"):
        prune(_FakeBayesian(net, {"5": torch.rand(10)}), threshold=0.5)
    with pytest.raises(ValueError, match="no node-level inclusion"):
        prune(_FakeBayesian(net, {}), threshold=0.5)
    conv = _FakeBayesian(lenet5_caffe(), {"0": torch.rand(20)})
    with pytest.raises(ValueError, match="pass example_input="):
        prune(conv, threshold=0.5)
    small = prune(conv, threshold=0.5, example_input=torch.zeros(1, 1, 28, 28))
    assert small[0].out_channels == max(1, int((conv.pips["0"] >= 0.5).sum()))


def test_prune_a_plain_module_with_masks_or_scores() -> None:
    net = lenet_300_100(in_features=16)
    small = prune(net, masks={"1": torch.arange(300) < 10})
    assert small[1].out_features == 10
    small = prune(net, keep=0.5, scores={"1": torch.rand(300), "3": torch.rand(100)})
    assert small[1].out_features + small[3].out_features == 200
    with pytest.raises(ValueError, match="exactly one of"):
        prune(net, threshold=0.5, keep=0.2)
    with pytest.raises(ValueError, match="exactly one of"):
        prune(net)
    with pytest.raises(ValueError, match="need scores="):
        prune(net, threshold=0.5)
    with pytest.raises(ValueError, match="keep is the fraction"):
        prune(net, keep=1.5, scores={"1": torch.rand(300)})
    with pytest.raises(TypeError, match=r"BayesianModule or an nn\.Module"):
        prune("net", masks={})


# ------------------------------------------------------------------------------------------------
# report, save / load, fine-tune
# ------------------------------------------------------------------------------------------------


def test_compression_report_counts_and_times() -> None:
    net = lenet5_caffe()
    x = torch.zeros(1, 1, 28, 28)
    masks = {"0": torch.arange(20) < 5, "3": torch.arange(50) < 10, "7": torch.arange(500) < 50}
    small = prune_module(net, masks, x)
    rep = compression_report(net, small, x, batch_sizes=(1, 4), repeats=3, warmup=1, rounds=2)
    assert isinstance(rep, CompressionReport)
    assert rep.params_before == count_params(net) and rep.params_after == count_params(small)
    assert rep.flops_before == count_flops(net, x) and rep.flops_after == count_flops(small, x)
    conv2 = next(s for s in rep.layers if s.name == "3")
    assert (conv2.width_before, conv2.width_after, conv2.in_before, conv2.in_after) == (
        50,
        10,
        20,
        5,
    )
    assert conv2.params_after == 10 * 5 * 25 + 10
    assert rep.architecture_after == "5-10-160-50" == architecture_string(small)
    assert set(rep.latency) == {1, 4} and all(d > 0 and s > 0 for d, s in rep.latency.values())
    assert rep.speedup[1] == pytest.approx(rep.latency[1][0] / rep.latency[1][1])
    lo, hi = rep.speedup_range[1]  # the spread of single rounds brackets the median's ratio
    assert 0 < lo <= hi and set(rep.speedup_range) == {1, 4}
    text = str(rep)
    assert "single rounds" in text
    assert "measured speed-up" in text and "20 -> 5" in text and "not a timing" in text
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["params_kept"] == pytest.approx(rep.params_after / rep.params_before)
    with pytest.raises(ValueError, match="rounds must be"):
        compression_report(net, small, x, rounds=0)
    with pytest.raises(ValueError, match="no Conv2d at '0'"):
        compression_report(net, lenet_300_100(), x, batch_sizes=())
    with pytest.raises(ValueError, match="pass the dense network first"):
        compression_report(small, net, x, batch_sizes=())
    with pytest.raises(ValueError, match=r"running dense on example_input of shape \(1, 1, 8, 8\)"):
        compression_report(net, small, torch.zeros(1, 1, 8, 8), batch_sizes=())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            compression_report(net, small, x, batch_sizes=(), device="cuda")


def test_a_fitted_conv_net_prunes_without_example_input(tmp_path) -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )  # fmt: skip
    bnet = bp.bayesianize(net, prior=bp.priors.SpikeAndSlab())
    with pytest.raises(ValueError, match="cannot infer an input shape"):
        bp.prune(bnet, threshold=0.5)
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,)))]
    bp.fit(bnet, data, epochs=1, num_data=8, progress=False)
    assert bnet.input_shape == (1, 8, 8)  # recorded from the first batch
    assert isinstance(_quiet(bp.prune, bnet, threshold=0.5), nn.Sequential)
    bnet.save(tmp_path / "b.safetensors")
    assert bp.load(tmp_path / "b.safetensors", net).input_shape == (1, 8, 8)


def test_save_pruned_refuses_a_bayesian_module_and_prune_names_a_bad_example(tmp_path) -> None:
    bnet = bp.bayesianize(lenet_300_100(in_features=8))
    with pytest.raises(TypeError, match=r"this is a BayesianModule.*bnet\.save\(path\)"):
        bp.save_pruned(bnet, tmp_path / "b.safetensors")
    # the cause, not a dump of the traced graph
    with pytest.raises(ValueError, match=r"shape \(1, 9\) failed \(RuntimeError: mat1 and mat2"):
        _quiet(bp.prune, bnet, threshold=0.5, example_input=torch.zeros(1, 9))


def test_save_and_load_pruned_reproduce_outputs(tmp_path) -> None:
    gen = torch.Generator().manual_seed(5)
    net = resnet20()
    _randomize_bn(net, gen)
    x = torch.randn(2, 1, 28, 28)
    small = _quiet(prune_module, net, _random_masks(net, 0.5, gen), x).eval()
    path = tmp_path / "small.safetensors"
    save_pruned(small, path)
    for base in (resnet20, resnet20()):  # a builder or an instance
        loaded = load_pruned(path, base).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), small(x))
        assert architecture_string(loaded) == architecture_string(small)
    with pytest.raises(ValueError, match="same architecture"):
        load_pruned(path, lenet5_caffe)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match=r"not written by bayesprune\.save_pruned"):
        load_pruned(other, resnet20)
    with pytest.raises(TypeError, match="base must be"):
        load_pruned(path, 3)
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        save_pruned(small, tmp_path / "nope" / "small.safetensors")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            load_pruned(path, resnet20, device="cuda")


def test_load_pruned_refuses_a_base_that_computes_something_else(tmp_path) -> None:
    def build(padding: int = 1, dilation: int = 1, classes: int = 10) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=padding, dilation=dilation), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=padding, dilation=dilation), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
        )  # fmt: skip

    x = torch.randn(2, 1, 8, 8)
    small = prune_module(build(), {"0": torch.arange(8) < 4}, x).eval()
    path = tmp_path / "small.safetensors"
    save_pruned(small, path)
    with pytest.raises(ValueError, match=r"layer '0' was saved with padding=\[1, 1\]"):
        load_pruned(path, lambda: build(padding=0))
    with pytest.raises(ValueError, match="dilation="):
        load_pruned(path, lambda: build(dilation=2))
    with pytest.raises(ValueError, match=r"'6' was saved 8 -> 10 wide but base's is 8 -> 3"):
        load_pruned(path, lambda: build(classes=3))
    # a layer removed whole is checked too: its geometry sets the constant's positions
    with pytest.warns(UserWarning, match="removed"):
        off = prune_module(build(), {"0": torch.zeros(8, dtype=torch.bool)}, x, min_nodes=0)
    assert isinstance(off[0], RemovedLayer)
    save_pruned(off, path)
    with torch.no_grad():
        assert torch.equal(load_pruned(path, build).eval()(x), off.eval()(x))
    with pytest.raises(ValueError, match="removed layer '0' was saved with kernel, padding"):
        load_pruned(path, lambda: build(padding=0))


def test_finetune_trains_the_pruned_net_on_digits() -> None:
    from bayesprune.data import load_digits, loader
    from bayesprune.train import evaluate

    splits = load_digits(seed=0)
    net = lenet_300_100(in_features=64)
    small = prune_module(
        net, {"1": torch.arange(300) < 60, "3": torch.arange(100) < 20}, torch.zeros(1, 64)
    )
    history = finetune(
        small, loader(splits.train, 64, seed=0), epochs=10, lr=3e-3, progress=False, seed=0
    )
    assert len(history.epoch_loss) == 10 and history.epoch_loss[-1] < history.epoch_loss[0]
    assert evaluate(small, loader(splits.test, 256, shuffle=False)) > 0.8


def test_public_names_are_exported() -> None:
    for name in (
        "prune",
        "prune_module",
        "compression_report",
        "finetune",
        "save_pruned",
        "load_pruned",
    ):
        assert name in bp.__all__ and callable(getattr(bp, name))


def test_zero_masked_clears_rows_and_only_the_directly_following_batchnorm() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 3, 3), nn.ReLU(), nn.BatchNorm2d(3),
    )  # fmt: skip
    mask = torch.tensor([1, 0, 1]).bool()
    z = zero_masked(net, {"0": mask, "3": mask})
    for i in (0, 3):
        assert z[i].weight[1].abs().sum() == 0 and z[i].bias[1] == 0
        assert torch.equal(z[i].weight[mask], net[i].weight[mask])
    assert z[1].weight[1] == 0 and z[1].bias[1] == 0 and z[1].weight[0] == net[1].weight[0]
    assert torch.equal(z[5].weight, net[5].weight)  # not fed directly by a layer: untouched
    assert net[0].weight[1].abs().sum() > 0  # the input module is not modified


def test_several_inputs_given_as_a_tuple() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = nn.Linear(3, 6), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x, y):
            return self.fc(F.relu(self.a(x)) + F.relu(self.b(y)))

    net = TwoInputs()
    masks = {"a": torch.arange(6) < 2, "b": (torch.arange(6) > 0) & (torch.arange(6) < 3)}
    example = (torch.randn(2, 3), torch.randn(2, 4))
    small = prune_module(net, masks, example).eval()
    assert small.a.out_features == small.b.out_features == small.fc.in_features == 3
    x, y = torch.randn(5, 3), torch.randn(5, 4)
    with torch.no_grad():
        assert torch.allclose(small(x, y), zero_masked(net, masks)(x, y), atol=1e-6)


def test_end_to_end_with_the_bayesian_core() -> None:
    """bayesianize -> fit -> prune gives the posterior-mean net with the pruned nodes removed."""
    if not hasattr(bp, "bayesianize"):
        pytest.skip("the Bayesian core (bp.bayesianize, issue 3) is not in this checkout yet")
    from bayesprune.data import load_digits, loader

    splits = load_digits(seed=0)
    bnet = bp.bayesianize(lenet_300_100(in_features=64), prior=bp.priors.GroupHorseshoe())
    bp.fit(bnet, loader(splits.train, 64, seed=0), epochs=5, lr=1e-2, progress=False, seed=0)
    pips = bnet.inclusion_probs()
    assert set(pips) == {"1", "3", "5"}
    small = bp.prune(bnet, keep=0.25)
    # the 100 hidden nodes (of 400) with the highest PIPs, ranked across layers by their log-odds
    # (PIPs that saturate at 1.0 still differ there); the output layer is never pruned nor masked,
    # whatever its PIPs
    logits = bnet.inclusion_logits()
    hidden = torch.cat([logits["1"], logits["3"]])
    top = torch.zeros(400, dtype=torch.bool)
    top[torch.argsort(-hidden, stable=True)[:100]] = True
    masks = {"1": top[:300], "3": top[300:]}
    assert small[1].out_features == max(1, int(masks["1"].sum()))
    assert small[3].out_features == max(1, int(masks["3"].sum()))
    assert small[5].out_features == 10 and bool((small[5].weight.abs().sum(1) > 0).all())
    plan = _quiet(plan_pruning, bnet.mean_module(), masks, torch.zeros(1, 64), scores=logits)
    x = splits.test.tensors[0][:64]
    with torch.no_grad():
        ref = bnet.mean_module(plan.masks).eval()(x)
        assert torch.allclose(small.eval()(x), ref, atol=1e-5)


def test_batchnorm_sharing_its_layer_output_is_not_treated_as_direct() -> None:
    class Tap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x)
            return self.fc((self.bn(h) + h).mean((2, 3)))

    net = Tap()
    _randomize_bn(net, torch.Generator().manual_seed(6))
    mask = torch.tensor([1, 0, 1, 0]).bool()
    assert torch.equal(zero_masked(net, {"conv": mask}).bn.weight, net.bn.weight)
    with pytest.warns(UserWarning, match="BatchNorm 'bn' that does not directly follow"):
        small = _assert_exact(net, {"conv": mask}, torch.randn(2, 1, 5, 5))
    assert small.conv.out_channels == 4


#: one prior per reference net, so that every prior family meets a conv net and a residual one
BAYES_PRIORS = {
    "lenet_300_100": lambda: bp.priors.SpikeAndSlab(level="node"),
    "lenet5_caffe": lambda: bp.priors.GroupHorseshoe(),
    "vgg_small": lambda: bp.priors.SpikeAndSlab(level="node", slab="horseshoe"),
    "resnet20": lambda: bp.priors.GroupHorseshoe(),
    "resnet18": lambda: bp.priors.SpikeAndSlab(level="node", slab="group_lasso"),
}


@pytest.mark.parametrize("name", list(REFERENCE_NETS))
def test_bayesian_reference_nets_prune_to_their_masked_mean_network(name: str) -> None:
    """The pruned net equals the Bayesian net with posterior-mean weights and the pruned nodes
    masked to zero (issue 4), on the five reference nets; the BatchNorm rule of the pruner and of
    BayesianModule.mean_module must agree on the residual ones."""
    if not hasattr(bp, "bayesianize"):
        pytest.skip("the Bayesian core (bp.bayesianize, issue 3) is not in this checkout yet")
    build, shape = REFERENCE_NETS[name]
    gen = torch.Generator().manual_seed(7)
    net = build()
    _randomize_bn(net, gen)
    bnet = bp.bayesianize(net, prior=BAYES_PRIORS[name]())
    with torch.no_grad():  # a posterior that is not the initial one: scales and gates move
        for p in bnet.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    masks = _random_masks(net, 0.5, gen)
    x = torch.randn(shape, generator=gen)
    small = _quiet(prune, bnet, masks=masks, example_input=x)
    assert count_params(small) < 0.8 * count_params(net)
    plan = _quiet(plan_pruning, bnet.mean_module(), masks, x)
    with torch.no_grad():
        ref = bnet.mean_module(plan.masks).eval()(x)
        assert torch.allclose(small.eval()(x), ref, atol=1e-5)
        # the masks matter: the unmasked mean network differs
        assert not torch.allclose(bnet.mean_module().eval()(x), ref, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# min_nodes=0: a layer that loses every node goes with its branch
# ------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.Conv2d(3, 4, (3, 5), stride=(2, 3), padding=(2, 0), dilation=(1, 2)),
        nn.Conv2d(3, 4, 4, padding="same"),
        nn.Conv2d(3, 4, 5, padding="valid", dilation=2),
        nn.Conv1d(3, 4, 5, stride=3, padding=4),
        nn.Conv1d(3, 4, 2, padding="same", padding_mode="circular"),
    ],
    ids=str,
)
def test_constant_layer_outputs_the_shape_of_the_layer_it_replaces(conv: nn.Module) -> None:
    x = torch.randn(2, 3, *([17] * (conv.weight.dim() - 2)))
    value = torch.randn(4)
    out = ConstantLayer(conv, value)(x)
    assert out.shape == conv(x).shape
    # a zero input gives the bias at every position, as the convolution itself does
    conv.bias.data.copy_(value)
    assert torch.allclose(out, conv(torch.zeros_like(x)))
    assert RemovedLayer(conv, 3)(x).shape == (2, 1, *conv(x).shape[2:])


def test_a_resnet_block_switched_off_becomes_its_shortcut_plus_a_constant(tmp_path) -> None:
    gen = torch.Generator().manual_seed(3)
    net = resnet20()
    _randomize_bn(net, gen)
    off = torch.zeros(32, dtype=torch.bool)
    masks = {"layer2.0.conv1": off, "layer2.2.conv1": off, "layer1.0.conv1": torch.arange(16) < 5}
    x = torch.randn(3, 1, 28, 28, generator=gen)
    with pytest.warns(UserWarning, match=r"'layer2\.2\.conv1'.*removed.*'layer2\.2\.conv2'"):
        small = _assert_exact(net, masks, x, min_nodes=0)
    for block in (small.layer2[0], small.layer2[2]):  # block 0 has a strided conv1
        assert isinstance(block.conv1, RemovedLayer) and isinstance(block.conv2, ConstantLayer)
        assert isinstance(block.bn1, nn.Identity) and isinstance(block.bn2, nn.Identity)
    assert small.layer1[0].conv1.out_channels == 5
    # exact at other batch and image sizes too (the constant follows the positions)
    ref = zero_masked(net, masks).eval()
    for shape in ((1, 1, 28, 28), (2, 1, 33, 29)):
        z = torch.randn(shape, generator=gen)
        with torch.no_grad():
            assert (small(z) - ref(z)).abs().max() <= 1e-5
    # what is left of the two blocks: one constant per channel (and block 0's 1x1 shortcut)
    assert count_params(small.layer2[2]) == 32
    assert count_params(small.layer2[0]) == 32 + count_params(net.layer2[0].shortcut)
    rep = bp.compression_report(net, small, x[:1], batch_sizes=())
    kinds = {s.name: s.kind for s in rep.layers}
    assert kinds["layer2.2.conv1"] == "Conv2d (removed)"
    assert kinds["layer2.2.bn1"] == "BatchNorm2d (removed)"
    assert kinds["layer2.2.conv2"] == "Conv2d (constant)"
    assert kinds["layer2.2.bn2"] == "BatchNorm2d (folded)"
    assert "-32-0-32-" in architecture_string(small)
    # saved and reloaded without the class knowing the new modules
    bp.save_pruned(small, tmp_path / "small.safetensors")
    back = bp.load_pruned(tmp_path / "small.safetensors", resnet20).eval()
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    # still a plain, traceable, trainable network
    torch.fx.symbolic_trace(small)
    folded = bp.fold_batchnorm(small, example_input=x)
    with torch.no_grad():
        assert (folded(x) - small(x)).abs().max() <= 1e-4
    small.train()
    small(x).sum().backward()
    assert small.layer2[2].conv2.value.grad is not None


def test_a_layer_that_cannot_go_keeps_its_best_node_and_says_why() -> None:
    net = resnet20()
    x = torch.randn(2, 1, 28, 28)
    # the last conv of a block writes into the residual stream, whose channels others keep
    masks = {"layer1.1.conv2": torch.zeros(16, dtype=torch.bool)}
    scores = {"layer1.1.conv2": torch.arange(16.0)}
    with pytest.warns(UserWarning, match=r"'layer1\.1\.conv2'.*cannot go.*addition ties"):
        plan = plan_pruning(net, masks, x, scores=scores, min_nodes=0)
    assert plan.masks["layer1.1.conv2"].nonzero().flatten().tolist() == [15]
    assert not plan.removed and not plan.constant

    # an emptied layer whose zeros are concatenated with live channels cannot go either
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))

    with pytest.warns(UserWarning, match=r"'a'.*cannot go.*cat"):
        plan = plan_pruning(
            Cat(), {"a": torch.zeros(3, dtype=torch.bool)}, torch.randn(2, 4), min_nodes=0
        )
    assert int(plan.masks["a"].sum()) == 1


def test_min_nodes_zero_on_a_chain_makes_the_rest_constant_and_stays_exact() -> None:
    net = lenet_300_100(in_features=64).eval()
    masks = {"1": torch.zeros(300, dtype=torch.bool)}
    with pytest.warns(UserWarning, match=r"\['1'\].*\['3'\] now output"):
        small = _assert_exact(net, masks, torch.randn(4, 64), min_nodes=0)
    assert isinstance(small[1], RemovedLayer) and isinstance(small[3], ConstantLayer)
    assert architecture_string(small) == "64-0-100"
    out = small(torch.randn(5, 64))
    assert torch.allclose(out, out[:1].expand(5, -1))  # what the masked network computes


def test_a_bayesian_resnet20_block_switched_off_goes_with_min_nodes_zero() -> None:
    gen = torch.Generator().manual_seed(8)
    net = resnet20()
    _randomize_bn(net, gen)
    bnet = bp.bayesianize(net, prior=bp.priors.SpikeAndSlab(level="node"))
    masks = {"layer3.1.conv1": torch.zeros(64, dtype=torch.bool)}
    x = torch.randn(2, 1, 28, 28, generator=gen)
    small = _quiet(prune, bnet, masks=masks, example_input=x, min_nodes=0)
    assert isinstance(small.layer3[1].conv2, ConstantLayer)
    with torch.no_grad():
        ref = bnet.mean_module(masks).eval()(x)
        assert torch.allclose(small.eval()(x), ref, atol=1e-5)


@pytest.mark.parametrize("build", [torchvision.models.resnet18, torchvision.models.resnet50])
def test_torchvision_blocks_switched_off_go_exactly(build) -> None:
    """Basic and bottleneck blocks, one of them with a downsampling shortcut."""
    gen = torch.Generator().manual_seed(5)
    net = build(weights=None, num_classes=10).eval()
    _randomize_bn(net, gen)
    masks = {
        p: torch.zeros(net.get_submodule(p).out_channels, dtype=torch.bool)
        for p in ("layer2.1.conv1", "layer3.0.conv1")
    }
    x = torch.randn(2, 3, 64, 64, generator=gen)
    small = _quiet(prune_module, net, masks, x, min_nodes=0).eval()
    for block in (small.layer2[1], small.layer3[0]):
        assert isinstance(block.conv1, RemovedLayer) and isinstance(block.conv2, ConstantLayer)
    with torch.no_grad():
        ref = zero_masked(net, masks).eval()(x)
        # float32 rounding grows with the output's scale (randomised BatchNorms: outputs ~ 10-100)
        assert (small(x) - ref).abs().max() <= 1e-6 * (1 + ref.abs().max())


class _AuxHeadNet(nn.Module):
    """Like GoogLeNet: an auxiliary head that reads a hidden layer in training mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8)
        self.c2, self.aux, self.head = nn.Conv2d(8, 4, 3), nn.Conv2d(8, 2, 1), nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        out = self.head(self.c2(h).mean((2, 3)))
        if self.training:
            return out, self.aux(h).mean((2, 3))
        return out


def test_a_head_used_in_training_mode_only_is_pruned_too() -> None:
    net = _AuxHeadNet().eval()  # pruned from eval mode, where the head does not run
    x = torch.randn(2, 1, 8, 8)
    small = bp.prune(net, masks={"c1": torch.arange(8) < 3}, example_input=x)
    assert small.c1.out_channels == 3 and small.aux.in_channels == 3
    out, aux = small.train()(x)  # fine-tuning needs the training-mode forward
    assert out.shape == (2, 3) and aux.shape == (2, 2)


def test_a_head_that_fails_on_the_example_in_training_mode_is_left_out_with_a_warning() -> None:
    net = _AuxHeadNet().eval()
    net.aux = nn.Conv2d(8, 2, 7)  # like Inception's: needs larger images than the example
    x = torch.randn(2, 1, 8, 8)  # eval mode runs on it, training mode does not (6x6 < 7x7)
    with pytest.warns(UserWarning, match=r"runs on example_input in eval mode but not in training"):
        small = bp.prune(net, masks={"c1": torch.arange(8) < 3}, example_input=x)
    assert small.c1.out_channels == 3
    torch.testing.assert_close(small(x), zero_masked(net, {"c1": torch.arange(8) < 3}).eval()(x))


class _LayerDropNet(nn.Module):
    """The LayerDrop idiom (fairseq, HF encoders): training mode skips blocks at random."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(4, 16), nn.Linear(16, 3)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(4)
        )

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            if self.training and random.random() < 0.5:
                continue
            x = x + b(x)
        return self.out(x)


def test_blocks_that_training_mode_skips_at_random_are_pruned_all_the_same() -> None:
    torch.manual_seed(0)
    net = _LayerDropNet().eval()
    inner = {f"blocks.{i}.0": torch.arange(32) < 16 for i in range(4)}
    stream = {
        "inp": torch.arange(16) < 8,
        **{f"blocks.{i}.2": torch.arange(16) < 8 for i in range(4)},
    }
    for seed in range(4):  # each seed drops other blocks from the training-mode trace
        random.seed(seed)
        small = _quiet(bp.prune, net, masks=inner, example_input=torch.randn(2, 4))
        assert [small.blocks[i][0].out_features for i in range(4)] == [16] * 4
        small = _quiet(bp.prune, net, masks=stream, example_input=torch.randn(2, 4))
        assert [small.blocks[i][0].in_features for i in range(4)] == [8] * 4


def test_prune_keeps_each_module_mode_and_the_global_random_state() -> None:
    net = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8),
        nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2),
    ).train()  # fmt: skip
    net[1].eval()  # a BatchNorm the user froze inside a training net
    x = torch.randn(3, 4)
    state = torch.random.get_rng_state()
    bp.prune(net, masks={"0": torch.arange(8) < 4, "4": torch.arange(8) < 5}, example_input=x)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert net.training and not net[1].training and net[3].training


class _Versioned(nn.Module):
    """Like torchvision's MNASNet: refuses a state dict without its module version."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2, got {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_save_and_load_keep_module_versions(tmp_path) -> None:
    net = _Versioned()
    small = bp.prune(net, masks={"fc1": torch.arange(6) < 2}, example_input=torch.randn(1, 4))
    bp.save_pruned(small, tmp_path / "small.safetensors")
    back = bp.load_pruned(tmp_path / "small.safetensors", _Versioned)
    x = torch.randn(3, 4)
    torch.testing.assert_close(back(x), small(x))
    bnet = bp.bayesianize(_Versioned())
    bnet.save(tmp_path / "b.safetensors")
    loaded = bp.load(tmp_path / "b.safetensors", _Versioned())
    torch.testing.assert_close(loaded.net.fc1.weight_loc, bnet.net.fc1.weight_loc)


def test_zeroed_but_kept_nodes_are_reported_in_one_warning() -> None:
    # two grouped convolutions keep their channel groups whole, and attention reads its out_proj
    # weight directly: all three are named in one warning
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.dw1 = nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, groups=4)
            self.b, self.dw2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, groups=4)
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h = self.dw2(self.b(self.dw1(self.a(x)))).flatten(2).transpose(1, 2)
            return self.head(self.attn(h, h, h)[0].mean(1))

    net = Net().eval()
    half = torch.arange(4) < 2
    masks = {"a": half, "b": half, "attn.out_proj": half}
    with pytest.warns(UserWarning, match="only zeroed, not removed") as caught:
        small = bp.prune(net, masks=masks, example_input=torch.randn(2, 1, 6, 6))
    message = next(str(w.message) for w in caught if "only zeroed" in str(w.message))
    assert "'a'" in message and "'b'" in message and "'attn.out_proj'" in message
    assert "never calls as a module" in message
    assert small.a.out_channels == 4


def test_a_switched_off_layer_tied_to_kept_channels_is_not_reported_as_empty() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.shortcut, self.head = nn.Conv2d(1, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv2(F.relu(self.conv1(x))) + self.shortcut(x)  # conv2 and shortcut tied
            return self.head(F.relu(h).mean((2, 3)))

    bnet = bp.bayesianize(Block(), prior=bp.priors.SpikeAndSlab(level="node"))
    bnet.num_data = 100  # as if fitted
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        bnet.net.shortcut.gate_logit.fill_(-20.0)  # the posterior switches the shortcut off
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = bp.prune(bnet, threshold=0.5, example_input=x)
    assert not any("switched off every node" in str(w.message) for w in caught)
    assert small.shortcut.out_channels == 4  # kept: conv2 keeps the channels they share
    with torch.no_grad():
        bnet.net.conv2.gate_logit.fill_(-20.0)  # now the whole group is off
    with pytest.warns(
        UserWarning, match=r"switched off every node of layer\(s\) \['conv2', 'shortcut'\]"
    ):
        bp.prune(bnet, threshold=0.5, example_input=x)


def test_batchnorm_without_affine_parameters_after_a_pruned_conv_is_exact() -> None:
    # a masked channel used to leave -running_mean / std behind the BatchNorm, and the only way out
    # was verify=False (a wrong net); now the masked channel is zero after it, as with affine ones
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    )  # fmt: skip
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    net.eval()
    keep = torch.tensor([True, False, True, False])
    small = _assert_exact(net, {"0": keep}, torch.zeros(1, 1, 8, 8))
    assert small[0].out_channels == 2 and small[1].num_features == 2 and small[3].in_channels == 2
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        masked = zero_masked(net, {"0": keep}).eval()
        h = masked[1](masked[0](x))
    assert torch.all(h[:, ~keep] == 0)  # the switched-off channels are exactly zero
    # the Bayesian path: gates act after the BatchNorm, and the pruned net matches the masked one
    bnet = bp.bayesianize(net)
    bnet.num_data = 10
    pruned = bp.prune(bnet, masks={"0": keep}, example_input=torch.zeros(1, 1, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(x), zero_masked(bnet.mean_module(), {"0": keep}).eval()(x)
        )


def test_a_dependency_graph_refuses_another_architecture() -> None:
    # same layers and shapes, other wiring: the graph of one must not prune the other
    from bayesprune.pruning import DependencyGraph

    class A(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.head = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    class B(A):
        def forward(self, x):
            return self.head(self.bn(torch.relu(self.conv(x))).mean((2, 3)))

    x = torch.zeros(1, 1, 6, 6)
    g = DependencyGraph(A(), x)
    g.check(A())  # another instance of the same architecture is fine
    with pytest.raises(ValueError, match="another architecture"):
        prune_module(B(), {"conv": torch.tensor([True, False, True, True])}, x, graph=g)
