"""bayesianize: coverage table rows, errors, estimators, the copy, shared layers, modes, dtypes.

The BayesianModule it returns is tested in tests/test_module.py, save / load in tests/test_io.py."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune.layers import BayesianConv1d, BayesianConv2d, BayesianLinear
from bayesprune.models import lenet5_caffe, lenet_300_100, resnet20


def _small_resnet() -> nn.Module:
    return resnet20(widths=(4, 8, 8))


# -- layer coverage table (one test per row) -----------------------------------------------------
def test_row_linear_becomes_bayesian() -> None:
    bnet = bp.bayesianize(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert isinstance(bnet.net[0], BayesianLinear) and isinstance(bnet.net[2], BayesianLinear)


def test_row_conv1d_becomes_bayesian() -> None:
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 2))
    bnet = bp.bayesianize(net)
    assert isinstance(bnet.net[0], BayesianConv1d)
    assert bnet(torch.randn(4, 2, 8)).shape == (4, 2)


def test_row_conv2d_becomes_bayesian() -> None:
    bnet = bp.bayesianize(lenet5_caffe())
    assert isinstance(bnet.net[0], BayesianConv2d) and isinstance(bnet.net[3], BayesianConv2d)


def test_row_batchnorm_stays_deterministic_and_the_gate_acts_after_it() -> None:
    bnet = bp.bayesianize(_small_resnet(), prior=bp.priors.SpikeAndSlab())
    assert type(bnet.net.bn1) is nn.BatchNorm2d
    assert bnet.gate_after["conv1"] == "bn1"
    assert bnet.gate_after["layer2.0.shortcut.0"] == "layer2.0.shortcut.1"
    with torch.no_grad():
        bnet.net.conv1.gate_logit[2] = -60.0
    bnet.train()
    # conv1 -> bn1 -> relu (used once): the gate acts after the ReLU, which follows the BatchNorm
    assert bnet.net.conv1.gate_after == "relu"
    assert bnet.net.layer1[0].conv2.gate_after == "layer1.0.bn2"  # its ReLU follows the addition
    h = {}
    bnet.net.relu.register_forward_hook(lambda m, i, o: h.setdefault("relu", o))
    bnet(torch.randn(8, 1, 28, 28))
    assert torch.equal(h["relu"][:, 2], torch.zeros_like(h["relu"][:, 2]))  # exactly zero
    assert bnet.net.bn1.weight.requires_grad  # a point estimate in the same optimizer


def test_gates_act_after_the_batchnorm_in_branches_that_only_one_mode_runs() -> None:
    class Aux(nn.Module):  # like GoogLeNet: a head that runs in training mode only
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.bn1 = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
            self.aux, self.aux_bn = nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.bn1(self.c1(x)))
            out = self.head(h.mean((2, 3)))
            return (out, self.aux_bn(self.aux(h)).mean((2, 3))) if self.training else out

    for mode in (True, False):
        bnet = bp.bayesianize(Aux().train(mode), prior=bp.priors.SpikeAndSlab())
        assert bnet.gate_after["c1"] == "bn1"
        assert bnet.gate_after["aux"] == "aux_bn"  # found in the training-mode graph only

    class SharedRelu(Aux):  # the aux head reuses the ReLU after bn1: only that point differs
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            h = self.relu(self.bn1(self.c1(x)))
            out = self.head(h.mean((2, 3)))
            return (out, self.relu(self.aux(h)).mean((2, 3))) if self.training else out

    bnet = bp.bayesianize(SharedRelu(), prior=bp.priors.SpikeAndSlab())
    assert bnet.gate_after["c1"] == "bn1"  # the BatchNorm point both modes agree on stays


def test_a_layer_called_twice_keeps_its_gate_at_its_output() -> None:
    class Shared(nn.Module):  # one conv, each call followed by a BatchNorm of its own
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn_a, self.bn_b = (
                nn.Conv2d(1, 4, 3),
                nn.BatchNorm2d(4),
                nn.BatchNorm2d(4),
            )
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            a = torch.relu(self.bn_a(self.conv(x))).mean((2, 3))
            b = torch.relu(self.bn_b(self.conv(x.flip(-1)))).mean((2, 3))
            return self.head(torch.cat([a, b], 1))

    with pytest.warns(UserWarning, match="conv is called more than once, and a BatchNorm"):
        bnet = bp.bayesianize(Shared(), prior=bp.priors.SpikeAndSlab())
    assert "conv" not in bnet.gate_after and bnet.net.conv.gate_after is None
    with torch.no_grad():
        bnet.net.conv.gate_logit.fill_(-60.0)  # every node off
    seen = []
    bnet.net.conv.register_forward_hook(lambda m, i, o: seen.append(o))
    bnet.train()
    bnet(torch.randn(8, 1, 6, 6))
    assert len(seen) == 2 and all(torch.equal(o, torch.zeros_like(o)) for o in seen)


def test_forward_keeps_the_networks_own_errors() -> None:
    class Buggy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            raise RuntimeError("a bug in the user's forward")

    with pytest.raises(RuntimeError, match="a bug in the user's forward"):
        bp.bayesianize(Buggy())(torch.zeros(2, 3))


def test_fit_does_not_guess_the_classes_from_the_last_registered_layer() -> None:
    class ScoredHead(nn.Module):  # the classifier is registered before a 1-output scorer
        def __init__(self) -> None:
            super().__init__()
            self.classifier, self.score = nn.Linear(4, 10), nn.Linear(4, 1)

        def forward(self, x):
            return self.classifier(x * torch.sigmoid(self.score(x)))

    bnet = bp.bayesianize(ScoredHead())
    data = [(torch.randn(8, 4), torch.arange(8))]  # labels up to 7 of 10 classes
    bp.fit(bnet, data, epochs=1, num_data=8, progress=False)
    with pytest.raises(ValueError, match=r"indices in \[0, 10\).*from 5 to 12"):
        bp.fit(bnet, [(torch.randn(8, 4), torch.arange(8) + 5)], num_data=8, progress=False)


def test_row_activations_pooling_flatten_dropout_are_deterministic() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.1),
        nn.Flatten(),
        nn.Linear(4 * 13 * 13, 3),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these may warn
        bnet = bp.bayesianize(net)
    assert [type(m) for m in bnet.net][1:5] == [nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Flatten]


@pytest.mark.parametrize(
    "layer",
    [nn.Conv3d(1, 1, 1), nn.Embedding(5, 4), nn.LSTM(4, 4), nn.ConvTranspose2d(1, 1, 1)],
    ids=["conv3d", "embedding", "lstm", "convtranspose2d"],
)
def test_row_unsupported_layer_stays_deterministic_with_a_warning(layer: nn.Module) -> None:
    net = nn.ModuleDict({"odd": layer, "head": nn.Linear(4, 2)})
    own = ", ".join(p for p, _ in layer.named_parameters())
    with pytest.warns(
        UserWarning, match=rf"'odd' \({type(layer).__name__}: {own}\)\. Pass skip=\['odd'\]"
    ):
        bnet = bp.bayesianize(net, layers=None)
    assert bnet.net["odd"] is not layer and type(bnet.net["odd"]) is type(layer)
    assert isinstance(bnet.net["head"], BayesianLinear)


def test_row_layernorm_groupnorm_are_deterministic_point_estimates_without_a_warning() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5), nn.LayerNorm(5), nn.Linear(5, 3),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # supported as deterministic: no warning
        bnet = bp.bayesianize(net)
    assert type(bnet.net[1]) is nn.GroupNorm and type(bnet.net[5]) is nn.LayerNorm
    norm_params = [bnet.net[1].weight, bnet.net[5].bias]
    assert all(p.requires_grad for p in norm_params)
    assert {id(p) for p in norm_params} <= {id(p) for p in bnet.parameters()}  # in fit's optimizer
    data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))]
    before = [p.detach().clone() for p in norm_params]
    bp.fit(bnet, data, epochs=2, lr=1e-2, num_data=16, progress=False)
    assert all(not torch.equal(b, p) for b, p in zip(before, norm_params, strict=True))


def test_row_multihead_attention_is_bayesian_with_one_node_per_head() -> None:
    class Attend(nn.Module):
        def __init__(self, **kw) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True, **kw)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x)[0].mean(1))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no module stays deterministic, out_proj included
        bnet = bp.bayesianize(Attend())
    assert type(bnet.net.attn).__name__ == "BayesianMultiheadAttention"
    assert bnet.inclusion_probs()["attn"].shape == (2,)
    assert isinstance(bnet.net.head, BayesianLinear)
    assert bnet(torch.randn(3, 5, 4)).shape == (3, 2)
    # a configuration the twin does not handle stays deterministic, with the warning
    with pytest.warns(UserWarning, match=r"'attn' \(MultiheadAttention: in_proj_weight"):
        bnet = bp.bayesianize(Attend(add_bias_kv=True))
    assert type(bnet.net.attn) is nn.MultiheadAttention


def test_row_subclass_of_linear_is_not_assumed_compatible() -> None:
    class MyLinear(nn.Linear):
        pass

    net = nn.Sequential(MyLinear(3, 3), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="MyLinear"):
        bnet = bp.bayesianize(net)
    assert type(bnet.net[0]) is MyLinear


# -- errors ----------------------------------------------------------------------------------------
def test_unsupported_layer_requested_explicitly_is_an_error() -> None:
    net = nn.Sequential(nn.Conv3d(1, 1, 1), nn.Flatten(), nn.Linear(1, 2))
    with pytest.raises(
        TypeError,
        match=r"layer '0' is a Conv3d.*only nn.Linear, nn.Conv1d, nn.Conv2d and nn.MultiheadAttention",
    ):
        bp.bayesianize(net, layers=["0"])


def test_prior_dict_naming_an_unsupported_layer_is_an_error_that_names_the_dict() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    prior = {"0": bp.priors.Gaussian(), "1": bp.priors.Gaussian(), "2": bp.priors.Gaussian()}
    with pytest.raises(
        TypeError, match=r"layer '1' is a BatchNorm1d.*Leave it out of the prior dict"
    ):
        bp.bayesianize(net, prior=prior)
    with pytest.raises(KeyError, match=r"prior names modules that are not in the network: \['7'\]"):
        bp.bayesianize(net, prior={"7": bp.priors.Gaussian()})


def test_bad_layer_names_are_an_error_listing_valid_names() -> None:
    with pytest.raises(
        KeyError, match=r"layers names modules that are not in the network: \['9'\]"
    ):
        bp.bayesianize(lenet_300_100(), layers=["9"])
    with pytest.raises(KeyError, match="skip names modules"):
        bp.bayesianize(lenet_300_100(), skip=["fc9"])


def test_no_supported_layer_is_an_error() -> None:
    with pytest.raises(ValueError, match="no layer to make Bayesian"):
        bp.bayesianize(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no layer to make Bayesian"):
        bp.bayesianize(nn.Sequential(nn.Linear(2, 2)), skip=["0"])


def _draws_locally(bnet, x) -> dict[str, bool]:
    """Layer path -> whether its training forward pass on ``x`` used local reparameterization
    (spotted by the second, variance convolution / matmul: ``_op`` runs twice)."""
    calls = {}
    for path, layer in bnet.bayesian_layers.items():
        op = layer._op

        def counting(*a, path=path, op=op):
            calls[path] = calls.get(path, 0) + 1
            return op(*a)

        layer._op = counting
    bnet(x)
    for layer in bnet.bayesian_layers.values():
        del layer._op
    return {p: n == 2 for p, n in calls.items()}


def test_auto_reparam_is_local_for_linear_layers_and_shared_for_convolutions(tmp_path) -> None:
    x = torch.randn(2, 1, 28, 28)
    # the estimators differ only for Bayesian weights (point weights run one pass everywhere)
    gaussian = bp.priors.SpikeAndSlab(weights="gaussian")
    bnet = bp.bayesianize(_small_resnet(), gaussian, reparam="auto")
    local = _draws_locally(bnet, x)
    assert local["fc"] and not local["conv1"] and not local["layer2.0.shortcut.0"]
    assert sum(local.values()) == 1
    bnet.save(tmp_path / "b.safetensors")
    back = bp.load(tmp_path / "b.safetensors", _small_resnet())
    assert back.reparam == "auto" and _draws_locally(back, x) == local
    bnet.set_reparam("local")
    assert all(_draws_locally(bnet, x).values())
    bnet.set_reparam("shared")
    assert not any(_draws_locally(bnet, x).values())
    # a Linear layer applied to a sequence shares its weights across positions: one draw
    seq = bp.bayesianize(
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), gaussian, reparam="auto"
    )
    assert _draws_locally(seq, torch.randn(5, 3)) == {"0": True, "2": True}
    assert _draws_locally(seq, torch.randn(5, 7, 3)) == {"0": False, "2": False}


def test_bad_arguments_are_errors() -> None:
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module"):
        bp.bayesianize("lenet")
    with pytest.raises(TypeError, match=r"bp\.priors\.SpikeAndSlab"):
        bp.bayesianize(lenet_300_100(), prior="spike")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        bp.bayesianize(lenet_300_100(), likelihood="poisson")
    with pytest.raises(ValueError, match="reparam must be"):
        bp.bayesianize(lenet_300_100(), reparam="flipout")
    with pytest.raises(ValueError, match=r"weight_sd must be one of \('per_weight', 'rank1'\)"):
        bp.bayesianize(lenet_300_100(), weight_sd="full")
    with pytest.raises(KeyError, match="no prior for Bayesian layers"):
        bp.bayesianize(lenet_300_100(), prior={"1": bp.priors.Gaussian()}, layers=["1", "3"])
    bnet = bp.bayesianize(lenet_300_100())
    with pytest.raises(TypeError, match="already contains Bayesian layers"):
        bp.bayesianize(bnet.net)


# -- the copy --------------------------------------------------------------------------------------
def test_net_is_not_mutated_and_posterior_means_start_at_its_weights() -> None:
    net = lenet_300_100(in_features=64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bnet = bp.bayesianize(net, prior=bp.priors.SpikeAndSlab())
    assert all(type(m) is not BayesianLinear for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    torch.testing.assert_close(bnet.net[1].weight_loc, net[1].weight)
    x = torch.randn(5, 64)
    torch.testing.assert_close(bnet(x, mode="mean"), net(x))


def test_a_container_with_a_parameter_of_its_own_is_named_with_it() -> None:
    # like torchvision's ViT encoder: a position embedding of its own, Linear layers inside (which
    # become Bayesian), and an attention module inside whose weights stay deterministic
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 3, 4))
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
            self.mlp = nn.Linear(4, 4)

        def forward(self, x):
            x = x + self.pos
            return self.mlp(self.attn(x, x, x)[0]).mean(1)

    net = nn.Sequential(Encoder(), nn.Linear(4, 2))
    with pytest.warns(UserWarning) as record:
        bnet = bp.bayesianize(net)
    messages = [str(w.message) for w in record if "point estimates" in str(w.message)]
    assert len(messages) == 1
    assert "'0' (Encoder: pos)" in messages[0]
    # the attention is Bayesian now (one gate per head), its out_proj part of it
    assert "skip=['0']" in messages[0] and "attn" not in messages[0]
    assert type(bnet.net[0].attn).__name__ == "BayesianMultiheadAttention"
    assert isinstance(bnet.net[0].mlp, BayesianLinear)


# ------------------------------------------------------------------------------------------------
# shared layers, modes, dtypes, frozen parameters: refused or kept, never silently changed
# ------------------------------------------------------------------------------------------------


class _TwoNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a  # one module under two attribute names
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


class _TiedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.b.weight = self.a.weight  # one Parameter in two layers

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def test_shared_layers_and_tied_weights_are_refused_with_a_fix() -> None:
    with pytest.raises(ValueError, match=r"registered under 2 names \['a', 'b'\].*skip=\['a'\]"):
        bp.bayesianize(_TwoNames())
    with pytest.raises(ValueError, match=r"shared with \['b.weight'\] \(tied weights\)"):
        bp.bayesianize(_TiedWeight())
    # the advice works: kept deterministic, the tie survives and the net is what it was
    net = _TiedWeight()
    bnet = bp.bayesianize(net, skip=["a", "b"])
    assert sorted(bnet.bayesian_layers) == ["out"]
    x = torch.randn(5, 8)
    plain = bnet.mean_module()
    assert plain.a.weight is plain.b.weight
    torch.testing.assert_close(plain(x), net(x))


def test_modes_dtype_and_frozen_layers() -> None:
    net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)).eval()
    assert not bp.bayesianize(net).training  # an eval-mode net gives an eval-mode wrapper
    with pytest.raises(TypeError, match=r"float32 networks.*torch.float64.*net.float\(\)"):
        bp.bayesianize(copy.deepcopy(net).double())
    frozen = copy.deepcopy(net)
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"layers \['0'\] have frozen parameters.*skip=\['0'\]"):
        bp.bayesianize(frozen)
    # a frozen deterministic layer (here the BatchNorm) stays frozen through fit, and fit gives
    # the modules back in the modes it found them in
    net = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    net[1].requires_grad_(False)
    bnet = bp.bayesianize(net)
    bnet.eval()
    w0 = bnet.net[1].weight.detach().clone()
    torch.manual_seed(0)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    bp.fit(bnet, DataLoader(TensorDataset(x, y), batch_size=32), epochs=1, progress=False)
    assert torch.equal(bnet.net[1].weight, w0) and not bnet.net[1].weight.requires_grad
    assert not any(m.training for m in bnet.modules())
    small = bp.prune(bnet, threshold=0.5, example_input=x[:1])
    assert not small.training and not any(m.training for m in small.modules())


def test_a_node_scale_before_an_affine_free_batchnorm_is_refused() -> None:
    # the horseshoe's node scale can act neither before such a BatchNorm (normalised away) nor
    # after it (the posterior-mean network could not hold it): refused, with what works instead
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                        nn.Flatten(), nn.Linear(64, 3))  # fmt: skip
    with pytest.raises(ValueError, match=r"affine=False.*BatchNorm\(affine=True\)"):
        bp.bayesianize(net, prior=bp.priors.GroupHorseshoe())
    bnet = bp.bayesianize(net)  # the default spike-and-slab gates: fine
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(bnet.mean_module().eval()(x), bnet.eval()(x, mode="mean"))
