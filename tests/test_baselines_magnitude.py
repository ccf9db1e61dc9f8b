"""Confident magnitude pruning: exact global quantile levels, structured nodes, LTT wiring."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune.baselines import PAPER_LEVELS, PAPER_PROTOCOL, MagnitudePruning
from bayesprune.conformal import learn_then_test, risk_losses


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


X = torch.zeros(1, 6)


def test_paper_levels_and_protocol():
    assert (
        PAPER_LEVELS[:3] == [0.0, 0.01, 0.02]
        and PAPER_LEVELS[-1] == 0.99
        and len(PAPER_LEVELS) == 100
    )
    assert PAPER_PROTOCOL["alpha"] == 0.03 and PAPER_PROTOCOL["delta"] == 0.05
    assert PAPER_PROTOCOL["pvalue"] == "binomial" and PAPER_PROTOCOL["risk"] == "error"


@pytest.mark.parametrize("level", [0.0, 0.3, 0.75, 0.99])
def test_unstructured_removes_the_smallest_magnitudes_exactly(level):
    net = _net()
    m = MagnitudePruning().fit(net, example_input=X)
    pruned = m.prune(level)
    before = torch.cat([p.detach().flatten() for p in net.parameters()])
    after = torch.cat([p.detach().flatten() for p in pruned.parameters()])
    n_drop = int(np.floor(level * before.numel() + 1e-9))
    assert int((after == 0).sum()) == n_drop
    kept = after != 0
    # every kept magnitude is at least every removed one, and kept values are unchanged
    if n_drop and kept.any():
        assert before[kept].abs().min() >= before[~kept].abs().max()
    assert torch.equal(after[kept], before[kept])
    # the original is untouched
    assert bp.count_nonzero(net) == before.numel()


def test_candidates_are_nested_and_get_sparser():
    m = MagnitudePruning().fit(_net(), example_input=X)
    cands = m.candidates([0.0, 0.2, 0.5, 0.9])
    nz = [bp.count_nonzero(c) for c in cands]
    assert nz == sorted(nz, reverse=True) and nz[0] > nz[-1]
    for a, b in itertools.pairwise(cands):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert not ((pa == 0) & (pb != 0)).any()  # once pruned, stays pruned


def test_structured_is_physically_smaller_and_exact():
    net = _net()
    m = MagnitudePruning(structured=True).fit(net, example_input=X)
    assert set(m.scores) == {"0", "2"}  # the output layer is never scored
    res = m.result(0.5)
    assert res.module[0].out_features + res.module[2].out_features == 10
    assert res.module[4].out_features == 3
    assert res.params_kept < 1.0 and res.wall_time >= 0
    x = torch.randn(7, 6)
    ref = bp.zero_masked(net, res.masks)
    torch.testing.assert_close(res.module(x), ref(x), atol=1e-5, rtol=1e-5)
    # the highest relative norms are the ones kept
    s = m.scores["0"]
    assert s[res.masks["0"]].min() >= s[~res.masks["0"]].max()


def test_structured_relative_norms_do_not_empty_a_layer():
    # layer "2" has tiny weights: raw norms would remove it first; relative norms keep it balanced
    net = _net()
    with torch.no_grad():
        net[2].weight.mul_(1e-3)
        net[2].bias.mul_(1e-3)
    masks = MagnitudePruning(structured=True).fit(net, example_input=X).masks(0.5)
    assert 2 <= int(masks["2"].sum()) <= 6


def test_masks_checks_the_level_like_prune():
    m = MagnitudePruning(structured=True).fit(_net(), example_input=X)
    for level in (-0.5, 1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            m.masks(level)
    with pytest.raises(RuntimeError, match="not fitted"):
        MagnitudePruning().masks(0.5)


def test_certify_is_learn_then_test_on_the_candidates():
    torch.manual_seed(1)
    net = _net()
    x = torch.randn(600, 6)
    y = net(x).argmax(1).detach()
    y[:30] = (y[:30] + 1) % 3  # the dense net is wrong on 5%
    cal = DataLoader(TensorDataset(x, y), batch_size=200)
    m = MagnitudePruning().fit(net, example_input=X)
    levels = [0.0, 0.1, 0.2, 0.4, 0.6, 0.8]
    cert = m.certify(
        cal, levels, alpha=0.1, delta=0.1, risk="error", pvalue="binomial", progress=False
    )
    with torch.no_grad():
        preds = np.stack([c(x).argmax(1).numpy() for c in m.candidates(levels)])
    losses = risk_losses(preds, net(x).argmax(1).numpy(), y.numpy(), "error")
    expected = learn_then_test(losses, 0.1, 0.1, pvalue="binomial")
    assert cert.index == expected.index
    np.testing.assert_allclose([c["risk_hat"] for c in cert.curve], expected.risks)


def test_errors_are_clear():
    m = MagnitudePruning()
    with pytest.raises(RuntimeError, match="not fitted"):
        m.prune(0.5)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        m.fit("net", example_input=X)
    with pytest.raises(ValueError, match="no Linear"):
        m.fit(nn.Sequential(nn.ReLU()), example_input=X)
    with pytest.raises(ValueError, match="example_input"):
        m.fit(_net())
    m.fit(_net(), example_input=X)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        m.prune(1.0)
    with pytest.raises(ValueError, match="increasing"):
        m.candidates([0.5, 0.2])
    with pytest.raises(TypeError, match="unexpected"):
        MagnitudePruning().fit(_net(), example_input=X, epochs=3)
