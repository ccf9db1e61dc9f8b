"""ArviZ conversion: variational draws with named layers and nodes, predictive groups, diagnostics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune.data import load_digits, loader
from bayesprune.models import lenet_300_100

az = pytest.importorskip("arviz")


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0, flatten=True)


@pytest.fixture(scope="module")
def fitted(digits):
    """A LeNet-300-100 on digits with a node spike-and-slab posterior, fitted briefly."""
    torch.manual_seed(0)
    net = lenet_300_100(in_features=64)
    bp.train(net, loader(digits.train, 64), epochs=2, progress=False, seed=0)
    bnet = bp.bayesianize(net, prior=bp.priors.SpikeAndSlab(level="node"))
    bp.fit(bnet, loader(digits.train, 64), epochs=2, progress=False, seed=0)
    return bnet


def _summary(idata, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant gates: NaN r_hat with a RuntimeWarning
        return az.summary(idata, **kw)


def test_summary_names_layers_and_nodes(fitted):
    idata = bp.to_arviz(fitted, num_samples=40)
    summary = _summary(idata)
    pips = fitted.inclusion_probs()
    expected = [f"{layer}.gate[{j}]" for layer, p in pips.items() for j in range(len(p))]
    assert list(summary.index) == expected
    assert idata.posterior["3.gate"].dims == ("chain", "draw", "3.node")
    assert idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"] == 40
    assert "variational" in idata.posterior.attrs["inference_method"]
    assert not hasattr(idata, "log_likelihood")


def test_gate_means_estimate_the_inclusion_probabilities(fitted):
    n = 400
    idata = bp.to_arviz(fitted, num_samples=n, seed=1)
    for layer, pip in fitted.inclusion_probs().items():
        mean = idata.posterior[f"{layer}.gate"].mean(("chain", "draw")).values
        p = pip.numpy()
        # Bernoulli Monte-Carlo error: 5 standard errors (plus a floor for p near 0 or 1)
        tol = 5 * np.sqrt(p * (1 - p) / n) + 2.0 / n
        assert np.all(np.abs(mean - p) <= tol), layer


def test_selected_weights_and_conv_dims(digits):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)
    )  # fmt: skip
    bnet = bp.bayesianize(net, prior=bp.priors.GroupHorseshoe())
    idata = bp.to_arviz(bnet, num_samples=8, weights=["0"])
    post = idata.posterior
    assert post["0.weight"].dims == ("chain", "draw", "0.node", "0.input", "0.kh", "0.kw")
    assert post["0.bias"].dims == ("chain", "draw", "0.node")
    assert "3.weight" not in post  # not selected
    # horseshoe: local and layer scales, and the derived node scale tau * lambda_j
    assert post["3.tau_a"].dims == ("chain", "draw")
    scale = np.sqrt(post["3.lambda_a"] * post["3.lambda_b"] * post["3.tau_a"] * post["3.tau_b"])
    np.testing.assert_allclose(post["3.scale"].values, scale.values, rtol=1e-5)
    assert "3.weight" in bp.to_arviz(bnet, num_samples=4, weights="all").posterior


def test_predictive_groups_loo_and_khat(fitted, digits):
    x, y = digits.val.tensors
    idata = bp.to_arviz(fitted, num_samples=120, data=loader(digits.val, 64, shuffle=False))
    for group in ("posterior_predictive", "log_likelihood", "observed_data", "sample_stats"):
        assert hasattr(idata, group), group
    ll = idata.log_likelihood["obs"]
    assert ll.dims == ("chain", "draw", "obs_id") and ll.sizes["obs_id"] == len(y)
    assert np.all(ll.values <= 0)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, y.numpy())
    pp = idata.posterior_predictive["obs"].values
    assert pp.min() >= 0 and pp.max() < 10
    # The variational predictive probability of the observed label, averaged over the draws,
    # agrees with bnet.predict (another Monte-Carlo estimate of the same quantity).
    p_draws = np.exp(ll.values).reshape(-1, len(y)).mean(0)
    p_pred = fitted.predict(x, num_samples=200)[torch.arange(len(y)), y].numpy()
    assert np.mean(np.abs(p_draws - p_pred)) < 0.03
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo) and loo.elpd_loo < 0
    khat = idata.posterior.attrs["psis_khat"]
    assert khat > 0.7  # a mean-field q over ~27k weights is far from the exact posterior
    assert idata.sample_stats["log_importance_ratio"].size == 120


def test_data_as_tensors_and_cap(fitted, digits):
    x, y = digits.val.tensors
    idata = bp.to_arviz(fitted, num_samples=4, data=(x, y), max_examples=50)
    assert idata.log_likelihood.sizes["obs_id"] == 50


def test_more_examples_than_the_training_set(fitted, digits):
    n = fitted.num_data
    fitted.num_data = 100  # as after a fit on a 100-example subset
    try:
        idata = bp.to_arviz(fitted, num_samples=4, data=digits.val.tensors)
    finally:
        fitted.num_data = n
    assert idata.log_likelihood.sizes["obs_id"] == len(digits.val) > 100


def test_bad_inputs(fitted):
    with pytest.raises(TypeError, match="BayesianModule"):
        bp.to_arviz(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_samples"):
        bp.to_arviz(fitted, num_samples=0)
    with pytest.raises(KeyError, match="valid names"):
        bp.to_arviz(fitted, num_samples=2, weights=["nope"])
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        bp.to_arviz(fitted, num_samples=2, data=(torch.zeros(3, 64), torch.zeros(2).long()))
    with pytest.raises(TypeError, match="DataLoader"):
        bp.to_arviz(fitted, num_samples=2, data=42)
    with pytest.warns(UserWarning, match=r"one chain.*r_hat, ess\) will be NaN"):
        bp.to_arviz(fitted, num_samples=8, num_chains=1)
    gauss = bp.bayesianize(nn.Sequential(nn.Linear(3, 2)), prior=bp.priors.Gaussian())
    with pytest.raises(ValueError, match="weights='all'"):
        bp.to_arviz(gauss, num_samples=2)
    assert "0.weight" in bp.to_arviz(gauss, num_samples=2, weights="all").posterior


def test_regression_likelihood_multi_output():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = 2 * x[:, :2] + 0.1 * torch.randn(64, 2)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    bnet = bp.bayesianize(net, prior=bp.priors.GroupHorseshoe(), likelihood="gaussian")
    idata = bp.to_arviz(bnet, num_samples=20, data=(x, y))
    assert idata.log_likelihood["obs"].dims == ("chain", "draw", "obs_id")  # one per example
    assert idata.posterior_predictive["obs"].shape[2:] == (64, 2)
    np.testing.assert_allclose(idata.observed_data["obs"].values, y.numpy())
