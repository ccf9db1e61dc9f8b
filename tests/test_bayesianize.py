"""bayesianize / BayesianModule: coverage table rows, errors, PIPs, mean_module, Pyro model, save/load."""

from __future__ import annotations

import copy
import warnings

import pyro
import pytest
import torch
from pyro import poutine
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


def test_row_multihead_attention_stays_deterministic_with_a_warning() -> None:
    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x)[0].mean(1))

    with pytest.warns(UserWarning, match=r"'attn' \(MultiheadAttention: in_proj_weight"):
        bnet = bp.bayesianize(Attend())
    assert type(bnet.net.attn) is nn.MultiheadAttention
    assert isinstance(bnet.net.head, BayesianLinear)
    assert bnet(torch.randn(3, 5, 4)).shape == (3, 2)


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
        TypeError, match=r"layer '0' is a Conv3d.*only nn.Linear, nn.Conv1d and nn.Conv2d"
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


def test_predict_draws_exactly_and_restores_the_training_estimator() -> None:
    bnet = bp.bayesianize(_small_resnet())
    seen = {}

    def record(module, args, out):
        seen[module] = module.exact_draws

    hooks = [m.register_forward_hook(record) for m in bnet.bayesian_layers.values()]
    bnet.predict(torch.randn(2, 1, 28, 28), num_samples=2)
    for h in hooks:
        h.remove()
    assert len(seen) == len(bnet.bayesian_layers) and all(seen.values())
    assert not any(m.exact_draws for m in bnet.bayesian_layers.values())  # "local": restored
    bnet.set_reparam("auto")
    bnet.predict(torch.randn(2, 1, 28, 28), num_samples=1)
    assert all(m.exact_draws for m in bnet.bayesian_layers.values())  # "auto": restored too


@pytest.mark.parametrize(
    "prior",
    [
        bp.priors.Gaussian(),
        bp.priors.SpikeAndSlab(level="node"),
        bp.priors.SpikeAndSlab(level="weight"),
        bp.priors.GroupHorseshoe(),
        bp.priors.SpikeAndSlab(level="node", slab="horseshoe"),
    ],
    ids=lambda p: repr(p)[:30],
)
def test_predict_with_a_seed_is_one_fixed_function(prior) -> None:
    bnet = bp.bayesianize(_small_resnet(), prior=prior)
    x = torch.randn(6, 1, 28, 28)
    state = torch.get_rng_state()
    p = bnet.predict(x, num_samples=3, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone
    # the same draws whatever the batch: a part of the batch gets the same probabilities
    torch.testing.assert_close(bnet.predict(x[2:5], num_samples=3, seed=7), p[2:5])
    torch.testing.assert_close(bnet.predict(x, num_samples=3, seed=7), p)
    assert not torch.allclose(bnet.predict(x, num_samples=3, seed=8), p)
    # without a seed, convolution weights are drawn once per pass for the whole batch
    torch.manual_seed(0)
    q = bnet.predict(x, num_samples=3)
    torch.manual_seed(0)
    assert not torch.allclose(bnet.predict(x[2:5], num_samples=3), q[2:5])
    with pytest.raises(TypeError, match="seed must be an integer"):
        bnet.predict(x, seed=0.5)
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        bnet.predict(x, seed=2**64)


def test_predict_with_a_seed_reseeds_no_cuda_device(monkeypatch) -> None:
    # torch.manual_seed would also reseed every CUDA device (lazily, on a machine without one),
    # outside the CPU generator that predict forks and restores
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(s))
    bnet = bp.bayesianize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    bnet.predict(torch.randn(5, 4), num_samples=3, seed=0)
    assert calls == []


@pytest.mark.slow
def test_frozen_draws_have_the_posterior_predictive_distribution() -> None:
    # the seeded predictive averages whole guide draws, the default one per-example draws: both
    # estimate the same predictive, so with many draws they agree to Monte Carlo error
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4))
    bnet = bp.bayesianize(
        net, prior=bp.priors.SpikeAndSlab(level="node", prior_inclusion=0.5, weights="gaussian")
    )
    with torch.no_grad():
        for layer in bnet.bayesian_layers.values():
            layer.weight_log_scale.fill_(-1.0)  # wide posteriors, so that the draws matter
    x = torch.randn(2, 3)
    frozen = bnet.predict(x, num_samples=4000, seed=1)
    fresh = bnet.predict(x, num_samples=4000)
    spread = bnet.predict(x, num_samples=1, seed=2) - frozen
    assert spread.abs().max() > 0.05  # single draws differ from the mean: the test has power
    torch.testing.assert_close(frozen, fresh, atol=0.02, rtol=0)


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


