"""Finite-sample risk bounds on arrays of bounded losses: p-values, Learn then Test, risk control.

This module holds the statistics only (NumPy and SciPy, no models); :mod:`bayesprune.conformal`
applies them to networks and data loaders and re-exports every public name here.

* p-values for :math:`H: R > \\alpha` from the empirical risk :math:`\\hat R` of :math:`n`
  i.i.d. losses in [0, 1]: Hoeffding, Bentkus, Hoeffding-Bentkus (Bates, Angelopoulos, Lei, Malik
  and Jordan 2021) and the exact binomial p-value for 0/1 losses;
* :func:`learn_then_test`: fixed-sequence or Bonferroni testing over a sequence of candidates
  (Angelopoulos, Bates, Candès, Jordan and Lei, "Learn then Test", 2021):

  .. math:: \\Pr_{\\text{cal}}\\big(R(\\text{chosen}) \\le \\alpha\\big) \\ge 1 - \\delta;

* :func:`conformal_risk_control` (Angelopoulos, Bates, Fisch, Lei and Schuster 2022):
  :math:`\\mathbb{E}[L_{n+1}(\\hat\\lambda)] \\le \\alpha` for monotone bounded losses.

Example
-------
>>> import numpy as np
>>> from bayesprune.risk import learn_then_test
>>> rng = np.random.default_rng(0)
>>> u = rng.random(2000)
>>> losses = np.stack([u < r for r in (0.0, 0.005, 0.01, 0.05, 0.2)]).astype(float)
>>> learn_then_test(losses, alpha=0.02, delta=0.1).index  # true risk 0.01: the third candidate
2
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import binom

from ._utils import check_level

__all__ = [
    "METHODS",
    "PVALUES",
    "RISKS",
    "LTTResult",
    "RiskControlResult",
    "bentkus_pvalue",
    "binomial_pvalue",
    "conformal_risk_control",
    "hoeffding_bentkus_pvalue",
    "hoeffding_pvalue",
    "learn_then_test",
    "min_calibration_size",
    "risk_losses",
]

RISKS = ("accuracy_drop", "disagreement", "error")
METHODS = ("fixed_sequence", "bonferroni")
PVALUES = ("hb", "hoeffding", "bentkus", "binomial", "auto")

# --------------------------------------------------------------------------------------------------
# p-values for H: R > alpha, from the empirical risk of n i.i.d. losses in [0, 1]
# --------------------------------------------------------------------------------------------------


def _check_n(n: int) -> int:
    if int(n) != n or n < 1:
        raise ValueError(
            f"n (the number of calibration points) must be a positive integer, got {n}"
        )
    return int(n)


def _risk_array(risk_hat: Any) -> np.ndarray:
    r = np.asarray(risk_hat, dtype=np.float64)
    if not np.all(np.isfinite(r)) or np.any(r < 0) or np.any(r > 1):
        raise ValueError("risk_hat must be an empirical risk of losses in [0, 1]")
    return r


def _out(p: np.ndarray) -> float | np.ndarray:
    return float(p) if p.ndim == 0 else p


def _h1(a: np.ndarray, b: float) -> np.ndarray:
    """Bernoulli KL divergence h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)), with 0 log 0 = 0."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(a > 0, a * np.log(a / b), 0.0)
        t2 = np.where(a < 1, (1 - a) * np.log((1 - a) / (1 - b)), 0.0)
    return t1 + t2


def hoeffding_pvalue(risk_hat: Any, n: int, alpha: float) -> float | np.ndarray:
    """Hoeffding (Chernoff-KL) p-value for :math:`H: R > \\alpha`.

    .. math:: p^{\\mathrm{H}} = \\exp\\{-n\\, h_1(\\min(\\hat R, \\alpha), \\alpha)\\},\\qquad
              h_1(a, b) = a \\log\\tfrac{a}{b} + (1-a) \\log\\tfrac{1-a}{1-b}.

    Valid for any losses in [0, 1]. ``risk_hat`` may be an array.

    >>> from bayesprune.risk import hoeffding_pvalue
    >>> round(hoeffding_pvalue(0.0, 100, 0.05), 6)  # (1 - alpha)^n
    0.005921
    """
    n, alpha, r = _check_n(n), check_level(alpha, "alpha"), _risk_array(risk_hat)
    return _out(np.exp(-n * _h1(np.minimum(r, alpha), alpha)))


