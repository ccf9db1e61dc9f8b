"""Bayesian layers: mean mode, local-reparameterization moments, gates, parameters, Pyro isolation."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.nn import PyroModule
from torch import nn

from bayesprune.layers import (
    INIT_SCALE,
    BayesianConv1d,
    BayesianConv2d,
    BayesianLayer,
    BayesianLinear,
    bayesian_layer_for,
)
from bayesprune.priors import Gaussian, GroupHorseshoe, SpikeAndSlab, _hard_concrete

PLAIN = {
    "linear": (lambda: nn.Linear(6, 4), lambda: torch.randn(16, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(16, 3, 10)),
    "conv2d": (
        lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular"),
        lambda: torch.randn(16, 3, 8, 8),
    ),
    "conv2d-grouped": (
        lambda: nn.Conv2d(4, 4, 3, groups=2, bias=False),
        lambda: torch.randn(16, 4, 7, 7),
    ),
}


def _make(kind: str, prior=None) -> tuple[nn.Module, BayesianLayer, torch.Tensor]:
    torch.manual_seed(0)
    make_layer, make_x = PLAIN[kind]
    plain = make_layer()
    layer = bayesian_layer_for(plain).from_module(plain, prior or SpikeAndSlab())
    return plain, layer, make_x()


@pytest.mark.parametrize("kind", list(PLAIN))
def test_mean_mode_reproduces_the_plain_layer(kind: str) -> None:
    plain, layer, x = _make(kind, GroupHorseshoe())
    layer.mode = "mean"
    torch.testing.assert_close(layer(x), plain(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", list(PLAIN))
def test_local_reparameterization_has_the_right_moments(kind: str) -> None:
    """Sample-mode outputs have mean op(x, mu) and variance op(x^2, sigma^2) (gates fixed on)."""
    _, layer, x = _make(kind, Gaussian())
    with torch.no_grad():
        layer.weight_log_scale.fill_(math.log(0.2))
        if layer.bias_log_scale is not None:
            layer.bias_log_scale.fill_(math.log(0.1))
    x = x[:1]
    with torch.no_grad():
        # local reparameterization draws independently per example: one batch of 4000 copies
        draws = layer(x.expand(4000, *x.shape[1:]))
        mean = layer._op(x, layer.weight_loc, layer.bias_loc)[0]
        bvar = None if layer.bias_scale is None else layer.bias_scale**2
        var = layer._op(x * x, layer.weight_scale**2, bvar)[0]
    se = torch.sqrt(var / 4000)
    assert ((draws.mean(0) - mean).abs() < 5 * se + 1e-4).all()
    rel = draws.var(0) / var
    assert ((rel - 1).abs() < 0.15).all()


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_shared_draw_matches_local_reparameterization_in_distribution(kind: str) -> None:
    _, layer, x = _make(kind, Gaussian())
    with torch.no_grad():
        layer.weight_log_scale.fill_(math.log(0.2))
    x = x[:1]
    with torch.no_grad():
        local = layer(x.expand(1500, *x.shape[1:]))
        layer.local_reparam = False
        shared = torch.stack([layer(x)[0] for _ in range(1500)])
    sd = local.std(0)
    assert (
        (local.mean(0) - shared.mean(0)).abs() < 6 * sd / math.sqrt(1500) * math.sqrt(2) + 1e-4
    ).all()
    assert ((local.var(0) / shared.var(0) - 1).abs() < 0.2).all()


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_gate_switches_whole_nodes_off(kind: str) -> None:
    _, layer, x = _make(kind, SpikeAndSlab())
    with torch.no_grad():
        layer.gate_logit[1] = -50.0
        layer.gate_logit[[0, 2, 3]] = 50.0
    out = layer(x)
    node_axis = -1 if kind == "linear" else 1
    off = out.select(node_axis, 1)
    assert torch.equal(off, torch.zeros_like(off))
    assert (out.select(node_axis, 0) != 0).any()


def test_hard_concrete_is_an_exact_bernoulli_draw_with_a_gradient() -> None:
    torch.manual_seed(0)
    logit = torch.tensor([-2.0, 0.0, 1.5], requires_grad=True)
    n = 20000
    z = _hard_concrete(logit, 0.5, batch=n)
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0}
    p = torch.sigmoid(logit.detach())
    freq = z.detach().mean(0)
    assert ((freq - p).abs() < 4 * torch.sqrt(p * (1 - p) / n)).all()
    z.sum().backward()
    assert (logit.grad > 0).all()


def test_inclusion_probs_shapes_per_layer_type() -> None:
    for kind in ("linear", "conv1d", "conv2d"):
        _, layer, _ = _make(kind, SpikeAndSlab())
        pip = layer.inclusion_probs()
        assert pip.shape == (4,)
        assert ((pip >= 0) & (pip <= 1)).all()
        _, layer, _ = _make(kind, GroupHorseshoe())
        assert layer.inclusion_probs().shape == (4,)


def test_weight_level_gates_and_gaussian_have_no_node_pip() -> None:
    _, layer, _ = _make("linear", SpikeAndSlab(level="weight"))
    assert layer.inclusion_probs() is None
    assert layer.prior.weight_inclusion_probs(layer).shape == layer.weight_loc.shape
    _, layer, _ = _make("linear", Gaussian())
    assert layer.inclusion_probs() is None


def test_posterior_loc_and_scale_exposed_and_initialised_from_weights() -> None:
    plain, layer, _ = _make("linear", Gaussian())
    torch.testing.assert_close(layer.weight_loc, plain.weight)
    rms = torch.cat([plain.weight.flatten(), plain.bias]).pow(2).mean().sqrt()
    torch.testing.assert_close(
        layer.weight_scale, torch.full_like(plain.weight, INIT_SCALE * rms.item())
    )
    snr = layer.weight_loc.abs() / layer.weight_scale  # what the self-compression baseline reads
    assert snr.shape == plain.weight.shape


def test_layers_are_pyro_modules_but_the_fast_path_skips_the_param_store() -> None:
    pyro.clear_param_store()
    _, layer, x = _make("linear", SpikeAndSlab())
    assert isinstance(layer, PyroModule)
    layer(x).sum().backward()
    assert len(pyro.get_param_store()) == 0
    assert layer.weight_loc.grad is not None and layer.gate_logit.grad is not None


def test_fixed_mode_needs_sampled_weights() -> None:
    _, layer, x = _make("linear")
    layer.mode = "fixed"
    with pytest.raises(RuntimeError, match=r"bnet\.model"):
        layer(x)


def test_unsupported_types_are_not_mapped() -> None:
    assert bayesian_layer_for(nn.Linear(2, 2)) is BayesianLinear
    assert bayesian_layer_for(nn.Conv1d(2, 2, 1)) is BayesianConv1d
    assert bayesian_layer_for(nn.Conv2d(2, 2, 1)) is BayesianConv2d
    assert bayesian_layer_for(nn.Conv3d(2, 2, 1)) is None
    assert bayesian_layer_for(nn.Bilinear(2, 2, 2)) is None


def _plain_moments(mu, log_sd):
    var = torch.exp(2 * log_sd)
    m, v = mu.reshape(mu.shape[0], -1), var.reshape(mu.shape[0], -1)
    return var, 0.5 * (v + m * m).sum(1), log_sd.reshape(m.shape).sum(1)


def _assert_same_values_and_gradients(fused, plain, used, params) -> None:
    """Equal outputs, and equal gradients of a random linear loss of the outputs flagged in ``used``."""
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b)
    weights = [torch.randn_like(o) for o in plain]

    def grads(outs):
        loss = sum((o * w).sum() for o, w, u in zip(outs, weights, used, strict=True) if u)
        return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)

    for a, b in zip(grads(fused), grads(plain), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("used", [(1, 1, 1), (1, 0, 0), (0, 1, 1), (0, 1, 0), (0, 0, 1)])
def test_fused_weight_moments_match_autograd_of_the_plain_formulas(used) -> None:
    """Value and gradient of the fused (variance, row statistics), whichever outputs a loss uses."""
    from bayesprune._weight_ops import WeightMoments

    torch.manual_seed(0)
    mu = torch.randn(4, 3, 2, requires_grad=True)
    ls = (torch.randn(4, 3, 2) * 0.3 - 1).requires_grad_()
    fused, plain = WeightMoments.apply(mu, ls), _plain_moments(mu, ls)
    _assert_same_values_and_gradients(fused, plain, used, (mu, ls))


@pytest.mark.parametrize("used", [(1, 1, 1), (1, 0, 0), (0, 1, 1), (0, 0, 1)])
def test_fused_weight_draw_matches_autograd_of_the_plain_formulas(used) -> None:
    """Value and gradient of the fused (weight draw, row statistics), whichever outputs a loss uses."""
    from bayesprune._weight_ops import SampledWeight

    torch.manual_seed(0)
    mu = torch.randn(4, 5, requires_grad=True)
    ls = (torch.randn(4, 5) * 0.3 - 1).requires_grad_()
    eps = torch.randn(4, 5)
    _, half_sq, ls_sum = _plain_moments(mu, ls)
    plain = (mu + torch.exp(ls) * eps, half_sq, ls_sum)
    fused = SampledWeight.apply(mu, ls, eps)
    _assert_same_values_and_gradients(fused, plain, used, (mu, ls))


@pytest.mark.parametrize("local", [True, False])
def test_kl_after_a_forward_pass_reuses_its_row_statistics_only_while_valid(local: bool) -> None:
    """The forward pass hands its row statistics to the next KL; never a stale or grad-less one."""
    import copy

    _, layer, x = _make("linear", Gaussian(scale=0.5))
    layer.local_reparam = local
    fresh = layer.kl()
    layer(x)
    assert layer._row_stats.value is not None
    reused = layer.kl()
    assert layer._row_stats.value is None  # taken once
    torch.testing.assert_close(reused, fresh)
    # gradients through the reused statistics equal those of a KL computed on its own
    g_reused = torch.autograd.grad(reused, (layer.weight_loc, layer.weight_log_scale))
    layer(x)
    layer.zero_grad()
    g_fresh = torch.autograd.grad(fresh, (layer.weight_loc, layer.weight_log_scale))
    for a, b in zip(g_reused, g_fresh, strict=True):
        torch.testing.assert_close(a, b)
    # an optimiser step changes the weights: the cached statistics are stale and not used
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer.kl().backward()
    layer(x)
    opt.step()
    torch.testing.assert_close(layer.kl(), _make_kl_plain(layer))
    # a no-grad forward pass cannot feed a KL that needs gradients
    with torch.no_grad():
        layer(x)
    kl = layer.kl()
    assert kl.requires_grad
    # a backward pass through the forward's graph frees it: the KL that follows is built afresh
    layer(x).sum().backward()
    layer.kl().backward()
    # new storage for the weights (as after .to() or an assigning state-dict load): not reused
    layer(x)
    with torch.no_grad():
        layer.weight_loc.data = layer.weight_loc.data.clone() * 2
    torch.testing.assert_close(layer.kl(), _make_kl_plain(layer))
    # copies of a layer after a forward pass work and start with an empty cache
    layer(x)
    clone = copy.deepcopy(layer)
    assert clone._row_stats.value is None
    torch.testing.assert_close(clone.kl(), layer.kl())


@pytest.mark.parametrize("local", [True, False])
def test_weight_level_layers_skip_the_row_statistics_their_kl_never_reads(local: bool) -> None:
    """Weight-level spike-and-slab's KL is a per-weight gated sum: its forward pass computes no row
    statistics, and the step still reaches the means and the scales."""
    torch.manual_seed(0)
    prior = SpikeAndSlab(level="weight")
    assert (
        not prior.uses_row_stats and SpikeAndSlab(level="node", weights="gaussian").uses_row_stats
    )
    assert not SpikeAndSlab(level="node").uses_row_stats  # point weights: no weight KL at all
    _, layer, x = _make("linear", prior)
    layer.local_reparam = local
    out = layer(x)
    assert layer._row_stats.value is None
    (out.sum() + layer.kl()).backward()
    assert layer.weight_loc.grad is not None and layer.weight_log_scale.grad.abs().sum() > 0


def _make_kl_plain(layer: BayesianLayer) -> torch.Tensor:
    from bayesprune.priors import _kl_normal

    s = layer.prior.scale
    kl = _kl_normal(layer.weight_loc, layer.weight_log_scale, s).sum()
    return kl + _kl_normal(layer.bias_loc, layer.bias_log_scale, s).sum()


# -- the rank-one sd family -------------------------------------------------------------------
def _rank1_and_twin(kind: str, prior) -> tuple[BayesianLayer, BayesianLayer, torch.Tensor]:
    """A ``weight_sd="rank1"`` layer with random factors, and a per-weight layer holding the same
    means and exactly the sds :math:`e^{a_j + b_i}`."""
    torch.manual_seed(0)
    make_layer, make_x = PLAIN[kind]
    plain = make_layer()
    cls = bayesian_layer_for(plain)
    r1 = cls.from_module(plain, prior, weight_sd="rank1")
    full = cls.from_module(plain, prior)
    with torch.no_grad():
        r1.weight_log_scale_out.uniform_(-3, -1)
        r1.weight_log_scale_in.uniform_(-1, 1)
        full.weight_log_scale.copy_(r1.weight_log_sd)
    shared = {k: v for k, v in r1.state_dict().items() if not k.startswith("weight_log_scale")}
    full.load_state_dict(shared, strict=False)
    return r1, full, make_x()


@pytest.mark.parametrize(
    "prior", [Gaussian(), SpikeAndSlab(level="weight")], ids=["node", "weight"]
)
@pytest.mark.parametrize("kind", list(PLAIN))
def test_rank1_family_is_the_per_weight_family_at_rank_one_sds(kind: str, prior) -> None:
    """Same noise, same output: the single-output variance pass computes op(x^2, sigma^2) exactly
    (also for grouped and circular-padded convolutions, and through the weight-gate fallback), and
    the factors' gradients are the per-weight gradients summed over the other axis."""
    r1, full, x = _rank1_and_twin(kind, prior)
    assert r1.weight_sd == "rank1" and "weight_log_scale" not in dict(r1.named_parameters())
    torch.manual_seed(1)
    out_r1 = r1(x)
    torch.manual_seed(1)
    out_full = full(x)
    torch.testing.assert_close(out_r1, out_full, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out_r1)
    (out_r1 * g).sum().backward()
    (out_full * g).sum().backward()
    torch.testing.assert_close(r1.weight_loc.grad, full.weight_loc.grad, atol=1e-4, rtol=1e-4)
    g_full = full.weight_log_scale.grad
    torch.testing.assert_close(
        r1.weight_log_scale_out.grad, g_full.flatten(1).sum(1), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(r1.weight_log_scale_in.grad, g_full.sum(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "prior",
    [
        Gaussian(),
        SpikeAndSlab(level="node"),
        SpikeAndSlab(level="node", weights="gaussian"),
        SpikeAndSlab(level="node", slab="group_lasso"),
        SpikeAndSlab(level="node", slab="horseshoe"),
        SpikeAndSlab(level="weight"),
        GroupHorseshoe(),
    ],
    ids=[
        "gaussian",
        "ss-node",
        "ss-node-gaussian-weights",
        "ss-group-lasso",
        "ss-horseshoe",
        "ss-weight",
        "ghs",
    ],
)
def test_rank1_kl_and_row_stats_match_the_per_weight_ones(prior) -> None:
    r1, full, _ = _rank1_and_twin("conv2d", prior)
    for a, b in zip(r1.weight_row_stats(), full.weight_row_stats(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r1.kl(), full.kl(), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(r1.weight_scale, full.weight_scale)


def test_rank1_layer_has_about_as_many_variational_parameters_as_weights() -> None:
    plain = nn.Linear(784, 300)
    per_weight = BayesianLinear.from_module(plain, Gaussian())
    rank1 = BayesianLinear.from_module(plain, Gaussian(), weight_sd="rank1")
    n_w = plain.weight.numel()
    assert sum(p.numel() for p in per_weight.parameters()) > 2 * n_w
    assert sum(p.numel() for p in rank1.parameters()) == n_w + 300 + 784 + 2 * 300
    with pytest.raises(ValueError, match="weight_sd must be one of"):
        BayesianLinear.from_module(plain, Gaussian(), weight_sd="diagonal")


def test_local_reparameterization_of_a_convolution_drops_the_correlation_of_positions() -> None:
    """Why ``reparam="auto"`` uses one weight draw for convolutions. Under q every position of an
    example sees the same kernel draw, so the sum of a one-channel conv's outputs is c . w with
    c = sum of the input patches: Var = sigma^2 |c|^2. Local reparameterization keeps each
    position's variance but makes positions independent: Var = sigma^2 sum_p |x_p|^2."""
    torch.manual_seed(0)
    plain = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    layer = BayesianConv2d.from_module(plain, Gaussian())
    sd = 0.5
    with torch.no_grad():
        layer.weight_log_scale.fill_(math.log(sd))
    x = torch.randn(1, 1, 6, 6)
    patches = nn.functional.unfold(x, 3, padding=1)[0]  # [9, positions]
    exact = sd**2 * patches.sum(1).square().sum()
    independent = sd**2 * patches.square().sum()
    assert exact > 1.3 * independent  # the two laws are far apart for this input
    n = 4000
    with torch.no_grad():
        local = layer(x.expand(n, 1, 6, 6)).sum((1, 2, 3))
        layer.local_reparam = False
        shared = torch.stack([layer(x).sum() for _ in range(n)])
    # the sample variance of n Gaussian draws has relative sd sqrt(2 / n) = 2.2%
    assert abs(shared.var() / exact - 1) < 0.1
    assert abs(local.var() / independent - 1) < 0.1


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_one_weight_draw_per_minibatch_still_draws_the_gates_per_example(kind: str) -> None:
    """With ``reparam="shared"`` the weights are drawn once per minibatch but each example gets its
    own gate draw (unbiased, and each gate sees a batch of draws per step, not one)."""
    _, layer, x = _make(kind, SpikeAndSlab())
    layer.local_reparam = False
    with torch.no_grad():
        layer.gate_logit.zero_()  # q = 1/2: half the examples drop each node
        out = layer(x[:1].expand(64, *x.shape[1:]))
    assert layer._mult.shape == (64, layer.out_features_)
    # [examples, nodes]: was node j of example i switched off?
    dropped = out.eq(0) if kind == "linear" else out.eq(0).flatten(2).all(-1)
    # every node is on for some examples and off for others (probability of failure ~ 4 * 2^-63)
    assert dropped.any(0).all() and (~dropped).any(0).all()


def test_exact_draws_give_a_convolution_the_posterior_joint_law_under_any_estimator() -> None:
    """``exact_draws`` (set by ``BayesianModule.predict``) overrides local reparameterization where
    it is not exact: the convolution then draws its kernel once per pass, like the posterior."""
    torch.manual_seed(0)
    layer = BayesianConv2d.from_module(nn.Conv2d(1, 1, 3, padding=1, bias=False), Gaussian())
    sd = 0.5
    with torch.no_grad():
        layer.weight_log_scale.fill_(math.log(sd))
    x = torch.randn(1, 1, 6, 6)
    exact = sd**2 * nn.functional.unfold(x, 3, padding=1)[0].sum(1).square().sum()
    layer.exact_draws = True
    assert layer.local_reparam
    with torch.no_grad():
        sums = torch.stack([layer(x).sum() for _ in range(4000)])
    assert abs(sums.var() / exact - 1) < 0.1
    # a Linear layer on one vector per example keeps local reparameterization (exact there) ...
    lin = BayesianLinear.from_module(nn.Linear(3, 2), Gaussian())
    lin.exact_draws = True
    assert not lin._positions_share_weights(torch.randn(5, 3))
    # ... but not on a sequence, whose positions share the weights
    assert lin._positions_share_weights(torch.randn(5, 4, 3))
