"""SNACS: the EDGE mutual-information estimator on known dependence, and the pruning rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesprune.baselines import SNACS, edge_conditional_mutual_information, edge_mutual_information


def _gaussians(rho: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    z = np.random.default_rng(seed).standard_normal((n, 2))
    return z[:, 0], rho * z[:, 0] + np.sqrt(1 - rho**2) * z[:, 1]


@pytest.mark.parametrize("rho", [0.6, 0.9])
def test_edge_matches_closed_form_gaussian_mi(rho):
    truth = -0.5 * np.log(1 - rho**2)
    est = [edge_mutual_information(*_gaussians(rho, 2000, s), seed=s) for s in range(5)]
    assert abs(np.mean(est) - truth) < 0.1, (np.mean(est), truth)


def test_edge_independent_is_near_zero():
    est = [edge_mutual_information(*_gaussians(0.0, 2000, s), seed=s) for s in range(5)]
    assert abs(np.mean(est)) < 0.06


def test_edge_is_monotone_in_correlation():
    est = [
        np.mean([edge_mutual_information(*_gaussians(r, 2000, s), seed=s) for s in range(3)])
        for r in (0.0, 0.3, 0.6, 0.9, 0.99)
    ]
    assert all(b > a for a, b in itertools.pairwise(est)), est


def test_edge_is_invariant_to_scale():
    x, y = _gaussians(0.7, 1000, 0)
    assert edge_mutual_information(x, y) == pytest.approx(edge_mutual_information(5 * x + 3, y / 7))


def test_conditional_mi_sees_what_the_condition_explains():
    rng = np.random.default_rng(0)
    y, z = rng.standard_normal((2, 2000))
    # X = Z: Y adds nothing once Z is known; X = Y + Z: Y adds a lot
    assert abs(edge_conditional_mutual_information(z, y, z)) < 0.1
    assert edge_conditional_mutual_information(y + z, y, z) > 0.5


def test_estimator_input_errors():
    with pytest.raises(ValueError, match="same number of samples"):
        edge_mutual_information(np.zeros(20), np.zeros(21))
    with pytest.raises(ValueError, match="NaN"):
        edge_mutual_information(np.full(20, np.nan), np.zeros(20))
    with pytest.raises(ValueError, match="at least 10"):
        edge_mutual_information(np.zeros(5), np.zeros(5))


def _setup():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(200):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # four dead parents: no outgoing weight
        net[2].weight[:, 12:] = 0
    return net, DataLoader(TensorDataset(x, y), batch_size=100)


def test_snacs_scores_limits_protection_and_masks():
    net, data = _setup()
    m = SNACS(groups=4, per_class=100, n_ensemble=3, progress=False).fit(net, data)
    s = m.scores["0"]
    # dead parents carry no weight to any child: their score is 0 and they rank last
    assert torch.all(s[12:] == 0) and torch.all(s[:12] > 0)
    assert m.upper_limits["0"] in m.limit_grid
    assert len(m.svm_accuracy["0"]) == len(m.limit_grid)
    assert int(m.protected["0"].sum()) == 1  # floor(0.1 * 16)
    masks = m.masks(0.99)
    assert not (m.protected["0"] & ~masks["0"]).any()
    n_drop = int((~masks["0"]).sum())
    assert n_drop == min(int(np.floor(m.upper_limits["0"] * 16)), 15)
    assert not masks["0"][12:].any() or n_drop < 4
    small = m.prune(m.snacs_level())
    assert small[0].out_features == 16 - n_drop
    assert m.fit_time > 0


def test_snacs_errors():
    net, _data = _setup()
    with pytest.raises(ValueError, match="train_loader"):
        SNACS(progress=False).fit(net, example_input=torch.zeros(1, 6))
    with pytest.raises(ValueError, match="groups"):
        SNACS(groups=0)
    with pytest.raises(ValueError, match="protect_fraction"):
        SNACS(protect_fraction=1.0)
    for tol in (-0.5, 1.5):  # before any fit, not after it
        with pytest.raises(ValueError, match=r"limit_tolerance .* in \[0, 1\]"):
            SNACS(limit_tolerance=tol)


def test_snacs_on_a_conv_net_with_batchnorm(conv_bn_net):
    net, data = conv_bn_net
    m = SNACS(groups=4, per_class=50, n_ensemble=2, progress=False)
    m.fit(net, data)
    assert set(m.scores) == {"0", "4"}  # conv -> conv and conv -> (flattened) linear
    assert all(torch.isfinite(s).all() for s in m.scores.values())
    small = m.prune(0.5)
    masks = m.masks(0.5)
    assert (
        small[0].out_channels == int(masks["0"].sum())
        and small[1].num_features == small[0].out_channels
    )
    assert small[7].in_features == 4 * int(masks["4"].sum())


def test_snacs_reads_the_children_as_the_network_passes_them_on():
    # the output layer's child activations are its logits (no ReLU after it): shifting every
    # logit by a constant changes no prediction and must change no score (a ReLU applied to the
    # logits zeroed them all and left the ranking to the node order)
    import copy

    net, data = _setup()
    shifted = copy.deepcopy(net)
    with torch.no_grad():
        shifted[2].bias -= 50.0
    scores = [
        SNACS(groups=4, per_class=100, n_ensemble=3, progress=False).fit(n, data).scores["0"]
        for n in (net, shifted)
    ]
    torch.testing.assert_close(scores[0], scores[1])
    assert scores[0].max() > 0.1  # informative scores, not all zero


def test_snacs_scores_information_not_weight_size():
    # parents 0-3 carry the input; parents 4-7 are constant (no input weights) but have the
    # largest outgoing weights: mutual information must rank the informative group first
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[:4] = torch.eye(4)
        net[0].bias.copy_(torch.tensor([1.0] * 8))
        net[2].weight[:, :4] = 0.3 + 0.3 * torch.rand(3, 4, generator=g)
        net[2].weight[:, 4:] = 0.8 + 0.2 * torch.rand(3, 4, generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=100)
    scores = SNACS(groups=2, per_class=150, n_ensemble=3, progress=False).fit(net, data).scores["0"]
    assert scores[:4].min() > scores[4:].max()


def test_snacs_reads_the_eval_mode_network_without_training_noise():
    # F.dropout(training=self.training) is baked into a traced graph: traced in training mode it
    # would drop activations at random while SNACS measures them
    import torch.nn.functional as F

    class FunctionalDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            x = F.dropout(F.relu(self.fc1(x)), 0.5, training=self.training)
            return self.fc3(F.relu(self.fc2(x)))

    _, data = _setup()
    torch.manual_seed(0)
    net = FunctionalDropout().eval()
    fits = [
        SNACS(groups=4, per_class=50, n_ensemble=2, progress=False).fit(net, data).scores
        for _ in range(2)
    ]
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in fits[0])


def test_snacs_on_a_net_with_a_head_used_in_training_mode_only():
    # the pruning analysis also walks the training-mode graph, where the auxiliary head reads fc1;
    # SNACS scores from the eval-mode network and must skip that consumer, not fail on it
    import torch.nn.functional as F

    class Aux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8)
            self.aux, self.head = nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            h = F.relu(self.fc1(x))
            out = self.head(F.relu(self.fc2(h)))
            return (out, self.aux(h)) if self.training else out

    _, data = _setup()
    net = Aux().eval()
    scores = SNACS(groups=2, per_class=50, n_ensemble=2, progress=False).fit(net, data).scores
    assert set(scores) == {"fc1", "fc2"} and not net.training