def bentkus_pvalue(risk_hat: Any, n: int, alpha: float) -> float | np.ndarray:
    """Bentkus p-value for :math:`H: R > \\alpha`, valid for any losses in [0, 1].

    .. math:: p^{\\mathrm{B}} = \\min\\{1,\\; e \\cdot \\Pr(\\mathrm{Binomial}(n, \\alpha)
              \\le \\lceil n \\hat R \\rceil)\\}

    >>> from bayesprune.risk import bentkus_pvalue
    >>> round(bentkus_pvalue(0.0, 100, 0.05), 6)  # e (1 - alpha)^n
    0.016094
    """
    n, alpha, r = _check_n(n), check_level(alpha, "alpha"), _risk_array(risk_hat)
    # n * r is an integer for 0/1 losses; the rounding guard keeps 3/n * n from becoming 3.0000001
    k = np.ceil(np.round(n * r, 9))
    return _out(np.minimum(1.0, math.e * binom.cdf(k, n, alpha)))


def hoeffding_bentkus_pvalue(risk_hat: Any, n: int, alpha: float) -> float | np.ndarray:
    """Hoeffding-Bentkus p-value (Bates et al. 2021): the minimum of the two bounds.

    .. math:: p^{\\mathrm{HB}} = \\min\\big(\\exp\\{-n h_1(\\min(\\hat R, \\alpha), \\alpha)\\},\\;
              e\\, \\Pr(\\mathrm{Binomial}(n, \\alpha) \\le \\lceil n \\hat R \\rceil)\\big)

    >>> from bayesprune.risk import hoeffding_bentkus_pvalue
    >>> round(hoeffding_bentkus_pvalue(0.01, 1000, 0.02), 6)
    0.027826
    """
    return _out(
        np.minimum(
            np.asarray(hoeffding_pvalue(risk_hat, n, alpha)),
            np.asarray(bentkus_pvalue(risk_hat, n, alpha)),
        )
    )


def binomial_pvalue(risk_hat: Any, n: int, alpha: float) -> float | np.ndarray:
    """Exact binomial p-value for 0/1 losses: :math:`\\Pr(\\mathrm{Binomial}(n, \\alpha) \\le n\\hat R)`.

    Under :math:`H: R > \\alpha` the number of errors stochastically dominates
    :math:`\\mathrm{Binomial}(n, \\alpha)`, so this is valid (and sharper than HB) when every loss
    is 0 or 1. Do not use it for fractional losses.

    >>> from bayesprune.risk import binomial_pvalue
    >>> round(binomial_pvalue(0.0, 100, 0.05), 6)
    0.005921
    """
    n, alpha, r = _check_n(n), check_level(alpha, "alpha"), _risk_array(risk_hat)
    return _out(binom.cdf(np.floor(np.round(n * r, 9)), n, alpha))


_PVALUE_FUNCS: dict[str, Callable[..., Any]] = {
    "hb": hoeffding_bentkus_pvalue,
    "hoeffding": hoeffding_pvalue,
    "bentkus": bentkus_pvalue,
    "binomial": binomial_pvalue,
}


def min_calibration_size(
    alpha: float,
    delta: float,
    *,
    n_candidates: int = 1,
    method: str = "fixed_sequence",
    pvalue: str = "hb",
) -> int:
    """Smallest calibration size for which a candidate with zero empirical risk can pass.

    At :math:`\\hat R = 0` the HB, Hoeffding and binomial p-values all equal
    :math:`(1-\\alpha)^n`, so some candidate can be certified only when
    :math:`(1-\\alpha)^n \\le \\delta'` with :math:`\\delta' = \\delta` (fixed sequence) or
    :math:`\\delta / K` (Bonferroni):

    .. math:: n_{\\min} = \\lceil \\log \\delta' / \\log(1 - \\alpha) \\rceil.

    The Bentkus p-value alone is :math:`e\\,(1-\\alpha)^n` there (``pvalue="bentkus"``: replace
    :math:`\\delta'` by :math:`\\delta' / e`).

    >>> from bayesprune.risk import min_calibration_size
    >>> min_calibration_size(0.01, 0.1)
    230
    >>> min_calibration_size(0.01, 0.1, pvalue="bentkus")
    329
    """
    alpha, delta = check_level(alpha, "alpha"), check_level(delta, "delta")
    if pvalue not in PVALUES:
        raise ValueError(f"pvalue must be one of {PVALUES}, got {pvalue!r}")
    level = delta / n_candidates if method == "bonferroni" else delta
    if pvalue == "bentkus":
        level /= math.e
    n = max(1, math.ceil(math.log(level) / math.log1p(-alpha)))
    # guard the closed form against rounding at the boundary
    while n > 1 and (1 - alpha) ** (n - 1) <= level:
        n -= 1
    while (1 - alpha) ** n > level:
        n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Learn then Test
# --------------------------------------------------------------------------------------------------


