"""Priors: closed-form KL terms against Monte Carlo, the half-Cauchy construction, PIPs, validation."""

from __future__ import annotations

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune import priors
from bayesprune.data import loader
from bayesprune.layers import BayesianConv2d, BayesianLayer, BayesianLinear
from bayesprune.priors import (
    Gaussian,
    GroupHorseshoe,
    SpikeAndSlab,
    prior_from_dict,
    theory_inclusion,
)
from bayesprune.priors._math import (
    decided_gate,
    hard_concrete,
    kl_bernoulli,
    kl_lognormal_gamma,
    kl_lognormal_invgamma,
    kl_normal,
    log_sigmoid,
    trapezoid_gate,
)
from bayesprune.priors._weights import node_kl
from bayesprune.priors.horseshoe import HalfCauchyScale, _standardised_rms


def _hs_mean_scale(layer: BayesianLayer, c: float | None) -> torch.Tensor:
    """Posterior mean of the regularised node scale (the global scale plays no part in it)."""
    return HalfCauchyScale(slab_width=c).mean(layer)


def _mc_kl(q: dist.Distribution, p: dist.Distribution, n: int = 400_000) -> tuple[float, float]:
    """Monte Carlo estimate of KL(q || p) and its standard error."""
    x = q.sample((n,))
    d = (q.log_prob(x) - p.log_prob(x)).double()
    return d.mean().item(), d.std().item() / math.sqrt(n)


def test_kl_normal_matches_torch() -> None:
    loc, log_scale = torch.randn(50), torch.randn(50) * 0.5
    ours = kl_normal(loc, log_scale, 0.7)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc, log_scale.exp()), torch.distributions.Normal(0.0, 0.7)
    )
    torch.testing.assert_close(ours, ref)


