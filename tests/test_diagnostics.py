import pytest
import torch

import bayesprune as bp
from bayesprune.diagnostics import (
    hidden_layers,
    informativeness_warnings,
    median_model,
    nodes_off,
    uncertain_fraction,
)


def _bnet():
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    return bp.bayesianize(net)


def test_output_layers_are_not_hidden_and_the_median_model_zeroes_the_off_nodes() -> None:
    bnet = _bnet()
    assert hidden_layers(bnet, torch.randn(1, 4)) == ["0"]
    with torch.no_grad():
        bnet.net[0].gate_logit.copy_(torch.tensor([5.0, -5, 5, -5, 5, -5]))
    assert nodes_off(bnet, ["0"]) == {"0": 0.5}
    assert uncertain_fraction(bnet, ["0"]) == 0.0
    m = median_model(bnet, ["0"])
    assert (m[0].weight[1::2] == 0).all() and (m[0].weight[0::2] != 0).any()


def test_uninformative_pips_and_a_poor_median_model_are_reported_with_advice() -> None:
    bnet = _bnet()
    with torch.no_grad():
        bnet.net[0].gate_logit.zero_()  # every PIP 0.5
    messages = informativeness_warnings(bnet, ["0"], val_accuracy=0.9, median_accuracy=0.5)
    assert len(messages) == 3  # every PIP at 0.5 also keeps every node
    kept, uncertain, median = messages
    assert "keeps every hidden node" in kept
    assert "100% of the hidden nodes" in uncertain and "epochs=" in uncertain
    assert "0.500" in median and "0.900" in median
    assert informativeness_warnings(bnet, [], val_accuracy=0.9, median_accuracy=0.5) == []


def test_fit_records_the_terms_and_the_median_model_per_epoch() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    bnet = _bnet()
    result = bp.fit(bnet, data, epochs=3, progress=False, val_loader=data, seed=0)
    assert len(result.nll) == len(result.kl) == len(result.loss) == 12
    torch.testing.assert_close(
        torch.tensor(result.loss), torch.tensor(result.nll) + torch.tensor(result.kl)
    )
    assert list(result.nodes_off) == ["0"] and len(result.nodes_off["0"]) == 3
    assert len(result.val_median_accuracy) == len(result.val_accuracy) == 3


def test_a_collapsed_network_is_reported() -> None:
    """With the default point weights the advice is a weaker prior; with Bayesian weights it is
    point weights."""
    bnet = _bnet()
    with torch.no_grad():
        bnet.net[0].gate_logit.fill_(-8.0)
    (message,) = informativeness_warnings(bnet, ["0"])
    assert "switched off 100% of the hidden nodes" in message and "weaker prior" in message
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    gaussian = bp.bayesianize(net, bp.priors.SpikeAndSlab(weights="gaussian"))
    with torch.no_grad():
        gaussian.net[0].gate_logit.fill_(-8.0)
    (message,) = informativeness_warnings(gaussian, ["0"])
    assert "KL of the weights" in message and "weights='point'" in message
    with torch.no_grad():
        bnet.net[0].gate_logit[0] = 8.0  # one of six kept: not a collapse
    assert informativeness_warnings(bnet, ["0"]) == []


def test_a_fit_that_keeps_every_node_is_reported_with_advice_for_its_prior() -> None:
    """Point weights: fit longer or price nodes higher; the group horseshoe and Bayesian weights:
    the default prior. One node off is not a freeze."""
    bnet = _bnet()
    with torch.no_grad():
        bnet.net[0].gate_logit.fill_(8.0)
    (message,) = informativeness_warnings(bnet, ["0"])
    assert "keeps every hidden node" in message and "as large as the dense one" in message
    assert "price_per_example" in message and "epochs" in message and "prune(keep=" in message
    with torch.no_grad():
        bnet.net[0].gate_logit[0] = -8.0
    assert informativeness_warnings(bnet, ["0"]) == []

    def fresh(prior):
        net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
        return bp.bayesianize(net, prior)

    horseshoe = fresh(bp.priors.GroupHorseshoe())
    with torch.no_grad():  # every node scale far above the PIP's threshold
        horseshoe.net[0].lambda_a_loc.add_(3.0)
        horseshoe.net[0].lambda_b_loc.add_(3.0)
    assert bool((horseshoe.inclusion_probs()["0"] >= 0.5).all())
    (message,) = informativeness_warnings(horseshoe, ["0"])
    assert "group horseshoe" in message and "default_prior()" in message
    assert "by='keep'" in message  # a ranking by PIP still prunes to a size
    gaussian = fresh(bp.priors.SpikeAndSlab(weights="gaussian"))
    with torch.no_grad():
        gaussian.net[0].gate_logit.fill_(8.0)
    (message,) = informativeness_warnings(gaussian, ["0"])
    assert "Bayesian weights" in message and "default_prior()" in message


def test_a_fit_too_short_to_move_a_gate_warns() -> None:
    """One step: the gates are still frozen (structure_delay), so nothing can be pruned."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    with pytest.warns(UserWarning, match="keeps every hidden node"):
        result = bp.fit(_bnet(), data, epochs=1, progress=False, seed=0)
    assert any("keeps every hidden node" in m for m in result.warnings)