@dataclass
class LTTResult:
    """Outcome of :func:`learn_then_test`.

    Attributes
    ----------
    index
        Index of the chosen candidate (the most pruned one certified), or ``None`` when no null was
        rejected (keep the dense model).
    p_values, risks
        Per candidate: p-value of :math:`H_j: R_j > \\alpha` and empirical risk :math:`\\hat R_j`.
    rejected
        Per candidate: whether :math:`H_j` was rejected (its risk is certified to be at most alpha).
    """

    index: int | None
    p_values: np.ndarray
    risks: np.ndarray
    rejected: np.ndarray
    alpha: float
    delta: float
    n: int
    method: str
    pvalue: str

    @property
    def passed(self) -> bool:
        return self.index is not None


def _check_losses(losses: Any) -> np.ndarray:
    if torch.is_tensor(losses):
        losses = losses.detach().cpu().numpy()
    arr = np.asarray(losses, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(
            f"losses must be a 2-D array [n_candidates, n_calibration] with both sizes >= 1, got "
            f"shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
        raise ValueError(
            f"losses must be finite and in [0, 1] (range found: [{arr.min()}, {arr.max()}]); "
            "rescale a bounded loss by its bound first"
        )
    return arr


def _resolve_pvalue(pvalue: str, losses: np.ndarray) -> str:
    if pvalue not in PVALUES:
        raise ValueError(f"pvalue must be one of {PVALUES}, got {pvalue!r}")
    binary = bool(np.all((losses == 0) | (losses == 1)))
    if pvalue == "auto":
        return "binomial" if binary else "hb"
    if pvalue == "binomial" and not binary:
        raise ValueError(
            "pvalue='binomial' is exact only for 0/1 losses but some losses are fractional; use "
            "pvalue='hb'"
        )
    return pvalue


def learn_then_test(
    losses: Any,
    alpha: float,
    delta: float,
    *,
    method: Literal["fixed_sequence", "bonferroni"] = "fixed_sequence",
    pvalue: Literal["hb", "hoeffding", "bentkus", "binomial", "auto"] = "auto",
) -> LTTResult:
    """Certify the most pruned candidate whose risk is at most ``alpha`` (Learn then Test).

    Parameters
    ----------
    losses
        Array ``[n_candidates, n]`` of losses in [0, 1], candidates ordered from least to most
        pruned, one column per calibration point (held out from training).
    alpha
        Risk level: the null of candidate :math:`j` is :math:`H_j: R_j > \\alpha`.
    delta
        Error level: :math:`\\Pr(\\text{a candidate is chosen and its risk exceeds } \\alpha)
        \\le \\delta` over the calibration set (an unconditional statement: given that a
        candidate was chosen, its risk may exceed ``alpha`` more often).
    method
        ``"fixed_sequence"``: test :math:`H_1, H_2, \\dots` at level :math:`\\delta` and stop at the
        first null not rejected; the chosen index is the last rejected one (``None`` when the first
        is not rejected; the last candidate when all are). ``"bonferroni"``: test every null at
        :math:`\\delta / K` and choose the most pruned rejected one.
    pvalue
        ``"hb"`` (Hoeffding-Bentkus, any bounded loss), ``"binomial"`` (exact, 0/1 losses only),
        ``"hoeffding"``, ``"bentkus"``, or ``"auto"``: binomial for 0/1 losses, else HB.

    Raises
    ------
    ValueError
        When ``n`` is too small for any candidate to ever pass (:func:`min_calibration_size`).

    Example
    -------
    >>> import numpy as np
    >>> from bayesprune.risk import learn_then_test
    >>> losses = np.zeros((3, 500))
    >>> losses[2, :100] = 1  # the most pruned candidate is wrong on 20% of points
    >>> learn_then_test(losses, alpha=0.05, delta=0.1).index
    1
    """
    alpha, delta = check_level(alpha, "alpha"), check_level(delta, "delta")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    arr = _check_losses(losses)
    k, n = arr.shape
    kind = _resolve_pvalue(pvalue, arr)
    n_min = min_calibration_size(alpha, delta, n_candidates=k, method=method, pvalue=kind)
    if n < n_min:
        bound = "e (1 - alpha)^n" if kind == "bentkus" else "(1 - alpha)^n"
        raise ValueError(
            f"{n} calibration points can never certify risk <= alpha={alpha} at delta={delta} "
            f"({method}, {k} candidates, {kind} p-values): at least n = {n_min} are needed, since "
            f"even zero errors give p = {bound} > delta below that. Use more calibration data or "
            "a larger alpha."
        )
    risks = arr.mean(axis=1)
    pvals = np.atleast_1d(np.asarray(_PVALUE_FUNCS[kind](risks, n, alpha), dtype=np.float64))
    rejected = np.zeros(k, dtype=bool)
    if method == "fixed_sequence":
        for j in range(k):
            if pvals[j] > delta:
                break
            rejected[j] = True
    else:
        rejected = pvals <= delta / k
    index = int(np.flatnonzero(rejected)[-1]) if rejected.any() else None
    return LTTResult(index, pvals, risks, rejected, alpha, delta, n, method, kind)


def risk_losses(candidate_pred: Any, reference_pred: Any, labels: Any, risk: str) -> np.ndarray:
    """0/1 losses of predicted labels: ``accuracy_drop``, ``disagreement`` or ``error``.

    * ``accuracy_drop``: :math:`1[\\hat y \\ne y \\text{ and } \\hat y_{\\mathrm{ref}} = y]`
      (accuracy lost relative to the dense / Bayesian reference);
    * ``disagreement``: :math:`1[\\hat y \\ne \\hat y_{\\mathrm{ref}}]`;
    * ``error``: :math:`1[\\hat y \\ne y]` (absolute; the reference is not used).

    ``candidate_pred`` may be ``[n]`` or ``[n_candidates, n]``.

    >>> from bayesprune.risk import risk_losses
    >>> risk_losses([0, 1, 2], [0, 2, 2], [0, 2, 1], "accuracy_drop").tolist()
    [0.0, 1.0, 0.0]
    """
    cand, ref, y = (np.asarray(a) for a in (candidate_pred, reference_pred, labels))
    if risk == "accuracy_drop":
        out = (cand != y) & (ref == y)
    elif risk == "disagreement":
        out = cand != ref
    elif risk == "error":
        out = cand != y
    else:
        raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")
    return out.astype(np.float64)


# --------------------------------------------------------------------------------------------------
# conformal risk control
# --------------------------------------------------------------------------------------------------


@dataclass
class RiskControlResult:
    """Outcome of :func:`conformal_risk_control`: the chosen ``lambda`` and its index."""

    index: int
    lam: float
    risk_hat: float
    bound: float
    alpha: float
    n: int


def conformal_risk_control(
    losses: Any,
    alpha: float,
    *,
    lambdas: Sequence[float] | None = None,
    B: float = 1.0,
) -> RiskControlResult:
    """Conformal risk control (Angelopoulos, Bates, Fisch, Lei and Schuster 2022).

    For losses :math:`L_i(\\lambda) \\in [0, B]` non-increasing in :math:`\\lambda` (e.g. the false
    negative rate of a set that grows with :math:`\\lambda`),

    .. math:: \\hat\\lambda = \\inf\\Big\\{\\lambda : \\tfrac{n}{n+1} \\hat R_n(\\lambda)
              + \\tfrac{B}{n+1} \\le \\alpha\\Big\\} \\quad\\Rightarrow\\quad
              \\mathbb{E}\\big[L_{n+1}(\\hat\\lambda)\\big] \\le \\alpha.

    Parameters
    ----------
    losses
        Array ``[n, m]``: loss of calibration point ``i`` at the ``j``-th (increasing) lambda, or a
        callable ``lambdas -> [n, m]`` array.
    lambdas
        The grid (increasing); default ``0 .. m-1``. Required when ``losses`` is callable.
    B
        Upper bound of the loss.

    >>> import numpy as np
    >>> from bayesprune.risk import conformal_risk_control
    >>> conformal_risk_control(np.array([[1.0, 0.0]] * 19), alpha=0.1).index
    1
    """
    alpha = check_level(alpha, "alpha")
    if callable(losses):
        if lambdas is None:
            raise ValueError("lambdas= is required when losses is a function of lambda")
        losses = losses(np.asarray(lambdas))
    arr = np.asarray(losses.detach().cpu() if torch.is_tensor(losses) else losses, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"losses must be [n_calibration, n_lambdas], got shape {arr.shape}")
    if B <= 0 or not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > B:
        raise ValueError(f"losses must lie in [0, B] with B = {B} > 0")
    if np.any(np.diff(arr, axis=1) > 1e-12):
        raise ValueError(
            "each calibration point's loss must be non-increasing in lambda (order lambdas so that "
            "larger lambda means a larger set / a smaller loss)"
        )
    n, m = arr.shape
    lambdas = list(range(m)) if lambdas is None else [float(v) for v in lambdas]
    if len(lambdas) != m or np.any(np.diff(lambdas) <= 0):
        raise ValueError(f"lambdas must be {m} increasing values, one per column of losses")
    bound = n / (n + 1) * arr.mean(axis=0) + B / (n + 1)
    ok = np.flatnonzero(bound <= alpha)
    if ok.size == 0:
        raise ValueError(
            f"no lambda controls the risk at alpha={alpha}: the smallest bound is {bound.min():.4g}."
            f" It needs n >= B/alpha - 1 = {math.ceil(B / alpha - 1)} calibration points and a "
            "lambda grid reaching a loss near 0"
        )
    j = int(ok[0])
    return RiskControlResult(j, lambdas[j], float(arr[:, j].mean()), float(bound[j]), alpha, n)