def test_node_kl_value_and_gradients_match_autograd() -> None:
    """The per-node KL built on the fused row statistics equals autograd of the plain formula."""
    torch.manual_seed(0)
    layer = BayesianLinear.from_module(nn.Linear(5, 6), Gaussian())
    with torch.no_grad():
        layer.weight_loc.normal_()
        layer.weight_log_scale.normal_(-1, 0.3)
        layer.bias_log_scale.normal_(-1, 0.3)
    scale = (torch.rand(6) + 0.5).requires_grad_()
    params = (layer.weight_loc, layer.weight_log_scale, layer.bias_loc, layer.bias_log_scale, scale)
    fused = node_kl(layer, scale)
    plain = kl_normal(layer.weight_loc, layer.weight_log_scale, scale[:, None]).sum(1)
    plain = plain + kl_normal(layer.bias_loc, layer.bias_log_scale, scale)
    torch.testing.assert_close(fused, plain)
    w = torch.randn(6)
    g1 = torch.autograd.grad((fused * w).sum(), params)
    g2 = torch.autograd.grad((plain * w).sum(), params)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_kl_bernoulli_matches_torch() -> None:
    logit = torch.linspace(-8, 8, 33)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Bernoulli(logits=logit), torch.distributions.Bernoulli(probs=0.03)
    )
    torch.testing.assert_close(kl_bernoulli(logit, 0.03), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gamma", [0.1, 1e-4, 1e-300])
def test_kl_bernoulli_of_the_log_odds_is_that_of_the_inclusion(gamma: float) -> None:
    logit = torch.linspace(-8, 8, 33, dtype=torch.float64)
    a = math.log(gamma) - math.log1p(-gamma)
    torch.testing.assert_close(
        kl_bernoulli(logit, prior_log_odds=a), kl_bernoulli(logit, gamma), rtol=1e-12, atol=1e-12
    )


def test_kl_bernoulli_reaches_priors_below_a_double() -> None:
    """log-odds -2000 is gamma = e^-2000, which no double holds: a gate that is on pays 2,000 nats
    (plus its own entropy term), one that is off pays almost nothing."""
    on, off = torch.tensor([30.0], dtype=torch.float64), torch.tensor([-30.0], dtype=torch.float64)
    assert kl_bernoulli(on, prior_log_odds=-2000.0).item() == pytest.approx(2000.0, abs=1e-6)
    assert 0 <= kl_bernoulli(off, prior_log_odds=-2000.0).item() < 1e-9
    assert log_sigmoid(-2000.0) == -2000.0 and log_sigmoid(2000.0) == 0.0
    with pytest.raises(ValueError, match="exactly one of prior_inclusion and prior_log_odds"):
        kl_bernoulli(on)
    with pytest.raises(ValueError, match="exactly one"):
        kl_bernoulli(on, 0.1, prior_log_odds=-2.0)


def test_spike_and_slab_prior_log_odds_prices_a_node_and_keeps_its_pyro_site() -> None:
    prior = SpikeAndSlab(prior_log_odds=-1500.0)
    layer = _layer(prior)
    assert prior.log_odds(layer) == -1500.0
    with pytest.raises(ValueError, match="below what a double holds; use log_odds"):
        prior.gamma(layer)
    assert SpikeAndSlab(prior_log_odds=-2).gamma(layer) == pytest.approx(1 / (1 + math.e**2))
    with torch.no_grad():
        layer.gate_logit.fill_(30.0)  # every node on
    assert layer.kl().item() == pytest.approx(1500.0 * layer.gate_logit.numel(), rel=1e-5)
    tr = pyro.poutine.trace(lambda: prior.model_sites(layer, "l")).get_trace()
    site = next(s for name, s in tr.nodes.items() if name.endswith("gate"))
    ones = torch.ones_like(layer.gate_logit)
    assert site["fn"].log_prob(ones).item() == pytest.approx(-1500.0 * ones.numel(), rel=1e-6)
    saved = prior.to_dict()
    assert saved["prior_log_odds"] == -1500.0 and saved["prior_inclusion"] is None
    assert prior_from_dict(saved) == prior
    assert "prior_log_odds" not in SpikeAndSlab().to_dict()  # readable by older versions
    same = SpikeAndSlab(prior_log_odds=math.log(0.1 / 0.9))
    assert same.log_odds(layer) == pytest.approx(SpikeAndSlab().log_odds(layer), rel=1e-12)


def test_per_parameter_prices_each_node_by_the_parameters_of_its_group() -> None:
    """log-odds per parameter times the group size: a 7-input unit (8 parameters) at -0.5 per
    parameter has log-odds -4, and a gate on pays 4 nats."""
    prior = SpikeAndSlab(prior_log_odds=-0.5, per_parameter=True)
    layer = _layer(prior)  # Linear(7, 5): group size 8
    assert layer.group_size == 8 and prior.log_odds(layer) == -4.0
    assert prior.gamma(layer) == pytest.approx(1 / (1 + math.e**4))
    logit = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(
        prior.kl_gates(layer, logit), kl_bernoulli(logit, prior_log_odds=-4.0), rtol=0, atol=0
    )
    assert prior_from_dict(prior.to_dict()) == prior
    assert "per_parameter" not in SpikeAndSlab(prior_log_odds=-4.0).to_dict()
    with pytest.raises(TypeError, match="per_parameter must be True or False"):
        SpikeAndSlab(prior_log_odds=-1.0, per_parameter="yes")


def test_price_per_example_charges_the_larger_of_the_node_prior_and_lam_n_m() -> None:
    """log-odds min(logit(gamma), -lam N m): a Linear(7, 5) unit (8 parameters) at gamma 0.1 and
    lam 0.01 has log-odds -4 at N 50 (the price: 4 > log 9) and -log 9 at N 10 (0.8 < log 9);
    without N it is an error that names the fix."""
    prior = SpikeAndSlab(price_per_example=0.01)
    layer = _layer(prior)
    with pytest.raises(ValueError, match=r"prior.for_data\(N\)"):
        prior.log_odds(layer)
    bound = prior.for_data(50)
    assert bound.num_data == 50 and bound.for_data(50) is bound and prior.num_data is None
    assert bound.log_odds(layer) == pytest.approx(-4.0, rel=1e-12)
    assert bound.gamma(layer) == pytest.approx(1 / (1 + math.e**4), rel=1e-12)
    assert prior.for_data(10).log_odds(layer) == pytest.approx(-math.log(9), rel=1e-12)
    logit = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(
        bound.kl_gates(layer, logit), kl_bernoulli(logit, prior_log_odds=-4.0)
    )
    assert prior_from_dict(bound.to_dict()) == bound
    # prior_log_odds=0 leaves the price alone: -lam N m at every N
    alone = SpikeAndSlab(prior_log_odds=0.0, price_per_example=0.01).for_data(10)
    assert alone.log_odds(layer) == pytest.approx(-0.8, rel=1e-12)
    assert "price_per_example" not in SpikeAndSlab().to_dict()
    assert SpikeAndSlab().for_data(50) == SpikeAndSlab()


@pytest.mark.parametrize("family", ["gamma", "invgamma"])
def test_lognormal_kls_match_monte_carlo(family: str) -> None:
    torch.manual_seed(1)
    loc, log_scale = torch.tensor(-0.4), torch.tensor(math.log(0.6))
    q = dist.LogNormal(loc, log_scale.exp())
    if family == "gamma":
        shape, rate = 1.7, 2.5
        p = dist.Gamma(shape, rate)
        ours = kl_lognormal_gamma(loc, log_scale, shape, rate).item()
    else:
        shape, rate = 0.5, 1.0
        p = dist.InverseGamma(shape, rate)
        ours = kl_lognormal_invgamma(loc, log_scale, shape, rate).item()
    mc, se = _mc_kl(q, p)
    assert abs(ours - mc) < 5 * se + 1e-3, (ours, mc, se)


def test_sqrt_of_gamma_times_invgamma_is_half_cauchy() -> None:
    """sqrt(a b), a ~ Gamma(1/2, rate 1/A^2), b ~ InvGamma(1/2, 1) is HalfCauchy(A) (KS test)."""
    torch.manual_seed(0)
    scale = 0.3
    a = dist.Gamma(0.5, scale**-2).sample((20000,))
    b = dist.InverseGamma(0.5, 1.0).sample((20000,))
    s = torch.sqrt(a * b).double().numpy()
    assert stats.kstest(s, stats.halfcauchy(scale=scale).cdf).pvalue > 1e-3


def test_theory_inclusion_formula() -> None:
    assert theory_inclusion(400, 785) == pytest.approx(
        math.exp(-(math.log(400) + 0.1 * math.log(785)))
    )
    assert 0.001 < theory_inclusion(400, 785) < 0.003
    with pytest.raises(ValueError):
        theory_inclusion(0, 3)


def _layer(prior: priors.Prior, out: int = 5, inp: int = 7) -> BayesianLinear:
    torch.manual_seed(0)
    return BayesianLinear.from_module(nn.Linear(inp, out), prior)


@pytest.mark.parametrize(
    "prior",
    [
        Gaussian(scale=0.5),
        SpikeAndSlab(level="node", prior_inclusion=0.2),
        SpikeAndSlab(level="node", prior_inclusion=0.2, weights="gaussian"),
        SpikeAndSlab(level="node", slab="group_lasso"),
        SpikeAndSlab(level="weight"),
    ],
    ids=["gaussian", "ss-node", "ss-node-gaussian-weights", "ss-group-lasso", "ss-weight"],
)
def test_analytic_kl_matches_pyro_guide_and_model(prior: priors.Prior) -> None:
    """E_guide[log q - log p] over the Pyro sites equals the analytic KL of the fast path."""
    import pyro
    from pyro import poutine

    layer = _layer(prior)
    with torch.no_grad():  # make q broad enough that the MC estimate is informative
        layer.weight_log_scale.fill_(math.log(0.3))
        layer.bias_log_scale.fill_(math.log(0.3))
        if hasattr(layer, "gate_logit"):
            layer.gate_logit.uniform_(-1, 2)
    draws = []
    for _ in range(200):
        gtr = poutine.trace(lambda: prior.guide_sites(layer, "l")).get_trace()
        mtr = poutine.trace(
            poutine.replay(lambda: prior.model_sites(layer, "l"), trace=gtr)
        ).get_trace()
        draws.append((gtr.log_prob_sum() - mtr.log_prob_sum()).item())
    draws = torch.tensor(draws, dtype=torch.float64)
    mc, se = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
    analytic = prior.kl(layer).item()
    assert abs(analytic - mc) < 5 * se + 1e-2, (analytic, mc, se)
    pyro.clear_param_store()


@pytest.mark.parametrize(
    "prior",
    [GroupHorseshoe(global_scale=0.5), SpikeAndSlab(slab="horseshoe")],
    ids=["ghs", "ss-ghs"],
)
def test_horseshoe_kl_matches_pyro_guide_and_model(prior: priors.Prior) -> None:
    from pyro import poutine

    layer = _layer(prior)
    draws = []
    for _ in range(200):
        gtr = poutine.trace(lambda: prior.guide_sites(layer, "l")).get_trace()
        mtr = poutine.trace(
            poutine.replay(lambda: prior.model_sites(layer, "l"), trace=gtr)
        ).get_trace()
        draws.append((gtr.log_prob_sum() - mtr.log_prob_sum()).item())
    draws = torch.tensor(draws, dtype=torch.float64)
    mc, se = draws.mean().item(), draws.std().item() / math.sqrt(len(draws))
    assert abs(prior.kl(layer).item() - mc) < 5 * se + 1e-2


def test_group_horseshoe_pip_closed_form_matches_samples() -> None:
    """PIP_j = P(kappa_j < 1/2), kappa_j = 1 / (1 + s~_j^2 b_j^2 / (rho r)^2), from guide samples
    vs closed form (b_j: RMS of the posterior-mean standardised weights)."""

    prior = GroupHorseshoe(global_scale=0.3, slab_scale=2.0, pip_reference=0.5)
    layer = _layer(prior, out=6, inp=9)
    with torch.no_grad():
        layer.lambda_a_loc.copy_(torch.linspace(-3, 2, 6))
        layer.lambda_a_log_scale.fill_(math.log(0.8))
        layer.weight_loc.mul_(torch.linspace(0.5, 2, 6)[:, None])
    ref = 0.5 * layer.hs_reference
    b = _standardised_rms(layer)
    hits = torch.zeros(6)
    n = 600
    for _ in range(n):
        _, _, s = prior.guide_sites(layer, "l")  # the regularised node scale s~ drawn from q
        hits += (1 / (1 + (s * b / ref) ** 2) < 0.5).float()
    empirical = hits / n
    closed = layer.inclusion_probs()
    assert torch.all((empirical - closed).abs() < 4 * torch.sqrt(closed * (1 - closed) / n) + 0.01)
    assert closed[0] < 0.2 and closed[-1] > 0.8  # the loc sweep spans excluded to included


def test_group_horseshoe_reference_is_the_layers_initial_median_node_scale() -> None:
    """The PIP's reference is the layer's own typical node scale, so a pretrained layer starts with
    its typical nodes included whatever its weight scale (a fan-in reference, 1/sqrt(25) here,
    excludes most filters of this scale), and rescaling a layer's weights by 0.01 leaves
    its inclusion probabilities unchanged."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 20, 5)
    with torch.no_grad():  # trained first-layer filters have RMS 0.13-0.22 < 1 / sqrt(25)
        conv.weight.mul_(0.16 / conv.weight.pow(2).mean().sqrt())
    pips = []
    for factor in (1.0, 0.01):
        plain = copy.deepcopy(conv)
        with torch.no_grad():
            plain.weight.mul_(factor)
            plain.bias.mul_(factor)
        layer = BayesianConv2d.from_module(plain, GroupHorseshoe())
        torch.testing.assert_close(
            layer.hs_reference, _hs_mean_scale(layer, 2.0).median(), rtol=1e-6, atol=0
        )
        pips.append(layer.inclusion_probs())
    assert (pips[0] > 0.5).float().mean() > 0.9, pips[0]
    torch.testing.assert_close(pips[0], pips[1], atol=1e-4, rtol=0)
    # rho moves the threshold: a node below rho * median is out
    strict = BayesianConv2d.from_module(conv, GroupHorseshoe(pip_reference=10.0))
    assert (strict.inclusion_probs() < 0.01).all()


def test_group_horseshoe_pip_sees_nodes_shrunk_through_their_standardised_weights() -> None:
    """The likelihood sees s~_j * beta_j: a node whose standardised weights shrink by 10x is out
    even with its scale unchanged, unless a BatchNorm follows (it removes the weights' scale)."""
    torch.manual_seed(0)
    layer = BayesianLinear.from_module(nn.Linear(30, 8), GroupHorseshoe())
    with torch.no_grad():
        layer.lambda_a_log_scale.fill_(math.log(0.01))  # a confident posterior over the scales
        layer.lambda_b_log_scale.fill_(math.log(0.01))
        layer.tau_a_log_scale.fill_(math.log(0.01))
        layer.tau_b_log_scale.fill_(math.log(0.01))
    typical = _hs_mean_scale(layer, 2.0) > 0.8 * layer.hs_reference
    before = layer.inclusion_probs()
    assert (before[typical] > 0.9).all()
    with torch.no_grad():
        layer.weight_loc[:4].mul_(0.1)
        layer.bias_loc[:4].mul_(0.1)
    after = layer.inclusion_probs()
    assert (after[:4] < 0.01).all() and torch.equal(after[4:], before[4:])
    layer.batchnorm_follows = True
    torch.testing.assert_close(layer.inclusion_probs()[:4], before[:4])


def test_spike_and_slab_pip_is_sigmoid_of_gate_logit() -> None:
    layer = _layer(SpikeAndSlab(init_inclusion=0.9))
    torch.testing.assert_close(layer.inclusion_probs(), torch.full((5,), 0.9))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(level="layer"), "level must be 'node' or 'weight'"),
        (dict(slab="laplace"), "slab must be"),
        (dict(level="weight", slab="group_lasso"), "needs level='node'"),
        (dict(prior_inclusion=1.5), "prior_inclusion must be a probability"),
        (dict(prior_inclusion="auto"), "prior_inclusion must be a probability"),
        (dict(prior_inclusion=None), "prior_inclusion must be a probability"),
        (dict(prior_log_odds=float("-inf")), "prior_log_odds must be a finite number"),
        (dict(prior_log_odds="-100"), "prior_log_odds must be a finite number"),
        (dict(prior_inclusion=0.01, prior_log_odds=-5.0), "not both"),
        (dict(per_parameter=True), "needs level='node' and prior_log_odds"),
        (dict(level="weight", prior_log_odds=-1.0, per_parameter=True), "needs level='node'"),
        (dict(price_per_example=-1e-6), "price_per_example must be a positive finite number"),
        (dict(price_per_example=0.0), "price_per_example must be a positive finite number"),
        (dict(price_per_example=float("inf")), "price_per_example must be a positive finite"),
        (dict(price_per_example=True), "price_per_example must be a positive finite number"),
        (dict(level="weight", price_per_example=1e-6), "needs level='node'"),
        (
            dict(prior_log_odds=-1.0, per_parameter=True, price_per_example=1e-6),
            "no per_parameter",
        ),
        (dict(num_data=100), "num_data is the N of price_per_example"),
        (dict(price_per_example=1e-6, num_data=0), "num_data must be a positive integer"),
        (dict(price_per_example=1e-6, num_data=10.0), "num_data must be a positive integer"),
        (dict(slab_scale=-1.0), "slab_scale must be a positive finite number"),
        (dict(init_inclusion=1.0), "init_inclusion must be a probability"),
        (dict(init_inclusion="high"), "init_inclusion must be a probability"),
        (dict(lasso_rate=5.0), "lasso_rate acts only with slab='group_lasso'"),
        (dict(global_scale=0.01), "global_scale acts only with slab='horseshoe'"),
    ],
)
def test_spike_and_slab_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpikeAndSlab(**kwargs)


