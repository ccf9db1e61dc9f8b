"""Tests of bayesprune/risk.py: p-values, Learn then Test and conformal risk control on arrays.

The expected p-values are computed by hand here from closed forms (math.comb, math.exp), not with
the SciPy calls the module uses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bayesprune.risk import (
    bentkus_pvalue,
    binomial_pvalue,
    conformal_risk_control,
    hoeffding_bentkus_pvalue,
    hoeffding_pvalue,
    learn_then_test,
    min_calibration_size,
    risk_losses,
)


def _binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def _h1(a: float, b: float) -> float:
    return (a * math.log(a / b) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - b))


# ------------------------------------------------------------------------------------------------
# p-values against hand-computed values
# ------------------------------------------------------------------------------------------------


def test_pvalues_at_zero_risk_equal_one_minus_alpha_to_the_n() -> None:
    # Rhat = 0: h1(0, a) = -log(1 - a), so Hoeffding = (1-a)^n; Bentkus = e (1-a)^n
    expected = 0.95**100
    assert hoeffding_pvalue(0.0, 100, 0.05) == pytest.approx(expected, rel=1e-12)
    assert bentkus_pvalue(0.0, 100, 0.05) == pytest.approx(math.e * expected, rel=1e-12)
    assert hoeffding_bentkus_pvalue(0.0, 100, 0.05) == pytest.approx(expected, rel=1e-12)
    assert binomial_pvalue(0.0, 100, 0.05) == pytest.approx(expected, rel=1e-12)


def test_pvalues_hand_computed_n10() -> None:
    # n = 10, alpha = 0.2, Rhat = 0.1 (one error)
    # binomial: P(Bin(10, .2) <= 1) = 0.8^10 + 10 * 0.2 * 0.8^9 = 0.3758096384
    assert binomial_pvalue(0.1, 10, 0.2) == pytest.approx(0.3758096384, abs=1e-10)
    # Hoeffding: h1(0.1, 0.2) = 0.1 log 0.5 + 0.9 log(0.9/0.8)
    h = 0.1 * math.log(0.5) + 0.9 * math.log(0.9 / 0.8)
    assert hoeffding_pvalue(0.1, 10, 0.2) == pytest.approx(math.exp(-10 * h), rel=1e-12)
    # Bentkus: e * 0.37581 > 1, clipped at 1; HB is then Hoeffding's value
    assert bentkus_pvalue(0.1, 10, 0.2) == 1.0
    assert hoeffding_bentkus_pvalue(0.1, 10, 0.2) == pytest.approx(math.exp(-10 * h), rel=1e-12)


def test_bentkus_uses_the_ceiling_of_n_rhat_for_fractional_losses() -> None:
    # n = 50, alpha = 0.3, Rhat = 0.05: n Rhat = 2.5, ceil = 3
    expected = math.e * _binom_cdf(3, 50, 0.3)
    assert bentkus_pvalue(0.05, 50, 0.3) == pytest.approx(expected, rel=1e-10)
    hb = min(math.exp(-50 * _h1(0.05, 0.3)), expected)
    assert hoeffding_bentkus_pvalue(0.05, 50, 0.3) == pytest.approx(hb, rel=1e-10)


def test_hb_minimum_switches_between_bounds() -> None:
    # n = 1000, alpha = 0.02, Rhat = 0.01: Hoeffding 0.0442, Bentkus e P(Bin <= 10) = 0.0278
    hoeff = math.exp(-1000 * _h1(0.01, 0.02))
    bent = math.e * _binom_cdf(10, 1000, 0.02)
    assert bent < hoeff
    assert hoeffding_pvalue(0.01, 1000, 0.02) == pytest.approx(hoeff, rel=1e-10)
    assert hoeffding_bentkus_pvalue(0.01, 1000, 0.02) == pytest.approx(bent, rel=1e-8)


def test_pvalues_are_one_at_or_above_alpha_and_vectorised() -> None:
    assert hoeffding_pvalue(0.3, 50, 0.2) == 1.0
    p = hoeffding_bentkus_pvalue(np.array([0.0, 0.01, 0.02, 0.5]), 1000, 0.02)
    assert isinstance(p, np.ndarray) and p.shape == (4,)
    assert np.all(np.diff(p) >= 0) and p[-1] == 1.0
    # n Rhat = 3 must count 3 errors even when 3/n * n is 3.0000000000000004 in floating point
    assert binomial_pvalue(3 / 7, 7, 0.5) == pytest.approx(_binom_cdf(3, 7, 0.5), rel=1e-12)


@pytest.mark.parametrize("fn", [hoeffding_pvalue, bentkus_pvalue, binomial_pvalue])
def test_pvalue_bad_input(fn) -> None:
    with pytest.raises(ValueError, match="alpha"):
        fn(0.1, 10, 1.0)
    with pytest.raises(ValueError, match="n"):
        fn(0.1, 0, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn(1.5, 10, 0.1)


def test_min_calibration_size() -> None:
    n = min_calibration_size(0.01, 0.1)
    assert n == 230 and 0.99**229 > 0.1 >= 0.99**230
    assert min_calibration_size(0.01, 0.1, n_candidates=10, method="bonferroni") == math.ceil(
        math.log(0.01) / math.log(0.99)
    )
    # the Bentkus p-value alone is e (1 - alpha)^n at zero risk: it needs more points
    n_b = min_calibration_size(0.01, 0.1, pvalue="bentkus")
    assert bentkus_pvalue(0.0, n_b, 0.01) <= 0.1 < bentkus_pvalue(0.0, n_b - 1, 0.01)
    with pytest.raises(ValueError, match=r"bentkus p-values\): at least n = 329"):
        learn_then_test(np.zeros((1, 300)), alpha=0.01, delta=0.1, pvalue="bentkus")


# ------------------------------------------------------------------------------------------------
# Learn then Test
# ------------------------------------------------------------------------------------------------


def test_ltt_picks_last_rejected_before_first_failure() -> None:
    losses = np.zeros((4, 400))
    losses[1, :100] = 1  # candidate 1 fails; candidate 2 would pass but is never reached
    res = learn_then_test(losses, 0.05, 0.1)
    assert res.index == 0
    assert res.rejected.tolist() == [True, False, False, False]
    assert res.pvalue == "binomial"  # auto: 0/1 losses
    # Bonferroni tests every null: the most pruned rejected one is candidate 3
    assert learn_then_test(losses, 0.05, 0.1, method="bonferroni").index == 3


def test_ltt_first_not_rejected_returns_none() -> None:
    losses = np.zeros((3, 400))
    losses[0, :40] = 1
    res = learn_then_test(losses, 0.05, 0.1)
    assert res.index is None and not res.passed and not res.rejected.any()


def test_ltt_all_rejected_returns_last() -> None:
    res = learn_then_test(np.zeros((5, 400)), 0.05, 0.1)
    assert res.index == 4 and res.rejected.all()


def test_ltt_fractional_losses_use_hb() -> None:
    losses = np.full((2, 2000), 0.001)
    res = learn_then_test(losses, 0.02, 0.1)
    assert res.pvalue == "hb" and res.index == 1
    with pytest.raises(ValueError, match="0/1 losses"):
        learn_then_test(losses, 0.02, 0.1, pvalue="binomial")


def test_ltt_too_small_calibration_set_states_minimum() -> None:
    with pytest.raises(ValueError, match="at least n = 230"):
        learn_then_test(np.zeros((2, 229)), 0.01, 0.1)
    assert learn_then_test(np.zeros((2, 230)), 0.01, 0.1).index == 1
    # Bonferroni over 2 candidates tests at delta / 2: ceil(log 0.05 / log 0.99) = 299
    with pytest.raises(ValueError, match="at least n = 299"):
        learn_then_test(np.zeros((2, 298)), 0.01, 0.1, method="bonferroni")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.0), "alpha"),
        (dict(delta=-0.1), "delta"),
        (dict(delta=1.5), "delta"),
        (dict(method="holm"), "method"),
        (dict(pvalue="t"), "pvalue"),
    ],
)
def test_ltt_bad_arguments(kwargs, match) -> None:
    args = dict(alpha=0.1, delta=0.1) | kwargs
    with pytest.raises(ValueError, match=match):
        learn_then_test(np.zeros((2, 100)), **args)


def test_ltt_bad_losses() -> None:
    with pytest.raises(ValueError, match="2-D"):
        learn_then_test(np.zeros(100), 0.1, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        learn_then_test(np.full((2, 100), 2.0), 0.1, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        learn_then_test(np.full((2, 100), np.nan), 0.1, 0.1)


def test_risk_losses() -> None:
    cand, ref, y = [0, 1, 2, 0], [0, 2, 2, 1], [0, 2, 1, 1]
    assert risk_losses(cand, ref, y, "accuracy_drop").tolist() == [0, 1, 0, 1]
    assert risk_losses(cand, ref, y, "disagreement").tolist() == [0, 1, 0, 1]
    assert risk_losses(cand, ref, y, "error").tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="risk must be one of"):
        risk_losses(cand, ref, y, "loss")


# ------------------------------------------------------------------------------------------------
# statistical validity of Learn then Test
# ------------------------------------------------------------------------------------------------

# One candidate sits just above alpha (0.0201): a valid procedure certifies it at most a delta
# fraction of the time, and a procedure that certifies by empirical risk alone does so far more.
_RISKS = np.array([0.0, 0.005, 0.01, 0.015, 0.0201, 0.03, 0.05])


@pytest.mark.parametrize(
    ("pvalue", "method"),
    [("binomial", "fixed_sequence"), ("hb", "fixed_sequence"), ("binomial", "bonferroni")],
)
def test_ltt_controls_the_violation_frequency(pvalue, method) -> None:
    # n = 945: the exact binomial test of H: R > 0.02 has size 0.0999 at delta = 0.1 (little
    # discreteness slack), so an anti-conservative p-value (e.g. P(Bin <= k - 1)) fails here
    alpha, delta, n, trials = 0.02, 0.1, 945, 2000
    rng = np.random.default_rng(2026)
    violations = naive = 0
    for _ in range(trials):
        # nested 0/1 losses: a point wrong for a candidate is wrong for every more pruned one
        u = rng.random(n)
        losses = (u[None, :] < _RISKS[:, None]).astype(float)
        res = learn_then_test(losses, alpha, delta, pvalue=pvalue, method=method)
        # the test risk of the chosen candidate, on the population (an infinite test set)
        violations += res.index is not None and _RISKS[res.index] > alpha
        empirical_ok = np.flatnonzero(losses.mean(axis=1) <= alpha)
        naive += _RISKS[empirical_ok[-1]] > alpha
    # margin: 3 binomial standard errors of a frequency delta over `trials` trials
    margin = 3 * math.sqrt(delta * (1 - delta) / trials)
    assert violations / trials <= delta + margin
    assert naive / trials > delta + margin  # the test can fail: the naive rule violates often


def test_ltt_violation_frequency_on_random_splits_of_a_pool() -> None:
    # 500 random calibration/test splits of one pool; the test risk is measured on the rest
    alpha, delta, n_pool, n_cal, trials = 0.05, 0.1, 4000, 800, 500
    rng = np.random.default_rng(7)
    risks = np.linspace(0.0, 0.1, 21)
    losses_pool = (rng.random(n_pool)[None, :] < risks[:, None]).astype(float)
    violations = 0
    for _ in range(trials):
        perm = rng.permutation(n_pool)
        cal, test = perm[:n_cal], perm[n_cal:]
        res = learn_then_test(losses_pool[:, cal], alpha, delta)
        if res.index is not None:
            violations += losses_pool[res.index, test].mean() > alpha
    margin = 3 * math.sqrt(delta * (1 - delta) / trials)
    assert violations / trials <= delta + margin


# ------------------------------------------------------------------------------------------------
# conformal risk control
# ------------------------------------------------------------------------------------------------


def test_crc_picks_first_lambda_meeting_the_bound() -> None:
    # n = 19: bound(lambda) = 19/20 Rhat + 1/20; with Rhat = (1, 0.5, 0) -> (1, 0.525, 0.05)
    losses = np.array([[1.0, 1.0, 0.0]] * 10 + [[1.0, 0.0, 0.0]] * 9)
    res = conformal_risk_control(losses, alpha=0.1, lambdas=[0.1, 0.2, 0.3])
    assert res.index == 2 and res.lam == 0.3 and res.bound == pytest.approx(0.05)
    assert conformal_risk_control(losses, alpha=0.6).index == 1


def test_crc_controls_expected_loss() -> None:
    # false-negative-rate-like losses: point i has 4 targets with thresholds t_ij ~ U(0, 1);
    # L_i(lambda) = fraction of targets with t_ij > lambda, non-increasing in lambda
    alpha, n_pool, n_cal, trials = 0.1, 3000, 300, 500
    rng = np.random.default_rng(3)
    lambdas = np.linspace(0, 1, 201)
    t = rng.random((n_pool, 4)) ** 2
    losses = (t[:, :, None] > lambdas[None, None, :]).mean(axis=1)
    test_risks = []
    for _ in range(trials):
        perm = rng.permutation(n_pool)
        res = conformal_risk_control(losses[perm[:n_cal]], alpha, lambdas=lambdas)
        test_risks.append(losses[perm[n_cal:], res.index].mean())
    test_risks = np.asarray(test_risks)
    se = test_risks.std(ddof=1) / math.sqrt(trials)
    assert test_risks.mean() <= alpha + 3 * se
    # and it is not vacuous: within B/(n+1) plus the grid step of alpha
    assert test_risks.mean() >= alpha - 1 / (n_cal + 1) - 0.01 - 3 * se


def test_crc_bad_input() -> None:
    with pytest.raises(ValueError, match="non-increasing"):
        conformal_risk_control(np.array([[0.0, 1.0]] * 50), 0.1)
    with pytest.raises(ValueError, match="no lambda controls"):
        conformal_risk_control(np.array([[1.0, 0.0]] * 5), 0.1)
    with pytest.raises(ValueError, match=r"\[0, B\]"):
        conformal_risk_control(np.array([[2.0, 0.0]] * 50), 0.1)
    with pytest.raises(ValueError, match="lambdas= is required"):
        conformal_risk_control(lambda lam: np.zeros((5, len(lam))), 0.1)
    res = conformal_risk_control(
        lambda lam: np.tile((lam < 0.5).astype(float), (50, 1)), 0.1, lambdas=[0.0, 0.4, 0.6]
    )
    assert res.lam == 0.6
