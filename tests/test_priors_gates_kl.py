import pytest
import torch

import bayesprune as bp
from bayesprune.priors.gates_kl import gates_kl


def _layers(num_data: int):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5), torch.nn.ReLU(),
        torch.nn.Linear(5, 3),
    )  # fmt: skip
    bnet = bp.bayesianize(net)
    bnet.num_data = num_data
    layers = list(bnet.bayesian_layers.values())
    with torch.no_grad():
        for layer in layers:
            layer.gate_logit.copy_(torch.randn_like(layer.gate_logit) * 5)
    return bnet, layers


@pytest.mark.parametrize("num_data", [1_000_000, 30_000_000])  # priors past logit 0.1
def test_one_kl_for_all_layers_gives_each_gate_the_bits_of_its_own_layer(num_data) -> None:
    """Priors differ between layers (with N large enough the price, which grows with the group
    size, is past the prior inclusion 0.1); each gate's term and gradient are the bits of the
    layer's own kl_gates, the sum equal up to its order."""
    bnet, layers = _layers(num_data)
    assert len({layer.prior.inclusion_logs(layer) for layer in layers}) == 3
    gates_kl(layers).backward()
    fused = [layer.gate_logit.grad.clone() for layer in layers]
    bnet.zero_grad()
    per_layer = sum(layer.prior.kl_gates(layer, layer.gate_logit).sum() for layer in layers)
    per_layer.backward()
    assert all(
        torch.equal(a, layer.gate_logit.grad) for a, layer in zip(fused, layers, strict=True)
    )
    torch.testing.assert_close(gates_kl(layers), per_layer.detach(), rtol=1e-6, atol=0)


def test_the_kept_priors_follow_the_training_set_size() -> None:
    """The per-gate priors are kept between steps; a new N (a new price) gives new ones."""
    bnet, layers = _layers(1_000_000)
    small = gates_kl(layers).item()
    bnet.num_data = 10_000_000
    large = gates_kl(layers).item()
    expected = sum(layer.prior.kl_gates(layer, layer.gate_logit).sum().item() for layer in layers)
    assert large != small
    assert large == pytest.approx(expected, rel=1e-6)


def test_one_prior_for_all_layers_and_no_layers() -> None:
    bnet = bp.bayesianize(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4)),
        prior=bp.priors.SpikeAndSlab(level="node", prior_inclusion=0.2, weights="point"),
    )
    layers = list(bnet.bayesian_layers.values())
    expected = sum(layer.prior.kl_gates(layer, layer.gate_logit).sum() for layer in layers)
    torch.testing.assert_close(gates_kl(layers), expected)
    with pytest.raises(ValueError, match="at least one layer"):
        gates_kl([])


@pytest.mark.parametrize(
    "prior",
    [bp.priors.Gaussian(), bp.priors.GroupHorseshoe(), bp.priors.SpikeAndSlab(level="weight")],
)
def test_layers_whose_kl_is_not_their_gates_alone_are_refused(prior) -> None:
    bnet = bp.bayesianize(torch.nn.Sequential(torch.nn.Linear(4, 3)), prior=prior)
    with pytest.raises(ValueError, match=r"gates alone.*use layer\.kl\(\)"):
        gates_kl(list(bnet.bayesian_layers.values()))
