"""BayesianModule (bayesprune/module.py): predict, PIPs, mean_module, the Pyro model and guide."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from torch import nn

import bayesprune as bp
from bayesprune.models import lenet5_caffe, lenet_300_100, resnet20


def _small_resnet() -> nn.Module:
    return resnet20(widths=(4, 8, 8))


# -- predict ---------------------------------------------------------------------------------------
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


# -- posterior summaries ---------------------------------------------------------------------------
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


def test_the_natural_step_gates_are_declared_by_the_prior() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    bnet = bp.bayesianize(net)  # point-weight spike-and-slab: every layer's gate logits
    assert [id(p) for p in bnet.gate_parameters()] == [
        id(bnet.net[0].gate_logit),
        id(bnet.net[2].gate_logit),
    ]
    for prior in (
        bp.priors.SpikeAndSlab(level="node", weights="gaussian"),
        bp.priors.GroupHorseshoe(),
    ):
        assert bp.bayesianize(net, prior=prior).gate_parameters() == []


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "100", None])
def test_set_num_data_refuses_what_is_not_a_training_set_size(bad) -> None:
    """An error that names the problem, and the module and its priors left as they were."""
    bnet = bp.bayesianize(
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)),
        bp.priors.SpikeAndSlab(price_per_example=1e-3),
    )
    before = dict(bnet.priors)
    with pytest.raises(ValueError, match="num_data must be a positive integer"):
        bnet.set_num_data(bad)
    assert bnet.num_data is None and bnet.priors == before
    assert all(layer.prior.num_data is None for layer in bnet.bayesian_layers.values())
    bnet.set_num_data(100)
    assert bnet.num_data == 100 and {p.num_data for p in bnet.priors.values()} == {100}


def test_num_data_reads_back_from_a_module_pickled_before_it_was_a_property() -> None:
    """A BayesianModule pickled whole by an older version holds ``num_data`` as a plain
    attribute; unpickling moves it, and a numpy integer is a training-set size too."""
    import pickle

    import numpy as np

    bnet = bp.bayesianize(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    bnet.num_data = np.int64(250)
    assert bnet.num_data == 250 and type(bnet.num_data) is int
    state = bnet.__dict__.copy()
    state["num_data"] = state.pop("_num_data")  # as the older attribute
    old = bp.BayesianModule.__new__(bp.BayesianModule)
    old.__setstate__(state)
    assert old.num_data == 250 and "num_data" not in old.__dict__
    assert pickle.loads(pickle.dumps(bnet)).num_data == 250
