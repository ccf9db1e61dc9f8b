"""Split-conformal prediction sets: the array-first guarantee layer for a classifier's outputs.

Scores, thresholds and sets work on arrays (NumPy in, NumPy out; tensor in, tensor out); a model
enters through one adapter, :class:`ConformalClassifier`.

* Scores :math:`s(x, y)` of a label: ``lac`` (:func:`lac_scores`, :math:`1 - \\hat p_y(x)`; Sadinle,
  Lei and Wasserman, 2019), ``aps`` (:func:`aps_scores`; Romano, Sesia and Candès, 2020) and
  ``raps`` (:func:`raps_scores`; Angelopoulos, Bates, Malik and Jordan, 2021).
* :func:`conformal_quantile`: the finite-sample threshold :math:`\\hat q`, the
  :math:`\\lceil (n+1)(1-\\alpha) \\rceil`-th smallest of :math:`n` calibration scores;
  :func:`prediction_sets`: :math:`C(x) = \\{y : s(x, y) \\le \\hat q\\}`. With exchangeable
  calibration and test points,

  .. math:: 1 - \\alpha \\le \\Pr\\big(y \\in C(x)\\big) < 1 - \\alpha + \\frac{1}{n+1}

  (the upper bound for continuous scores, e.g. the randomized ``aps`` / ``raps``).
* Conformal risk control (:func:`conformal_risk_control`; Angelopoulos, Bates, Fisch, Lei and
  Schuster, 2022) and the other array statistics of :mod:`bayesprune.risk` are re-exported here.

Certified pruning (Learn then Test over pruning levels: :func:`certify`,
:func:`certify_candidates`, :class:`Certificate`, ...) lives in :mod:`bayesprune.certificate`; its
public names are re-exported here too, so ``bp.conformal.certify`` keeps working.

**Calibration data must be disjoint from the training data** (and from anything used to choose the
model or the score): the sets need calibration and test points exchangeable given the model. A
Bayesian model's predictive is therefore one fixed function here: the same posterior draws for
every batch (``predict(seed=...)``). :meth:`ConformalClassifier.calibrate` refuses the training
loader when it is passed as ``train_loader=``; :func:`bayesprune.data.load_fashion_mnist` gives a
``cal`` split that training never sees.

Example
-------
>>> import numpy as np
>>> from bayesprune.conformal import conformal_quantile, lac_scores, prediction_sets
>>> rng = np.random.default_rng(0)
>>> probs = rng.dirichlet(np.ones(5), size=1000)  # a classifier's probabilities
>>> labels = np.array([rng.choice(5, p=p) for p in probs])  # a calibrated one: y ~ probs
>>> qhat = conformal_quantile(lac_scores(probs[:500], labels[:500]), alpha=0.1)
>>> sets = prediction_sets(probs[500:], qhat)  # boolean [500, 5]
>>> bool(abs(sets[np.arange(500), labels[500:]].mean() - 0.9) < 0.05)  # coverage about 0.9
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ._guarantee_checks import check_cal_loader, check_labels, check_outputs, device_of, draw_seed
from ._utils import check_level, check_seed, is_bayesian
from .certificate import Certificate, certify, certify_candidates, default_levels, pip_candidates
from .data import batch_xy, check_finite, input_tensor
from .risk import (
    METHODS,
    PVALUES,
    RISKS,
    LTTResult,
    RiskControlResult,
    bentkus_pvalue,
    binomial_pvalue,
    conformal_risk_control,
    hoeffding_bentkus_pvalue,
    hoeffding_pvalue,
    learn_then_test,
    min_calibration_size,
    risk_losses,
)

# Names marked "certificate" live in bayesprune.certificate and those marked "risk" in
# bayesprune.risk; both are re-exported here, so bp.conformal.certify etc. keep working.
__all__ = [
    "METHODS",  # risk
    "PVALUES",  # risk
    "RISKS",  # risk
    "Certificate",  # certificate
    "ConformalClassifier",
    "LTTResult",  # risk
    "RiskControlResult",  # risk
    "aps_scores",
    "bentkus_pvalue",  # risk
    "binomial_pvalue",  # risk
    "certify",  # certificate
    "certify_candidates",  # certificate
    "conformal_quantile",
    "conformal_risk_control",  # risk
    "default_levels",  # certificate
    "hoeffding_bentkus_pvalue",  # risk
    "hoeffding_pvalue",  # risk
    "lac_scores",
    "learn_then_test",  # risk
    "min_calibration_size",  # risk
    "pip_candidates",  # certificate
    "prediction_sets",
    "raps_scores",
    "risk_losses",  # risk
]

_SCORES = ("lac", "aps", "raps")


# --------------------------------------------------------------------------------------------------
# split-conformal prediction sets
# --------------------------------------------------------------------------------------------------


def _to_torch(a: Any, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, bool]:
    """A tensor, and whether the input was NumPy (so results go back as NumPy)."""
    if torch.is_tensor(a):
        return (a if dtype is None else a.to(dtype)), False
    return torch.as_tensor(np.asarray(a), dtype=dtype), True


def _back(t: torch.Tensor, numpy: bool) -> Any:
    return t.detach().cpu().numpy() if numpy else t


def _check_probs(probs: torch.Tensor) -> None:
    if probs.ndim != 2:
        raise ValueError(f"probs must be [n, num_classes], got shape {tuple(probs.shape)}")
    if probs.is_floating_point() and bool(torch.isnan(probs).any()):
        rows = int(torch.isnan(probs).any(1).sum())
        raise ValueError(
            f"probs hold NaN in {rows} of {probs.shape[0]} rows: their scores and sets would be "
            "arbitrary; remove those rows or fix the model that produced them"
        )


def _uniforms(n: int, u: Any, seed: int | None, device: torch.device) -> torch.Tensor:
    if u is not None:
        u_t = torch.as_tensor(np.asarray(u) if not torch.is_tensor(u) else u).to(
            device, torch.float64
        )
        if u_t.shape != (n,):
            raise ValueError(f"u must hold one uniform per row ({n}), got shape {tuple(u_t.shape)}")
        return u_t
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(check_seed(seed))
    return torch.rand(n, generator=gen, device=device, dtype=torch.float64)


def _aps_all(probs: torch.Tensor, u: torch.Tensor, lam: float, k_reg: int) -> torch.Tensor:
    """(R)APS score of every label ``[n, C]``: mass of the labels ranked above, plus ``u`` times its
    own probability, plus the RAPS penalty :math:`\\lambda (o - k_{reg})^+` at 1-based rank ``o``."""
    p = probs.to(torch.float64)
    order = torch.argsort(-p, dim=1, stable=True)
    p_sorted = torch.gather(p, 1, order)
    rank = torch.arange(1, p.shape[1] + 1, device=p.device, dtype=torch.float64)
    sorted_scores = (
        torch.cumsum(p_sorted, 1) - p_sorted + u[:, None] * p_sorted
        + lam * torch.clamp(rank - k_reg, min=0.0)
    )  # fmt: skip
    return torch.empty_like(sorted_scores).scatter_(1, order, sorted_scores)


def _all_scores(
    probs: torch.Tensor, score: str, u: torch.Tensor | None, lam: float, k_reg: int
) -> torch.Tensor:
    if score == "lac":
        return 1.0 - probs.to(torch.float64)
    if score not in ("aps", "raps"):
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
    if u is None:
        u = torch.ones(probs.shape[0], dtype=torch.float64, device=probs.device)
    return _aps_all(probs, u, lam if score == "raps" else 0.0, k_reg if score == "raps" else 0)


def _label_scores(probs: Any, labels: Any, score: str, u: Any, lam: float, k_reg: int) -> Any:
    p, numpy = _to_torch(probs)
    _check_probs(p)
    y = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    y = y.to(p.device, torch.long)
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},), got {tuple(y.shape)}")
    check_labels(y, p.shape[1])
    s = _all_scores(p, score, u, lam, k_reg)
    return _back(s.gather(1, y[:, None])[:, 0], numpy)


def lac_scores(probs: Any, labels: Any) -> Any:
    """LAC (least ambiguous set) scores :math:`s(x, y) = 1 - \\hat p_y(x)` (Sadinle et al. 2019).

    NumPy in, NumPy out; tensor in, tensor out.

    >>> import numpy as np
    >>> from bayesprune.conformal import lac_scores
    >>> lac_scores(np.array([[0.7, 0.2, 0.1]]), np.array([1]))
    array([0.8])
    """
    return _label_scores(probs, labels, "lac", None, 0.0, 0)


def aps_scores(
    probs: Any, labels: Any, *, randomized: bool = True, u: Any = None, seed: int | None = None
) -> Any:
    """Adaptive prediction set scores (Romano, Sesia and Candès 2020).

    With labels sorted by decreasing probability and :math:`o(x, y)` the 1-based rank of :math:`y`,

    .. math:: s(x, y, u) = \\sum_{j < o(x,y)} \\hat p_{(j)}(x) + u\\, \\hat p_{(o(x,y))}(x),

    :math:`u \\sim \\mathrm{U}(0, 1)` when ``randomized`` (exact coverage), :math:`u = 1` otherwise.

    >>> import numpy as np
    >>> from bayesprune.conformal import aps_scores
    >>> aps_scores(np.array([[0.7, 0.2, 0.1]]), np.array([1]), randomized=False)
    array([0.9])
    """
    return raps_scores(probs, labels, lam=0.0, k_reg=0, randomized=randomized, u=u, seed=seed)


def _raps_params(lam: Any, k_reg: Any) -> tuple[float, int]:
    """RAPS's penalty ``lam`` (finite, >= 0) and free rank ``k_reg`` (an integer >= 0)."""
    try:
        lam = float(lam)
    except (TypeError, ValueError):
        raise TypeError(f"lam must be a number, got {lam!r}") from None
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if isinstance(k_reg, bool) or not float(k_reg).is_integer() or k_reg < 0:
        raise ValueError(f"k_reg must be an integer >= 0 (a rank), got {k_reg!r}")
    return lam, int(k_reg)