# -- structure and posterior summaries --------------------------------------------------------------
def test_net_is_not_mutated_and_posterior_means_start_at_its_weights() -> None:
    net = lenet_300_100(in_features=64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bnet = bp.bayesianize(net, prior=bp.priors.SpikeAndSlab())
    assert all(type(m) is not BayesianLinear for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    torch.testing.assert_close(bnet.net[1].weight_loc, net[1].weight)
    x = torch.randn(5, 64)
    torch.testing.assert_close(bnet(x, mode="mean"), net(x))


def test_inclusion_probs_names_shapes_ranges_linear_and_conv() -> None:
    bnet = bp.bayesianize(lenet5_caffe(), prior=bp.priors.SpikeAndSlab(level="node"))
    pips = bnet.inclusion_probs()
    assert list(pips) == ["0", "3", "7", "9"]
    assert [tuple(p.shape) for p in pips.values()] == [(20,), (50,), (500,), (10,)]
    for p in pips.values():
        assert p.device.type == "cpu" and ((p >= 0) & (p <= 1)).all()
    names = dict(lenet5_caffe().named_modules())
    assert all(isinstance(names[k], (nn.Linear, nn.Conv2d)) for k in pips)
    ghs = bp.bayesianize(lenet5_caffe(), prior=bp.priors.GroupHorseshoe()).inclusion_probs()
    assert [tuple(p.shape) for p in ghs.values()] == [(20,), (50,), (500,), (10,)]
    assert bp.bayesianize(lenet5_caffe(), prior=bp.priors.Gaussian()).inclusion_probs() == {}
    w = bp.bayesianize(lenet5_caffe(), prior=bp.priors.SpikeAndSlab(level="weight"))
    assert w.inclusion_probs() == {} and w.weight_inclusion_probs()["0"].shape == (20, 1, 5, 5)


@pytest.mark.parametrize(
    "prior",
    [
        bp.priors.SpikeAndSlab(),
        bp.priors.GroupHorseshoe(),
        bp.priors.SpikeAndSlab(slab="horseshoe"),
    ],
    ids=["ss", "ghs", "ss-ghs"],
)
def test_mean_module_equals_the_bayesian_net_in_mean_mode(prior) -> None:
    bnet = bp.bayesianize(_small_resnet(), prior=prior)
    with torch.no_grad():  # move the posterior away from its initial state
        for layer in bnet.bayesian_layers.values():
            layer.weight_loc.mul_(1.1)
            for n, p in layer.named_parameters(recurse=False):
                if n.endswith("_loc") and not n.startswith(("weight", "bias")):
                    p.add_(0.3)
    bnet.eval()
    plain = bnet.mean_module().eval()
    assert not any(isinstance(m, pyro.nn.PyroModule) for m in plain.modules())
    assert type(plain) is type(_small_resnet())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), bnet(x, mode="mean"), atol=1e-4, rtol=1e-4)


def test_mean_module_masks_zero_rows_biases_and_following_batchnorm() -> None:
    bnet = bp.bayesianize(_small_resnet(), prior=bp.priors.SpikeAndSlab())
    keep = torch.ones(4, dtype=torch.bool)
    keep[1] = False
    m = bnet.mean_module({"conv1": keep, "fc": torch.tensor([True] * 9 + [False])})
    assert m.conv1.weight[1].abs().sum() == 0
    assert m.bn1.weight[1] == 0 and m.bn1.bias[1] == 0
    assert m.fc.weight[9].abs().sum() == 0 and m.fc.bias[9] == 0
    assert m.conv1.weight[0].abs().sum() > 0
    with pytest.raises(KeyError, match="not Bayesian layers"):
        bnet.mean_module({"nope": keep})
    with pytest.raises(ValueError, match="one entry per output node"):
        bnet.mean_module({"conv1": torch.ones(3, dtype=torch.bool)})