def test_other_priors_reject_bad_settings() -> None:
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        Gaussian(scale=0)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        Gaussian(scale=float("inf"))
    with pytest.raises(ValueError, match="global_scale must be a positive finite number"):
        GroupHorseshoe(global_scale=-1)
    with pytest.raises(ValueError, match="pip_reference must be a positive finite number"):
        GroupHorseshoe(pip_reference=0)
    with pytest.raises(TypeError, match="regularized must be True or False"):
        GroupHorseshoe(regularized="no")
    with pytest.raises(ValueError, match="slab_scale acts only with regularized=True"):
        GroupHorseshoe(regularized=False, slab_scale=0.5)


@pytest.mark.parametrize(
    "prior",
    [
        Gaussian(scale=0.3),
        SpikeAndSlab(level="weight", prior_inclusion="theory"),
        GroupHorseshoe(global_scale=0.2, regularized=False),
    ],
)
def test_prior_dict_round_trip(prior: priors.Prior) -> None:
    assert prior_from_dict(prior.to_dict()) == prior


def test_prior_from_dict_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown prior type"):
        prior_from_dict({"type": "Laplace"})
    with pytest.raises(ValueError, match=r"Gaussian has no option\(s\) \['scal'\]"):
        prior_from_dict({"type": "Gaussian", "scal": 0.01})  # a typo is not the default prior


