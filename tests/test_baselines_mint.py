"""MINT: the geometric conditional-dependence estimator on known dependence, and the pruning rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesprune.baselines import MINT, geometric_conditional_dependence


def test_same_distribution_gives_about_zero_and_dependence_gives_about_one():
    rng = np.random.default_rng(0)
    # no conditioning: the bootstrap pairs x with an unrelated y, which is the truth for independence
    null = [
        geometric_conditional_dependence(*rng.standard_normal((2, 600)), seed=s) for s in range(10)
    ]
    assert abs(np.mean(null)) < 0.05
    dep = []
    for s in range(5):
        y = rng.standard_normal(600)
        dep.append(geometric_conditional_dependence(y + 0.05 * rng.standard_normal(600), y, seed=s))
    assert min(dep) > 0.6  # the null gives about 0


def test_conditioning_removes_what_z_explains():
    rng = np.random.default_rng(1)
    y, z, e = rng.standard_normal((3, 900))
    through_y = geometric_conditional_dependence(y + 0.1 * e, y, z)
    through_z = geometric_conditional_dependence(z + 0.1 * e, y, z)
    assert through_y > through_z + 0.3


def test_estimator_input_errors():
    with pytest.raises(ValueError, match="at least 30"):
        geometric_conditional_dependence(np.zeros(10), np.zeros(10))
    with pytest.raises(ValueError, match="same number of samples"):
        geometric_conditional_dependence(np.zeros(40), np.zeros(41))
    with pytest.raises(ValueError, match="NaN"):
        geometric_conditional_dependence(np.full(40, np.nan), np.zeros(40))


def _setup(seed: int = 0):
    """Four independent parents (the identity layer); the children read only the first two."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1500, 4, generator=g)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
        net[0].bias.zero_()
        net[1].weight.copy_(torch.randn(3, 4, generator=g))
        net[1].weight[:, 2:] = 0
        net[1].bias.zero_()
        y = net(x).argmax(1)
    return net, DataLoader(TensorDataset(x, y), batch_size=100), int(torch.bincount(y).min())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mint_ranks_the_silent_group_last(seed):
    net, data, smallest = _setup(seed)
    m = MINT(groups=2, per_class=smallest, seed=seed, progress=False).fit(net, data)
    s = m.scores["0"]
    assert s[0] == s[1] and s[2] == s[3]  # one score per group
    assert s[2] < s[0] - 0.1


def test_mint_scores_and_masks():
    net, data, smallest = _setup()
    m = MINT(groups=2, per_class=smallest, progress=False).fit(net, data)
    (d,) = m.dependence["0"]
    assert d.shape == (3, 2)  # the output layer: one child group per unit
    np.testing.assert_allclose(m.scores["0"].numpy(), d.max(0).repeat(2), rtol=1e-6)
    assert m.masks(0.5)["0"].tolist() == [True, True, False, False]
    # at most upper_limit (0.75) of a layer, whatever the level
    assert int((~m.masks(0.99)["0"]).sum()) == 3
    small = m.prune(0.5)
    assert small[0].out_features == 2 and small[1].in_features == 2
    x = torch.randn(5, 4)
    torch.testing.assert_close(small(x), net(x))  # the silent parents carried nothing
    assert m.fit_time > 0


def test_mint_errors():
    net, _data, _ = _setup()
    with pytest.raises(ValueError, match="train_loader"):
        MINT(progress=False).fit(net, example_input=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="groups"):
        MINT(groups=0)
    with pytest.raises(ValueError, match="upper_limit"):
        MINT(upper_limit=1.0)
    with pytest.raises(ValueError, match="per_class"):
        MINT(per_class=3)


def test_mint_on_a_conv_net_with_batchnorm(conv_bn_net):
    net, data = conv_bn_net
    m = MINT(groups=4, child_groups=2, per_class=40, progress=False)
    m.fit(net, data)
    assert set(m.scores) == {"0", "4"}  # conv -> conv and conv -> (flattened) linear
    assert [d.shape for d in m.dependence["0"]] == [(2, 4)]
    assert [d.shape for d in m.dependence["4"]] == [(3, 4)]
    assert all(torch.isfinite(s).all() for s in m.scores.values())
    masks = m.masks(0.5)
    small = m.prune(0.5)
    assert small[0].out_channels == int(masks["0"].sum()) == small[1].num_features
    assert small[7].in_features == 4 * int(masks["4"].sum())