def test_predict_gives_probabilities() -> None:
    bnet = bp.bayesianize(lenet_300_100(in_features=64))
    p = bnet.predict(torch.randn(7, 64), num_samples=5)
    assert p.shape == (7, 10)
    torch.testing.assert_close(p.sum(-1), torch.ones(7))
    assert bnet.training  # restored
    with pytest.raises(ValueError, match="num_samples"):
        bnet.predict(torch.randn(2, 64), num_samples=0)
    with pytest.raises(TypeError, match=r"inputs are torch\.float64.*x\.to\(torch\.float32\)"):
        bnet.predict(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(
        ValueError,
        match=r"running Sequential on inputs of shape \(2, 63\) failed .*with the batch first",
    ):
        bnet.predict(torch.randn(2, 63))
    with pytest.raises(
        ValueError,
        match=r"running Sequential on (the first batch|inputs) of shape \(4, 63\) failed",
    ):
        bp.fit(bnet, [(torch.randn(4, 63), torch.zeros(4).long())], num_data=4, progress=False)
    with pytest.raises(TypeError, match=r"labels must be integers.*y\.long\(\)"):
        bp.fit(bnet, [(torch.randn(4, 64), torch.zeros(4))], num_data=4, progress=False)
    with pytest.raises(TypeError, match=r"inputs are a ndarray, not a torch\.Tensor"):
        bnet.predict(torch.randn(2, 64).numpy())
    with pytest.raises(TypeError, match=r"inputs are torch\.float64"):
        bnet(torch.randn(2, 64, dtype=torch.float64))  # the forward pass names it too
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes") as info:
        bnet(torch.randn(2, 63))  # torch's own error, with a note on the inputs
    assert "was run on inputs of shape (2, 63)" in info.value.__notes__[0]
    with pytest.raises(TypeError, match=r"inputs are a ndarray, not a torch\.Tensor"):
        bnet(torch.randn(2, 64).numpy())
    # a target problem is named as one, not blamed on the inputs
    with pytest.raises(ValueError, match=r"got shape \(4, 1\): pass y\.squeeze\(1\)"):
        bp.fit(bnet, [(torch.randn(4, 64), torch.zeros(4, 1).long())], num_data=4, progress=False)
    with pytest.raises(ValueError, match=r"got shape \(4, 3\): pass y\.argmax\(1\)"):
        bp.fit(bnet, [(torch.randn(4, 64), torch.zeros(4, 3).long())], num_data=4, progress=False)
    with pytest.raises(ValueError, match="3 targets for a batch of 4 inputs"):
        bp.fit(bnet, [(torch.randn(4, 64), torch.zeros(3).long())], num_data=4, progress=False)


def test_regression_prediction_separates_epistemic_and_aleatoric() -> None:
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    bnet = bp.bayesianize(net, prior=bp.priors.Gaussian(), likelihood="gaussian", noise_scale=0.5)
    with torch.no_grad():
        for layer in bnet.bayesian_layers.values():
            layer.weight_log_scale.fill_(-1.0)
    pred = bnet.predict_regression(torch.randn(6, 3), num_samples=50)
    assert pred.mean.shape == (6,)
    torch.testing.assert_close(pred.aleatoric, torch.full((6,), 0.25))
    assert (pred.epistemic > 0).all()
    torch.testing.assert_close(pred.variance, pred.epistemic + pred.aleatoric)
    with pytest.raises(ValueError, match="likelihood='gaussian'"):
        bp.bayesianize(lenet_300_100()).predict_regression(torch.randn(2, 784))
    data = [(torch.randn(6, 3), torch.randn(6))]
    with pytest.raises(ValueError, match="'gaussian' likelihood; for regression use"):
        bp.evaluate(bnet, data)  # an argmax "accuracy" of a regression would be silently 0
    with pytest.raises(ValueError, match="needs a categorical"):
        bp.fit(bnet, data, num_data=6, val_loader=data, progress=False)


def test_learned_noise_scale_moves_to_the_true_noise() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 2)
    y = x @ torch.tensor([1.5, -2.0]) + 0.3 * torch.randn(512)
    bnet = bp.bayesianize(nn.Linear(2, 1), prior=bp.priors.Gaussian(), likelihood="gaussian")
    assert bnet.noise_scale.item() == pytest.approx(1.0)  # the learned scale starts at 1
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=64, shuffle=True)
    bp.fit(bnet, loader, epochs=60, lr=0.05, progress=False, seed=0)
    assert 0.25 < bnet.noise_scale.item() < 0.4