def raps_scores(
    probs: Any,
    labels: Any,
    *,
    lam: float = 0.01,
    k_reg: int = 5,
    randomized: bool = True,
    u: Any = None,
    seed: int | None = None,
) -> Any:
    """Regularized APS scores (Angelopoulos, Bates, Malik and Jordan 2021):
    :math:`s_{\\mathrm{APS}}(x, y, u) + \\lambda\\, (o(x, y) - k_{reg})^+`.

    >>> import numpy as np
    >>> from bayesprune.conformal import raps_scores
    >>> raps_scores(np.array([[0.7, 0.2, 0.1]]), np.array([2]), lam=0.5, k_reg=1, randomized=False)
    array([2.])
    """
    lam, k_reg = _raps_params(lam, k_reg)
    p, _ = _to_torch(probs)
    uu = _uniforms(p.shape[0], u, seed, p.device) if randomized else None
    return _label_scores(probs, labels, "raps", uu, lam, k_reg)


def conformal_quantile(scores: Any, alpha: float) -> float:
    """The split-conformal threshold: the :math:`\\lceil (n+1)(1-\\alpha) \\rceil`-th smallest score.

    Returns ``inf`` when that rank exceeds ``n`` (too few calibration points for ``alpha``: every
    label enters the set). With exchangeable scores, a new score is at most this threshold with
    probability in :math:`[1-\\alpha, 1-\\alpha + 1/(n+1))` (the upper end when there are no ties).

    >>> import numpy as np
    >>> from bayesprune.conformal import conformal_quantile
    >>> conformal_quantile(np.arange(1, 10), 0.1)  # n = 9: rank ceil(10 * 0.9) = 9
    9.0
    >>> conformal_quantile(np.arange(1, 9), 0.1)  # n = 8: rank 9 > 8
    inf
    """
    alpha = check_level(alpha, "alpha")
    s, _ = _to_torch(scores, torch.float64)
    s = s.detach().cpu().ravel()
    n = s.numel()
    if n == 0:
        raise ValueError("scores is empty: calibration needs at least one point")
    if bool(torch.isnan(s).any()):
        raise ValueError(
            f"scores hold {int(torch.isnan(s).sum())} NaN of {n}: the quantile would be wrong "
            "(a NaN sorts above every score); remove those calibration points"
        )
    # round() guards (n + 1) * (1 - alpha) against float error, e.g. 20 * 0.95 = 19.000000000000004
    k = math.ceil(round((n + 1) * (1 - alpha), 9))
    if k > n:
        return math.inf
    return float(torch.kthvalue(s, k).values)


