"""Tests of bayesprune/conformal.py: scores, the conformal quantile, prediction sets (statistical
and unit), ConformalClassifier, and the names it re-exports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import FakeBayesianModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune import risk
from bayesprune.conformal import (
    ConformalClassifier,
    aps_scores,
    conformal_quantile,
    lac_scores,
    prediction_sets,
    raps_scores,
)
from bayesprune.data import loader

# ------------------------------------------------------------------------------------------------
# fixtures: a small MLP trained on sklearn digits (the same as tests/test_certificate.py's)
# ------------------------------------------------------------------------------------------------


def _cal(digits, batch_size: int = 128) -> DataLoader:
    return loader(digits.cal, batch_size, shuffle=False)


# ------------------------------------------------------------------------------------------------
# scores and the conformal quantile
# ------------------------------------------------------------------------------------------------


def test_conformal_quantile_off_by_one() -> None:
    # rank ceil((n + 1)(1 - alpha)): n = 9, alpha = 0.1 -> 9 (the largest); n = 8 -> 9 > 8 -> inf
    assert conformal_quantile(np.arange(1.0, 10.0), 0.1) == 9.0
    assert conformal_quantile(np.arange(1.0, 9.0), 0.1) == math.inf
    # n = 19, alpha = 0.05: (n + 1)(1 - alpha) = 19 exactly (not 19.000000000000004 -> 20)
    assert conformal_quantile(np.arange(1.0, 20.0), 0.05) == 19.0
    # n = 100, alpha = 0.1: ceil(90.9) = 91st smallest; scores are shuffled
    scores = np.random.default_rng(0).permutation(np.arange(100.0))
    assert conformal_quantile(scores, 0.1) == 90.0
    assert conformal_quantile(torch.tensor([0.3, 0.1, 0.2]), 0.2) == math.inf
    with pytest.raises(ValueError, match="alpha"):
        conformal_quantile(scores, 1.0)
    with pytest.raises(ValueError, match="empty"):
        conformal_quantile(np.array([]), 0.1)


def test_scores_hand_computed() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    y = np.array([1, 0])
    np.testing.assert_allclose(lac_scores(probs, y), [0.7, 0.9])
    # APS, u = 1: mass up to and including y in decreasing order
    np.testing.assert_allclose(aps_scores(probs, y, randomized=False), [0.8, 1.0])
    # randomized: mass strictly above y plus u * p_y
    np.testing.assert_allclose(aps_scores(probs, y, u=np.array([0.5, 0.25])), [0.65, 0.925])
    # RAPS: + lam * (rank - k_reg)^+, ranks 2 and 3
    np.testing.assert_allclose(
        raps_scores(probs, y, lam=0.1, k_reg=1, randomized=False), [0.9, 1.2]
    )
    t = aps_scores(torch.tensor(probs), torch.tensor(y), randomized=False)
    assert torch.is_tensor(t)
    with pytest.raises(ValueError, match="labels must be in"):
        lac_scores(probs, np.array([0, 3]))
    with pytest.raises(ValueError, match="num_classes"):
        lac_scores(probs[0], y)


def test_prediction_sets_structure() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), size=200)
    order = np.argsort(-probs, axis=1)
    for score in ("aps", "raps"):
        sets = prediction_sets(probs, 0.7, score=score, seed=1)
        sorted_sets = np.take_along_axis(sets, order, axis=1)
        # with one uniform per row the set is a prefix of the labels sorted by probability
        assert np.all(np.diff(sorted_sets.astype(int), axis=1) <= 0)
    full = prediction_sets(probs, math.inf, score="aps")
    assert full.all()
    # larger RAPS penalty -> smaller sets
    small = prediction_sets(probs, 0.9, score="raps", lam=1.0, k_reg=1, u=np.full(200, 0.5))
    big = prediction_sets(probs, 0.9, score="raps", lam=0.0, k_reg=1, u=np.full(200, 0.5))
    assert small.sum() < big.sum() and np.all(small <= big)


# ------------------------------------------------------------------------------------------------
# statistical test: split-conformal coverage over 500 random calibration/test splits
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_split_conformal_coverage(score) -> None:
    alpha, n_pool, n_cal, trials, c = 0.1, 3000, 100, 500, 10
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 2.0, size=(n_pool, c))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # labels from a tempered version of the probabilities: the model is miscalibrated on purpose
    true = np.exp(0.5 * logits) / np.exp(0.5 * logits).sum(1, keepdims=True)
    y = (true.cumsum(1) > rng.random((n_pool, 1))).argmax(1)
    u = rng.random(n_pool)  # the randomization is part of each point, so it is exchangeable too
    if score == "lac":
        s = lac_scores(probs, y)
    else:
        s = raps_scores(probs, y, lam=0.05 if score == "raps" else 0.0, k_reg=2, u=u)
    cov = np.empty(trials)
    for t in range(trials):
        perm = rng.permutation(n_pool)
        cal, test = perm[:n_cal], perm[n_cal:]
        cov[t] = (s[test] <= conformal_quantile(s[cal], alpha)).mean()
    se = cov.std(ddof=1) / math.sqrt(trials)
    lo, hi = 1 - alpha, 1 - alpha + 1 / (n_cal + 1)
    assert lo - 3 * se <= cov.mean() <= hi + 3 * se, (cov.mean(), se)
    # prediction_sets agrees with the scores: y is in the set iff its score is <= qhat
    qhat = conformal_quantile(s[:n_cal], alpha)
    sets = prediction_sets(probs, qhat, score=score, lam=0.05, k_reg=2, u=u)
    np.testing.assert_array_equal(sets[np.arange(n_pool), y], s <= qhat)


# ------------------------------------------------------------------------------------------------
# ConformalClassifier on a network
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_conformal_classifier_plain_net(net, digits, score) -> None:
    cp = ConformalClassifier(net, score=score, k_reg=1, seed=0)
    cp.calibrate(_cal(digits), alpha=0.1)
    assert cp.n == len(digits.cal) and math.isfinite(cp.qhat)
    x = digits.test.tensors[0][:7]
    sets = cp.predict_sets(x)
    assert sets.dtype == torch.bool and sets.shape == (7, 10)
    res = cp.evaluate(loader(digits.test, 100, shuffle=False))
    assert res["n"] == len(digits.test)
    # a single test set of 360 points: coverage 0.9 up to about 3 standard errors (0.016 each)
    assert res["coverage"] >= 0.9 - 3 * math.sqrt(0.09 / 360)
    assert 0 < res["mean_size"] < 10
    assert sum(v["count"] for v in res["size_stratified"].values()) == res["n"]


def test_conformal_classifier_bayesian_and_errors(net, digits) -> None:
    bnet = FakeBayesianModule(net, {})
    cp = ConformalClassifier(bnet, score="aps", num_samples=4)
    assert cp.bayesian
    with pytest.raises(RuntimeError, match="calibrate"):
        cp.predict_sets(digits.test.tensors[0][:2])
    with pytest.raises(ValueError, match="alpha"):
        cp.calibrate(_cal(digits), alpha=0.0)
    tl = loader(digits.train, 64)
    with pytest.raises(ValueError, match="disjoint"):
        cp.calibrate(tl, 0.1, train_loader=tl)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        cp.calibrate(empty, 0.1)
    bad_labels = loader(TensorDataset(digits.cal.tensors[0], digits.cal.tensors[1] + 5), 64)
    with pytest.raises(ValueError, match="labels must be in"):
        cp.calibrate(bad_labels, 0.1)
    with pytest.raises(ValueError, match="but the task has 12"):
        ConformalClassifier(net, num_classes=12).calibrate(_cal(digits), 0.1)
    with pytest.raises(ValueError, match="score must be one of"):
        ConformalClassifier(net, score="thr")
    for kw, match in ((dict(lam=float("nan")), "finite"), (dict(lam=float("inf")), "finite"),
                      (dict(lam=-1), "finite"), (dict(k_reg=2.7), "integer")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ConformalClassifier(net, score="raps", **kw)
        with pytest.raises(ValueError, match=match):
            prediction_sets(np.full((1, 3), 1 / 3), 0.5, score="raps", **kw)
        with pytest.raises(ValueError, match=match):
            raps_scores(np.full((1, 3), 1 / 3), np.array([0]), **kw)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ConformalClassifier(object())
    cp.calibrate(_cal(digits), 0.1)
    assert cp.evaluate(_cal(digits))["coverage"] >= 0.9  # in-sample: at least 1 - alpha by design
    # too few calibration points for alpha: every set would hold every label, so it is an error
    tiny = loader(TensorDataset(*(t[:5] for t in digits.cal.tensors)), 5, shuffle=False)
    with pytest.raises(ValueError, match=r"5 calibration points are too few.*at least 9 points"):
        cp.calibrate(tiny, 0.1)
    assert conformal_quantile(np.arange(1, 6), 0.1) == math.inf


# ------------------------------------------------------------------------------------------------
# a Bayesian model's predictive is one fixed function (here and in certify's reference)
# ------------------------------------------------------------------------------------------------


def test_bayesian_scores_come_from_one_fixed_predictive(digits) -> None:
    # convolution weights are drawn once per pass: without frozen draws each batch would see its
    # own draws, and calibration and test scores would not be exchangeable
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    bnet = bp.bayesianize(conv, prior=bp.priors.SpikeAndSlab(level="node"))
    x = digits.test.tensors[0][:12]
    cp = ConformalClassifier(bnet, score="aps", num_samples=2, seed=3)
    whole = cp.probs(x)
    torch.testing.assert_close(torch.cat([cp.probs(x[:5]), cp.probs(x[5:])]), whole)
    torch.testing.assert_close(ConformalClassifier(bnet, num_samples=2, seed=3).probs(x), whole)
    other = ConformalClassifier(bnet, num_samples=2, seed=None)
    torch.testing.assert_close(other.probs(x[:5]), other.probs(x)[:5])
    # certify's predictive reference: the same function for every calibration batch
    from bayesprune.certificate import _Predictive

    ref = _Predictive(bnet, 2, torch.device("cpu"), seed=None)
    torch.testing.assert_close(torch.cat([ref(x[:7]), ref(x[7:])]), ref(x))


# ------------------------------------------------------------------------------------------------
# public names: certified pruning lives in bayesprune.certificate, re-exported here
# ------------------------------------------------------------------------------------------------


def test_certificate_and_risk_names_are_re_exported() -> None:
    assert set(bp.certificate.__all__) == {
        "Certificate", "certify", "certify_candidates", "default_levels", "pip_candidates",
    }  # fmt: skip
    for name in bp.certificate.__all__:
        assert getattr(bp.conformal, name) is getattr(bp.certificate, name)
        assert name in bp.conformal.__all__ and name in bp.certificate.__all__
    for name in risk.__all__:
        assert getattr(bp.conformal, name) is getattr(risk, name)
    assert all(hasattr(bp.conformal, name) for name in bp.conformal.__all__)
    assert "certificate" in bp.__all__


def test_nan_scores_and_probabilities_are_refused() -> None:
    scores = np.linspace(0.0, 1.0, 20)
    scores[3] = np.nan
    with pytest.raises(ValueError, match="1 NaN of 20"):
        conformal_quantile(scores, 0.1)
    with pytest.raises(ValueError, match="NaN in 1 of 1 rows"):
        prediction_sets(np.array([[np.nan, 0.5, 0.5]]), 0.9)
