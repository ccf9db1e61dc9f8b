"""The default prior: what bayesianize uses without ``prior=``, and how it gets N."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune.priors import DEFAULT_PRICE_PER_EXAMPLE, SpikeAndSlab, default_prior


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_the_default_prior_is_node_spike_and_slab_with_a_price_per_example() -> None:
    assert default_prior() == SpikeAndSlab(level="node", price_per_example=2e-6)
    assert DEFAULT_PRICE_PER_EXAMPLE == 2e-6
    bnet = bp.bayesianize(_mlp())
    assert set(bnet.priors.values()) == {default_prior()}
    assert all(layer.prior == default_prior() for layer in bnet.bayesian_layers.values())


def test_before_a_fit_the_default_kl_names_the_fix_and_num_data_binds_the_priors() -> None:
    bnet = bp.bayesianize(_mlp())
    with pytest.raises(ValueError, match=r"set_num_data\(N\)"):
        bnet.kl()
    bnet.num_data = 50_000  # the attribute binds the priors, as set_num_data does
    assert {p.num_data for p in bnet.priors.values()} == {50_000}
    first, last = bnet.bayesian_layers["0"], bnet.bayesian_layers["2"]
    # 9 parameters per first-layer unit: 0.9 nats < 2.2, the per-node charge; 17 per output: 1.7
    assert first.prior.log_odds(first) == pytest.approx(-math.log(9))
    bnet.num_data = 200_000  # 3.6 and 6.8 nats: the price is the larger charge
    assert first.prior.log_odds(first) == pytest.approx(-2e-6 * 200_000 * 9)
    assert last.prior.log_odds(last) == pytest.approx(-2e-6 * 200_000 * 17)
    assert torch.isfinite(bnet.kl())
    bnet.num_data = None  # unset; the priors keep the N they were given
    assert bnet.num_data is None and {p.num_data for p in bnet.priors.values()} == {200_000}
    with pytest.raises(ValueError, match="num_data must be a positive integer"):
        bnet.num_data = 0


def test_fit_binds_the_default_prior_to_the_training_set_size() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(120, 8), torch.randint(0, 3, (120,))
    bnet = bp.bayesianize(_mlp())
    bp.fit(bnet, DataLoader(TensorDataset(x, y), batch_size=32), epochs=1, progress=False)
    assert bnet.num_data == 120 and {p.num_data for p in bnet.priors.values()} == {120}