@pytest.mark.parametrize("batch", [None, 7])
def test_trapezoid_gate_gradient_is_the_trapezoid_rule(batch) -> None:
    """Forward: an exact Bernoulli(q) draw; backward: q(1-q) times the mean of the loss's slopes
    weighted 1/(2q) on drawn-in gates and 1/(2(1-q)) on drawn-out ones."""
    torch.manual_seed(0)
    logit = torch.linspace(-3, 3, 9, requires_grad=True)
    z = trapezoid_gate(logit, batch)
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    g = torch.randn_like(z)
    (grad,) = torch.autograd.grad((z * g).sum(), logit)
    q = torch.sigmoid(logit.detach())
    k = torch.where(z > 0, 0.5 / q, 0.5 / (1 - q))
    expected = (g * k * q * (1 - q)).reshape(-1, 9).sum(0)
    torch.testing.assert_close(grad, expected)
    # the draw is Bernoulli(q): frequencies over many examples
    zs = trapezoid_gate(logit.detach(), 20_000)
    torch.testing.assert_close(zs.mean(0), q, atol=0.015, rtol=0)


@pytest.mark.parametrize("batch", [None, 5])
def test_a_decided_gate_is_the_draw_of_both_estimators_at_infinite_logits(batch) -> None:
    """Logits at +-inf (the gate tests' median model): the same 0. and 1. as a random draw of
    either estimator, contiguous, without drawing from the generator; a finite logit differs."""
    logit = torch.tensor([math.inf, -math.inf, math.inf, -math.inf])
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    z = decided_gate(logit, batch)
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn
    assert z.is_contiguous() and z.shape == ((4,) if batch is None else (batch, 4))
    for _ in range(3):
        assert torch.equal(z, trapezoid_gate(logit, batch))
        assert torch.equal(z, hard_concrete(logit, 0.5, batch))
    assert not torch.equal(decided_gate(torch.zeros(400), 2), trapezoid_gate(torch.zeros(400), 2))


