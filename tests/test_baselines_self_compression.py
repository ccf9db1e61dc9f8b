"""Self-compression: the SNR and norm rankings of a Gaussian BNN, iterative removal."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune.baselines import SelfCompression
from bayesprune.baselines.self_compression import node_snr, posterior_node_norm


def _layer():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    bnet = bp.bayesianize(net, prior=bp.priors.Gaussian(scale=1.0))
    layer = bnet.bayesian_layers["0"]
    with torch.no_grad():
        # node: 0 big mean, big sd | 1 small mean, tiny sd | 2 medium, medium | 3 zero mean
        layer.weight_loc.copy_(torch.tensor([[4.0] * 3, [0.1] * 3, [1.0] * 3, [0.0] * 3]))
        layer.bias_loc.copy_(torch.tensor([4.0, 0.1, 1.0, 0.0]))
        sd = torch.tensor([8.0, 0.01, 1.0, 1.0])
        layer.weight_log_scale.copy_(sd.log()[:, None].expand(4, 3))
        layer.bias_log_scale.copy_(sd.log())
    return layer


def test_snr_ranking():
    snr = node_snr(_layer())
    torch.testing.assert_close(snr, torch.tensor([0.5, 10.0, 1.0, 0.0]))
    assert torch.argsort(snr, descending=True).tolist() == [1, 2, 0, 3]


def test_norm_ranking_differs_from_snr():
    norm = posterior_node_norm(_layer())
    torch.testing.assert_close(norm, torch.tensor([4.0, 0.1, 1.0, 0.0]))
    assert torch.argsort(norm, descending=True).tolist() == [0, 2, 1, 3]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=64)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("criterion", ["snr", "norm"])
def test_prunes_the_lowest_scores(criterion):
    m = SelfCompression(criterion, epochs=2, progress=False).fit(_net(), _data())
    layers = m.bnet.bayesian_layers
    fn = node_snr if criterion == "snr" else posterior_node_norm
    for name in ("0", "2"):
        raw = fn(layers[name])
        torch.testing.assert_close(m.scores[name], raw / raw.mean())
    masks = m.masks(0.5)
    assert sum(int(v.sum()) for v in masks.values()) == 12
    flat = torch.cat([m.scores[n] for n in ("0", "2")])
    keep = torch.cat([masks[n] for n in ("0", "2")])
    assert flat[keep].min() >= flat[~keep].max()
    small = m.prune(0.5)
    assert small[0].out_features + small[2].out_features == 12


def test_iterative_rounds_keep_removed_nodes_at_zero():
    m = SelfCompression(
        "snr", epochs=2, rounds=3, round_fraction=0.25, round_epochs=1, progress=False
    ).fit(_net(), _data())
    # 24 nodes: 6 removed, then floor(0.25 * 18) = 4
    assert sum(int(v.sum()) for v in m.removed.values()) == 10
    for name, removed in m.removed.items():
        layer = m.bnet.bayesian_layers[name]
        assert torch.all(layer.weight_loc[removed] == 0)
        # removed nodes rank below every survivor
        assert m.scores[name][removed].max() < 0 <= m.scores[name][~removed].min()
    small = m.prune(10 / 24)
    assert small[0].out_features + small[2].out_features == 14
    # below what the rounds removed, a level gives that same network: the dead nodes always go
    with pytest.warns(UserWarning, match="already removed 42% of the hidden nodes"):
        small0 = m.prune(0.0)
    assert small0[0].out_features + small0[2].out_features == 14
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.allclose(small0(x), m.net(x), atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="criterion"):
        SelfCompression("kl")
    with pytest.raises(ValueError, match="train_loader"):
        SelfCompression(progress=False).fit(_net(), example_input=torch.zeros(1, 4))
    with pytest.raises(RuntimeError, match="not fitted"):
        SelfCompression().node_scores()
