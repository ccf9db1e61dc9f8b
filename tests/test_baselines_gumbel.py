"""Pruning by gradient descent: straight-through Gumbel masks, the density term, the final mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune.baselines import GumbelPruning
from bayesprune.baselines.gumbel import straight_through_mask


def _data(n: int = 256) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long()), batch_size=64)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))


def test_mask_is_hard_and_its_gradient_reaches_the_logits():
    logits = torch.zeros(50, 2, requires_grad=True)
    m = straight_through_mask(logits, 3.0)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    w = torch.randn(50)
    (m * w).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # straight through: d(keep)/d(keep logit) > 0 (times w), opposite sign on the drop logit
    assert torch.all(torch.sign(logits.grad[:, 1]) == -torch.sign(logits.grad[:, 0]))
    assert torch.all(logits.grad[:, 1] * w >= 0)


@pytest.mark.parametrize(("target", "init", "direction"), [(0.1, 3.0, -1), (0.9, -3.0, 1)])
def test_density_term_moves_density_toward_target(target, init, direction):
    # no task loss: only the density term acts on the logits
    m = GumbelPruning(
        target_density=target, sparsity_weight=0.01, init_logit=init, epochs=10, progress=False,
        lr=1e-6,
    )  # fmt: skip
    m.fit(_net(), _data(), loss_fn=lambda out, y: 0.0 * out.sum())
    start = torch.sigmoid(torch.tensor(init)).item()
    end = sum(torch.softmax(l, -1)[..., 1].sum() for l in m.logits.values()).item() / sum(
        l[..., 0].numel() for l in m.logits.values()
    )
    assert direction * (end - start) > 0.2
    assert abs(end - target) < abs(start - target)


def test_final_mask_is_the_argmax_and_prune_applies_it():
    m = GumbelPruning(target_density=0.3, sparsity_weight=1.0, epochs=8, progress=False)
    m.fit(_net(), _data())
    am = m.argmax_masks()
    res = m.result(m.trained_level)
    for k in am:
        assert torch.equal(res.masks[k], am[k])
    assert bp.count_nonzero(res.module) <= sum(int(v.sum()) for v in am.values())
    assert m.history and m.history[-1]["tau"] == 3.0


def test_node_masks_give_a_smaller_net():
    m = GumbelPruning(
        target_density=0.25, granularity="node", sparsity_weight=1.0, epochs=8, progress=False
    )
    m.fit(_net(), _data())
    assert set(m.scores) == {"0"}
    small = m.prune(0.5)
    assert small[0].out_features == 8 and small[2].in_features == 8


def test_temperature_schedule():
    m = GumbelPruning(temperature=3.0, final_temperature=0.5)
    assert m.temperature_at(0.0) == pytest.approx(3.0)
    assert m.temperature_at(1.0) == pytest.approx(0.5)
    assert 0.5 < m.temperature_at(0.5) < 3.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="target_density"):
        GumbelPruning(target_density=0.0)
    with pytest.raises(ValueError, match="granularity"):
        GumbelPruning(granularity="filter")
    with pytest.raises(ValueError, match="temperature"):
        GumbelPruning(temperature=-1)
    with pytest.raises(ValueError, match="train_loader"):
        GumbelPruning(progress=False).fit(_net(), example_input=torch.zeros(1, 5))


def test_node_masks_act_after_batchnorm_and_prune_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 6, 6, generator=g)
    data = DataLoader(TensorDataset(x, (x.mean((1, 2, 3)) > 0).long()), batch_size=64)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 2)
    )
    m = GumbelPruning(
        target_density=0.5, granularity="node", sparsity_weight=1.0, epochs=3, progress=False
    ).fit(net, data)
    res = m.result(0.5)
    assert res.module[0].out_channels == 4 and res.module[1].num_features == 4
    ref = bp.zero_masked(m.net, res.masks).eval()
    torch.testing.assert_close(res.module(x[:8]), ref(x[:8]), atol=1e-5, rtol=1e-5)