@pytest.mark.parametrize(
    "prior",
    [bp.priors.GroupHorseshoe(global_scale=0.5), bp.priors.SpikeAndSlab(slab="horseshoe")],
    ids=["group_horseshoe", "spike_and_slab_horseshoe"],
)
def test_horseshoe_nodes_share_the_layer_scale_within_an_example(prior) -> None:
    # every node's scale contains the layer's tau: one draw per example (the fast path) must give
    # the output the spread of whole posterior draws, not of nodes drawn independently (which
    # understated it by 30% here)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():
        net[0].weight.abs_(), net[0].bias.fill_(0.5), net[2].weight.fill_(0.3)
    bnet = bp.bayesianize(net, prior=prior, likelihood="gaussian", noise_scale=0.5)
    with torch.no_grad():
        for layer in bnet.bayesian_layers.values():
            layer.weight_log_scale.fill_(-6.0)
            layer.bias_log_scale.fill_(-6.0)
            layer.lambda_a_log_scale.fill_(math.log(0.02))
            layer.lambda_b_log_scale.fill_(math.log(0.02))
            layer.tau_a_log_scale.fill_(math.log(0.6))
            layer.tau_b_log_scale.fill_(math.log(0.6))
            if hasattr(layer, "gate_logit"):
                layer.gate_logit.fill_(10.0)  # gates on: the scales alone make the spread
    x = torch.ones(1, 3)
    with torch.no_grad():
        fast = bnet(x.expand(20000, 3)).flatten()  # one draw per example
        # one guide draw per pass: the variance over whole posterior draws
        whole = bnet.predict_regression(x, 1500, seed=0).epistemic.flatten()
    ratio = float(fast.std() / whole.sqrt())
    assert 0.85 < ratio < 1.15, ratio