def prediction_sets(
    probs: Any,
    qhat: float,
    *,
    score: str = "lac",
    lam: float = 0.01,
    k_reg: int = 5,
    randomized: bool = True,
    u: Any = None,
    seed: int | None = None,
) -> Any:
    """Boolean prediction sets ``[n, C]``: label ``y`` is in the set iff its score is <= ``qhat``.

    For ``aps`` / ``raps`` one uniform ``u`` per row is shared by all labels (Romano et al.), so each
    set is a prefix of the labels sorted by probability.

    >>> import numpy as np
    >>> from bayesprune.conformal import prediction_sets
    >>> prediction_sets(np.array([[0.7, 0.2, 0.1]]), 0.85).tolist()
    [[True, True, False]]
    """
    lam, k_reg = _raps_params(lam, k_reg)
    p, numpy = _to_torch(probs)
    _check_probs(p)
    uu = _uniforms(p.shape[0], u, seed, p.device) if randomized and score != "lac" else None
    return _back(_all_scores(p, score, uu, lam, k_reg) <= qhat, numpy)


class ConformalClassifier:
    """Split-conformal prediction sets for a classifier or a :class:`bayesprune.BayesianModule`.

    Probabilities come from ``model.predict(x, num_samples, seed=...)`` (posterior predictive,
    Monte Carlo averaged over posterior draws that are the same for every batch, so the scores of
    calibration and test points stay exchangeable) for a Bayesian model and from ``softmax(model(x))`` for a plain network. Calibrated on
    ``n`` held-out points at level ``alpha``, the sets satisfy
    :math:`1 - \\alpha \\le \\Pr(y \\in C(x)) < 1 - \\alpha + 1/(n+1)` (randomized scores; the upper
    bound needs continuous scores).

    Parameters
    ----------
    model
        ``BayesianModule`` or ``nn.Module`` returning logits ``[batch, num_classes]``.
    score
        ``"lac"`` (:math:`1 - p_y`), ``"aps"`` or ``"raps"`` (see :func:`raps_scores`).
    num_samples
        Posterior draws for a Bayesian model (frozen: the same draws for every batch).
    lam, k_reg
        RAPS penalty and the rank after which it applies.
    randomized
        Randomized APS / RAPS (exact coverage; sets may be empty) or not (conservative).
    seed
        Seed of the uniforms of the randomized scores and of a Bayesian model's frozen posterior
        draws (``None``: both drawn afresh, the draws from torch's generator).
    num_classes
        Number of classes (default: ``model.num_classes`` or the width of the first output).

    Example
    -------
    >>> from bayesprune.data import load_digits, loader
    >>> from bayesprune.conformal import ConformalClassifier
    >>> from bayesprune.models import lenet_300_100
    >>> splits = load_digits(seed=0)
    >>> net = lenet_300_100(in_features=64)  # untrained: sets are large, but coverage holds
    >>> cp = ConformalClassifier(net, score="aps").calibrate(loader(splits.cal, shuffle=False), 0.1)
    >>> cp.evaluate(loader(splits.test, shuffle=False))["coverage"] > 0.8
    True
    """

    def __init__(
        self,
        model: Any,
        score: Literal["lac", "aps", "raps"] = "lac",
        *,
        num_samples: int = 32,
        lam: float = 0.01,
        k_reg: int = 5,
        randomized: bool = True,
        seed: int | None = 0,
        num_classes: int | None = None,
    ) -> None:
        if score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
        lam, k_reg = _raps_params(lam, k_reg)
        # a BayesianModule gives posterior predictive probabilities; anything else is a plain net
        self.bayesian = is_bayesian(model) or (
            callable(getattr(model, "predict", None)) and not isinstance(model, nn.Module)
        )
        if not self.bayesian and not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a BayesianModule or an nn.Module, got {type(model).__name__}"
            )
        self.model, self.score, self.num_samples = model, score, int(num_samples)
        self.lam, self.k_reg, self.randomized = float(lam), int(k_reg), bool(randomized)
        self.device = device_of(model)
        self.num_classes = num_classes or getattr(model, "num_classes", None)
        self._gen = torch.Generator(device=self.device)
        if seed is not None:
            self._gen.manual_seed(check_seed(seed))
        else:
            self._gen.seed()
        # drawn once: the predictive must be one fixed function for calibration and test alike
        self._draw_seed = draw_seed(seed) if is_bayesian(model) else None
        self.qhat: float | None = None
        self.alpha: float | None = None
        self.n: int | None = None

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[batch, C]`` on the model's device."""
        x = check_finite(input_tensor(x), "inputs").to(self.device)
        if self._draw_seed is not None:
            p = self.model.predict(x, num_samples=self.num_samples, seed=self._draw_seed)
        elif self.bayesian:
            p = self.model.predict(x, num_samples=self.num_samples)
        else:
            was = self.model.training
            self.model.eval()
            try:
                p = torch.softmax(self.model(x), dim=-1)
            finally:
                self.model.train(was)
        self.num_classes = check_outputs(p, self.num_classes, "the model")
        return p

    def _u(self, n: int) -> torch.Tensor | None:
        if self.score == "lac" or not self.randomized:
            return None
        return torch.rand(n, generator=self._gen, device=self.device, dtype=torch.float64)

    def _batches(self, data: Iterable, what: str) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        if not isinstance(data, Iterable):
            raise TypeError(f"{what} must be an iterable of (inputs, labels) batches")
        seen = False
        for batch in data:
            seen = True
            yield batch_xy(batch, what)
        if not seen:
            raise ValueError(f"{what} is empty")

    def calibrate(
        self, cal_loader: Iterable, alpha: float = 0.1, *, train_loader: Iterable | None = None
    ) -> ConformalClassifier:
        """Compute the conformal threshold from held-out ``(inputs, labels)`` batches."""
        alpha = check_level(alpha, "alpha")
        check_cal_loader(cal_loader, train_loader)
        scores = []
        for x, y in self._batches(cal_loader, "cal_loader"):
            p = self.probs(x)
            y = y.to(p.device, torch.long)
            check_labels(y, p.shape[1])
            s = _all_scores(p, self.score, self._u(len(y)), self.lam, self.k_reg)
            scores.append(s.gather(1, y[:, None])[:, 0].cpu())
        all_scores = torch.cat(scores)
        if all_scores.numel() == 0:
            raise ValueError("cal_loader is empty")
        if torch.isnan(all_scores).any():
            raise ValueError(
                "some conformal scores are NaN: the model gave NaN class probabilities for some "
                "calibration inputs"
            )
        qhat = conformal_quantile(all_scores, alpha)
        if math.isinf(qhat):
            need = math.ceil(round(1 / alpha - 1, 9))
            raise ValueError(
                f"{all_scores.numel()} calibration points are too few for alpha={alpha}: the "
                "conformal threshold is infinite and every prediction set would hold every class; "
                f"pass at least {need} points, or a larger alpha"
            )
        self.qhat, self.alpha, self.n = qhat, alpha, all_scores.numel()
        return self

    def predict_sets(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``[batch, C]`` of the labels in each prediction set."""
        if self.qhat is None:
            raise RuntimeError("call calibrate(cal_loader, alpha) before predict_sets")
        p = self.probs(x)
        return _all_scores(p, self.score, self._u(p.shape[0]), self.lam, self.k_reg) <= self.qhat

    def evaluate(self, test_loader: Iterable) -> dict[str, Any]:
        """Coverage, mean set size, and coverage stratified by set size, on labelled batches."""
        if self.qhat is None:
            raise RuntimeError("call calibrate(cal_loader, alpha) before evaluate")
        covered, sizes = [], []
        for x, y in self._batches(test_loader, "test_loader"):
            sets = self.predict_sets(x)
            y = y.to(sets.device, torch.long)
            check_labels(y, sets.shape[1])
            covered.append(sets.gather(1, y[:, None])[:, 0].cpu())
            sizes.append(sets.sum(1).cpu())
        cov, size = torch.cat(covered).double(), torch.cat(sizes)
        strata = {
            int(k): {"count": int((size == k).sum()), "coverage": float(cov[size == k].mean())}
            for k in torch.unique(size).tolist()
        }
        return {
            "coverage": float(cov.mean()),
            "mean_size": float(size.double().mean()),
            "empty_fraction": float((size == 0).double().mean()),
            "size_stratified": strata,
            "n": int(cov.numel()),
            "alpha": self.alpha,
            "qhat": self.qhat,
            "score": self.score,
        }