# -- the genuine Pyro model --------------------------------------------------------------------------
def test_trace_site_names_are_module_paths_and_the_plate_scales_by_n_over_b() -> None:
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    # point weights (the default) are parameters of the model: only the gates are sample sites
    point = bp.bayesianize(_small_resnet(), prior=bp.priors.SpikeAndSlab())
    point.num_data = 1000
    tr = poutine.trace(point.model).get_trace(x, y)
    sites = {n for n, s in tr.nodes.items() if s["type"] == "sample" and n not in ("obs", "data")}
    assert sites == {f"{p}.gate" for p in point.bayesian_layers}
    bnet = bp.bayesianize(_small_resnet(), prior=bp.priors.SpikeAndSlab(weights="gaussian"))
    bnet.num_data = 1000
    tr = poutine.trace(bnet.model).get_trace(x, y)
    layers = set(bnet.bayesian_layers)
    sites = [n for n, s in tr.nodes.items() if s["type"] == "sample" and n not in ("obs", "data")]
    assert {n.rsplit(".", 1)[0] for n in sites} == layers
    assert {"conv1.gate", "conv1.weight", "layer2.0.shortcut.0.gate", "fc.bias"} <= set(sites)
    assert set(bnet.inclusion_probs()) == layers
    obs = tr.nodes["obs"]
    assert obs["scale"] == pytest.approx(1000 / 4)
    assert tr.nodes["data"]["value"].shape == (4,)
    # more examples than the training set (an evaluation set): still scaled to N, not an error
    bnet.num_data = 3
    tr = poutine.trace(bnet.model).get_trace(x, y)
    assert tr.nodes["obs"]["scale"] == pytest.approx(3 / 4)
    assert tr.nodes["data"]["value"].shape == (4,)


def test_predictive_and_guide_trace_work() -> None:
    pyro.clear_param_store()
    bnet = bp.bayesianize(lenet_300_100(in_features=16), prior=bp.priors.GroupHorseshoe())
    x = torch.randn(3, 16)
    samples = pyro.infer.Predictive(bnet.model, guide=bnet.guide, num_samples=4)(x)
    assert samples["obs"].shape == (4, 3)
    assert samples["1.scale"].reshape(4, -1).shape == (4, 300)
    gtr = poutine.trace(bnet.guide).get_trace(x)
    params = [n for n, s in gtr.nodes.items() if s["type"] == "param"]
    assert "bnet.net.1.weight_loc" in params
    assert len(pyro.get_param_store()) == 0  # the module owns its parameters


# -- persistence -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prior", "weight_sd"),
    [
        (bp.priors.SpikeAndSlab(prior_inclusion="theory"), "per_weight"),
        (bp.priors.GroupHorseshoe(0.3), "per_weight"),
        (bp.priors.SpikeAndSlab(prior_inclusion="theory"), "rank1"),
    ],
)
def test_save_load_round_trip(tmp_path, prior, weight_sd) -> None:
    bnet = bp.bayesianize(_small_resnet(), prior=prior, reparam="shared", weight_sd=weight_sd)
    with torch.no_grad():
        for p in bnet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    bnet.num_data = 123
    path = tmp_path / "b.safetensors"
    bnet.save(path)
    back = bp.load(path, _small_resnet())
    assert back.num_data == 123 and back.priors == bnet.priors and back.reparam == "shared"
    assert back.weight_sd == weight_sd
    for (k, a), (k2, b) in zip(bnet.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    for k, p in bnet.inclusion_probs().items():
        torch.testing.assert_close(back.inclusion_probs()[k], p, atol=0, rtol=0)
    bnet.eval()
    back.eval()
    x = torch.randn(2, 1, 28, 28)
    torch.manual_seed(5)
    a = bnet.predict(x, num_samples=3)
    torch.manual_seed(5)
    torch.testing.assert_close(back.predict(x, num_samples=3), a)


def test_load_errors(tmp_path) -> None:
    bnet = bp.bayesianize(lenet_300_100(in_features=16))
    path = tmp_path / "b.safetensors"
    bnet.save(path)
    with pytest.raises(ValueError, match="does not match the architecture"):
        bp.load(path, lenet_300_100(in_features=32))
    with pytest.raises(FileNotFoundError):
        bp.load(tmp_path / "missing.safetensors", lenet_300_100())
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        bp.load(damaged, lenet_300_100(in_features=16))
    with pytest.raises(FileNotFoundError, match=r"folder .*nope does not exist"):
        bnet.save(tmp_path / "nope" / "b.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    # a group-horseshoe file saved before the PIP reference existed cannot be read back silently
    ghs = bp.bayesianize(lenet_300_100(in_features=16), prior=bp.priors.GroupHorseshoe())
    ghs.save(path)
    state = {k: v for k, v in load_file(str(path)).items() if not k.endswith("hs_reference")}
    save_file(state, str(path), metadata=safe_open(str(path), "pt").metadata())
    with pytest.raises(ValueError, match=r"no 'hs_reference'.*fit the network again"):
        bp.load(path, lenet_300_100(in_features=16))

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a bayesprune BayesianModule file"):
        bp.load(tmp_path / "other.safetensors", lenet_300_100())


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
    assert "'0.attn' (MultiheadAttention: in_proj_weight, in_proj_bias)" in messages[0]
    # the attention's out_proj, a Linear subclass that attention reads directly, stays too
    assert "skip=['0', '0.attn', '0.attn.out_proj']" in messages[0]
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