def test_point_weights_are_the_default_of_the_plain_node_spike_and_slab_only() -> None:
    assert SpikeAndSlab().weights == "point" and SpikeAndSlab().point_weights
    assert SpikeAndSlab(slab="group_lasso").weights == "gaussian"
    assert SpikeAndSlab(slab="horseshoe").weights == "gaussian"
    assert SpikeAndSlab(level="weight").weights == "gaussian"
    with pytest.raises(ValueError, match="weights='point' needs level='node' and slab='gaussian'"):
        SpikeAndSlab(slab="horseshoe", weights="point")
    with pytest.raises(ValueError, match="slab_scale acts only with weights='gaussian'"):
        SpikeAndSlab(slab_scale=0.1)
    with pytest.raises(ValueError, match="'point' or 'gaussian'"):
        SpikeAndSlab(weights="map")
    # a prior saved before the option existed was fitted with Gaussian weights
    old = {k: v for k, v in SpikeAndSlab(weights="gaussian").to_dict().items() if k != "weights"}
    assert prior_from_dict(old).weights == "gaussian"
    assert prior_from_dict(SpikeAndSlab().to_dict()) == SpikeAndSlab()


def test_point_weights_have_no_weight_noise_no_weight_kl_and_fixed_sds() -> None:
    torch.manual_seed(0)
    layer = _layer(SpikeAndSlab())
    with torch.no_grad():
        layer.gate_logit.fill_(50.0)  # every gate on: the output is then deterministic
    x = torch.randn(5, layer.weight_loc.shape[1])
    torch.testing.assert_close(layer(x), layer(x))
    torch.testing.assert_close(layer.kl(), _kl_of_gates(layer))
    assert not layer.weight_log_scale.requires_grad and not layer.bias_log_scale.requires_grad


def _kl_of_gates(layer) -> torch.Tensor:
    return kl_bernoulli(layer.gate_logit, layer.prior.gamma(layer)).sum()


def test_saturated_horseshoe_pips_still_rank_nodes_by_log_odds() -> None:
    # node scales far above the threshold: every PIP is exactly 1.0 in float32, the log-odds differ
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    bnet = bp.bayesianize(net, prior=bp.priors.GroupHorseshoe())
    bnet.num_data = 100
    order = torch.randperm(8)
    with torch.no_grad():
        bnet.net[0].lambda_a_loc.copy_(20.0 + 2.0 * order.float())
    pips, logits = bnet.inclusion_probs()["0"], bnet.inclusion_logits()["0"]
    assert torch.all(pips == 1.0) and logits.dtype == torch.float64
    assert torch.equal(torch.argsort(logits), torch.argsort(order))  # ranked by evidence
    small = bp.prune(bnet, keep=0.5, example_input=torch.zeros(1, 6))
    kept_rows = bnet.mean_module()[0].weight[order >= 4]
    torch.testing.assert_close(small[0].weight, kept_rows)  # the 4 largest scales, not nodes 0-3
    from bayesprune.conformal import certify

    cal = DataLoader(TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,))), batch_size=64)
    with pytest.raises(ValueError, match=r"same PIP \(1\).*by='keep'.*log-odds"):
        certify(bnet, cal, progress=False)
    cert = certify(bnet, cal, by="keep", levels=[1.0, 0.5], progress=False, alpha=0.5)
    assert len(cert.curve) == 2


def test_a_smaller_prior_inclusion_gives_a_smaller_median_model_that_still_works(
    digits, net
) -> None:
    """The prior's answer to "how small": with point weights a node stays only if it lowers the
    training NLL by more than about log(1/gamma) nats (docs/structured.md)."""
    test = loader(digits.test, 256, shuffle=False)
    sizes = {}
    for gamma in (0.1, 1e-4):
        bnet = bp.bayesianize(
            copy.deepcopy(net), prior=bp.priors.SpikeAndSlab(prior_inclusion=gamma)
        )
        bp.fit(bnet, loader(digits.train, 64, seed=0), epochs=10, progress=False, seed=0)
        small = bp.prune(bnet, threshold=0.5)
        sizes[gamma] = bp.count_params(small)
        # measured: 0.967 and 0.958 against the dense net's 0.967
        assert bp.evaluate(small.eval(), test) >= bp.evaluate(net, test) - 0.03
    assert sizes[1e-4] < 0.6 * sizes[0.1]  # measured: 0.45 of it
