"""Distribution-free guarantees for pruned networks: Learn then Test and conformal prediction sets.

Two tools, both built on plain arrays first (losses, scores) with models entering through one
adapter each. The array-level statistics (p-values, :func:`learn_then_test`,
:func:`conformal_risk_control`) live in :mod:`bayesprune.risk` and are re-exported here.

1. **Certified pruning** (:func:`learn_then_test`, :func:`certify`, :func:`certify_candidates`).
   Candidates :math:`f_1, \\dots, f_K` are ordered from least to most pruned. On each calibration
   point :math:`i` a loss :math:`L_{ji} \\in [0, 1]` is measured (e.g. ``accuracy_drop``: the
   pruned net is wrong where the dense net is right). For each null :math:`H_j: R(f_j) > \\alpha`,
   with :math:`R` the expected loss on new data, a valid p-value :math:`p_j` is computed from the
   empirical risk :math:`\\hat R_j`; fixed-sequence testing rejects :math:`H_1, H_2, \\dots` while
   :math:`p_j \\le \\delta` and stops at the first null it cannot reject. The chosen candidate is
   the last one rejected. Learn then Test (Angelopoulos, Bates, Candès, Jordan and Lei, 2021):

   .. math:: \\Pr_{\\text{cal}}\\big(R(f_{\\hat\\jmath}) \\le \\alpha\\big) \\ge 1 - \\delta.

   Fixed-sequence testing controls the family-wise error rate for any order fixed before seeing
   the calibration data, so a non-monotone risk curve (pruning is not monotone per example) is fine.

2. **Conformal prediction sets** (:class:`ConformalClassifier`): split conformal with the
   finite-sample quantile, scores ``lac`` (:math:`1 - p_y`), ``aps`` (Romano, Sesia and Candès,
   2020) and ``raps`` (Angelopoulos, Bates, Malik and Jordan, 2021), and conformal risk control
   (:func:`conformal_risk_control`, Angelopoulos, Bates, Fisch, Lei and Schuster, 2022).

**Calibration data must be disjoint from the training data** (and from anything used to choose the
candidates or the score). The conformal sets need calibration and test points exchangeable given
the model; Learn then Test needs i.i.d. calibration points (its p-values bound a mean of
independent losses). A Bayesian model's predictive is therefore one fixed function here: the same
posterior draws for every batch (``predict(seed=...)``). :func:`certify` and :meth:`ConformalClassifier.calibrate` refuse the training
loader when it is passed as ``train_loader=``; :func:`bayesprune.data.load_fashion_mnist` gives a
``cal`` split that training never sees.

Example
-------
>>> import numpy as np
>>> from bayesprune.conformal import learn_then_test
>>> rng = np.random.default_rng(0)
>>> u = rng.random(2000)
>>> losses = np.stack([u < r for r in (0.0, 0.005, 0.01, 0.05, 0.2)]).astype(float)
>>> res = learn_then_test(losses, alpha=0.02, delta=0.1)
>>> res.index  # the third candidate (true risk 0.01) is the most pruned one certified
2
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .bayesianize import _check_seed, _is_bayesian
from .data import batch_xy, check_finite, input_tensor
from .files import write_json
from .metrics import count_nonzero
from .risk import (
    METHODS,
    PVALUES,
    RISKS,
    LTTResult,
    RiskControlResult,
    _check_level,
    bentkus_pvalue,
    binomial_pvalue,
    conformal_risk_control,
    hoeffding_bentkus_pvalue,
    hoeffding_pvalue,
    learn_then_test,
    min_calibration_size,
    risk_losses,
)

__all__ = [
    "METHODS",
    "PVALUES",
    "RISKS",
    "Certificate",
    "ConformalClassifier",
    "LTTResult",
    "RiskControlResult",
    "aps_scores",
    "bentkus_pvalue",
    "binomial_pvalue",
    "certify",
    "certify_candidates",
    "conformal_quantile",
    "conformal_risk_control",
    "default_levels",
    "hoeffding_bentkus_pvalue",
    "hoeffding_pvalue",
    "lac_scores",
    "learn_then_test",
    "min_calibration_size",
    "pip_candidates",
    "prediction_sets",
    "raps_scores",
    "risk_losses",
]

_SCORES = ("lac", "aps", "raps")


# --------------------------------------------------------------------------------------------------
# model adapters: predictions of candidate networks on a calibration loader
# --------------------------------------------------------------------------------------------------


def _device_of(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device | str):
        return torch.device(dev)
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        if p is None:
            p = next(model.buffers(), None)
        return p.device if p is not None else torch.device("cpu")
    return torch.device("cpu")


def _check_cal_loader(cal_loader: Any, train_loader: Any) -> None:
    if not isinstance(cal_loader, Iterable):
        raise TypeError(
            "cal_loader must be an iterable of (inputs, labels) batches such as a DataLoader, got "
            f"{type(cal_loader).__name__}"
        )
    if train_loader is not None and (
        cal_loader is train_loader
        or (
            getattr(cal_loader, "dataset", None) is not None
            and getattr(cal_loader, "dataset", None) is getattr(train_loader, "dataset", object())
        )
    ):
        raise ValueError(
            "cal_loader is the training loader (or reads the same dataset): conformal guarantees "
            "need calibration data disjoint from the training data. Use a held-out split, e.g. "
            "loader(splits.cal, shuffle=False) from bayesprune.data."
        )


def _check_outputs(out: torch.Tensor, num_classes: int | None, who: str) -> int:
    if out.ndim != 2:
        raise ValueError(
            f"{who} returned shape {tuple(out.shape)}; expected [batch, num_classes] class scores"
        )
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(
            f"{who} returned {out.shape[1]} class scores but the task has {num_classes} classes; "
            "check that the model matches the data"
        )
    if out.is_floating_point() and bool(torch.isnan(out).any()):
        raise ValueError(
            f"{who} returned NaN class scores for finite inputs; their argmax would be "
            "an arbitrary class. Check the model's weights (bp.evaluate it on training data)"
        )
    return int(out.shape[1])


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.ndim != 1:
        raise ValueError(
            f"labels must be a 1-D tensor of class indices, got shape {tuple(y.shape)}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}) but the loader holds labels in "
            f"[{int(y.min())}, {int(y.max())}]; check the dataset or the model's number of classes"
        )


@torch.no_grad()
def _predict_labels(
    fns: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    devices: Sequence[torch.device],
    cal_loader: Iterable,
    num_classes: int | None,
    names: Sequence[str],
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """argmax predictions ``[len(fns), n]`` and labels ``[n]`` over one pass of the loader."""
    preds: list[list[np.ndarray]] = [[] for _ in fns]
    labels: list[np.ndarray] = []
    for batch in tqdm(cal_loader, desc="calibrate", disable=not progress, leave=False):
        x, y = batch_xy(batch, "cal_loader")
        check_finite(x, "calibration inputs")
        for j, (fn, dev) in enumerate(zip(fns, devices, strict=True)):
            out = fn(x.to(dev))
            num_classes = _check_outputs(out, num_classes, names[j])
            if out.shape[0] != y.shape[0]:
                raise ValueError(f"{names[j]} returned {out.shape[0]} rows for {y.shape[0]} labels")
            preds[j].append(out.argmax(-1).cpu().numpy())
        _check_labels(y, num_classes)
        labels.append(y.cpu().numpy())
    if not labels or sum(len(v) for v in labels) == 0:
        raise ValueError("cal_loader is empty: calibration needs at least one labelled point")
    return np.stack([np.concatenate(p) for p in preds]), np.concatenate(labels)


def _as_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(model, nn.Module):
        model.eval()
        return model
    if callable(model):
        return model
    raise TypeError(
        f"expected an nn.Module or a callable x -> class scores, got {type(model).__name__}"
    )


# --------------------------------------------------------------------------------------------------
# certificates
# --------------------------------------------------------------------------------------------------


def _json_float(v: Any) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


@dataclass
class Certificate:
    """A Learn-then-Test certificate for a pruned network.

    Over the draw of the ``n`` calibration points, the probability that the procedure certifies a
    model whose ``risk`` on new data from the same distribution exceeds ``alpha`` is at most
    ``delta``. When no candidate passed (``passed`` is False), ``model`` is the dense model and
    nothing is certified.

    Attributes
    ----------
    index, level
        The chosen candidate's position and level (PIP threshold, keep fraction, ...), or ``None``.
    risk_hat, p_value, params_kept
        The chosen candidate's empirical risk, p-value and fraction of (non-zero) parameters kept.
    curve
        One dict per candidate: ``level``, ``params_kept``, ``risk_hat``, ``p_value``, ``rejected``,
        ``accuracy`` (on the calibration points).
    reference
        In words, what ``accuracy_drop`` and ``disagreement`` are measured against (e.g. "the dense
        network given to bayesianize").
    reference_accuracy, accuracy
        Calibration accuracy of the reference and of the chosen network (of the unpruned network
        when nothing passed), so that a reference that is itself poor is visible.
    model
        The chosen network, in eval mode (not serialised by :meth:`save`; save it with
        :func:`bayesprune.save_pruned`).
    """

    alpha: float
    delta: float
    n: int
    risk: str
    method: str
    pvalue: str
    index: int | None
    level: Any
    risk_hat: float | None
    p_value: float | None
    params_kept: float | None
    curve: list[dict[str, Any]]
    level_name: str = "level"
    reference: str = "the reference model"
    reference_accuracy: float | None = None
    accuracy: float | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return self.index is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (everything but the model)."""
        return {
            "alpha": self.alpha,
            "delta": self.delta,
            "n": self.n,
            "risk": self.risk,
            "method": self.method,
            "pvalue": self.pvalue,
            "passed": self.passed,
            "index": self.index,
            "level_name": self.level_name,
            "level": _json_level(self.level),
            "risk_hat": _json_float(self.risk_hat),
            "p_value": _json_float(self.p_value),
            "params_kept": _json_float(self.params_kept),
            "reference": self.reference,
            "reference_accuracy": _json_float(self.reference_accuracy),
            "accuracy": _json_float(self.accuracy),
            "guarantee": self.guarantee,
            "curve": [
                {k: _json_level(v) if k == "level" else v for k, v in row.items()}
                for row in self.curve
            ],
        }

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON (atomically: :mod:`bayesprune.files`)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Certificate:
        """Read a certificate written by :meth:`save` (``model`` is ``None``)."""
        d = json.loads(Path(path).read_text())
        return cls(
            alpha=d["alpha"], delta=d["delta"], n=d["n"], risk=d["risk"], method=d["method"],
            pvalue=d["pvalue"], index=d["index"], level=d["level"], risk_hat=d["risk_hat"],
            p_value=d["p_value"], params_kept=d["params_kept"], curve=d["curve"],
            level_name=d.get("level_name", "level"),
            reference=d.get("reference", "the reference model"),
            reference_accuracy=d.get("reference_accuracy"), accuracy=d.get("accuracy"),
        )  # fmt: skip

    @property
    def risk_words(self) -> str:
        """The certified risk in words, with its reference."""
        if self.risk == "accuracy_drop":
            return (
                f"accuracy drop relative to {self.reference} (the rate of points the chosen model "
                "gets wrong while the reference gets them right)"
            )
        if self.risk == "disagreement":
            return f"disagreement with {self.reference} (the rate of points where their predictions differ)"
        return f"{self.risk} (the chosen model's own error rate; no reference)"

    @property
    def guarantee(self) -> str:
        if not self.passed:
            return (
                f"no candidate could be certified to have {self.risk_words} <= {self.alpha} at "
                f"delta={self.delta}; the unpruned network is returned, without a certificate"
            )
        return (
            f"the chosen model's {self.risk_words} on new data is <= {self.alpha}, unless the "
            f"{self.n} calibration points were unlucky: the procedure certifies a model with a "
            f"larger {self.risk} with probability <= {self.delta:.4g}"
        )

    def __str__(self) -> str:
        lines = [
            f"Learn-then-Test certificate: risk={self.risk}, alpha={self.alpha}, "
            f"delta={self.delta}, n={self.n}, {self.method.replace('_', '-')} testing, "
            f"{self.pvalue} p-values",
            f"  {self.guarantee}",
        ]
        if self.reference_accuracy is not None and self.accuracy is not None:
            which = "chosen model" if self.passed else "unpruned model"
            lines.append(
                f"  calibration accuracy: {which} {self.accuracy:.4f}, reference "
                f"({self.reference}) {self.reference_accuracy:.4f}"
            )
        shown = _fmt_levels([row["level"] for row in self.curve])
        if self.passed:
            kept = "?" if self.params_kept is None else f"{100 * self.params_kept:.2f}%"
            lines.append(
                f"  chosen: {self.level_name} {shown[self.index]} (candidate {self.index + 1} of "
                f"{len(self.curve)}), empirical risk {self.risk_hat:.4f}, p-value "
                f"{self.p_value:.3g}, params kept {kept}"
            )
        w = max(10, len(self.level_name))
        lines.append(f"  {self.level_name:>{w}} {'params':>8} {'risk':>8} {'p-value':>9}  rejected")
        for row, level in zip(self.curve, shown, strict=True):
            kept = row["params_kept"]
            lines.append(
                f"  {level:>{w}} "
                f"{'?' if kept is None else f'{100 * kept:.2f}%':>8} {row['risk_hat']:>8.4f} "
                f"{row['p_value']:>9.3g}  {'yes' if row['rejected'] else 'no'}"
            )
        return "\n".join(lines)


def _json_level(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def _fmt_levels(levels: Sequence[Any]) -> list[str]:
    """Levels as short strings, with as many digits as it takes to tell neighbours apart."""
    for digits in range(4, 13):
        out = [f"{v:.{digits}g}" if isinstance(v, float | np.floating) else str(v) for v in levels]
        if len(set(out)) == len(set(map(str, levels))):
            return out
    return [str(v) for v in levels]


def certify_candidates(
    candidates: Sequence[nn.Module | Callable[[torch.Tensor], torch.Tensor]],
    reference: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    cal_loader: Iterable,
    *,
    risk: str = "accuracy_drop",
    alpha: float = 0.02,
    delta: float = 0.1,
    levels: Sequence[Any] | None = None,
    level_name: str = "level",
    method: Literal["fixed_sequence", "bonferroni"] = "fixed_sequence",
    pvalue: Literal["hb", "hoeffding", "bentkus", "binomial", "auto"] = "auto",
    dense: nn.Module | None = None,
    params_kept: Sequence[float] | None = None,
    num_classes: int | None = None,
    train_loader: Iterable | None = None,
    progress: bool = True,
    reference_name: str | None = None,
) -> Certificate:
    """Certify the most pruned of a sequence of candidate networks (the form every method uses).

    Parameters
    ----------
    candidates
        Networks (or callables ``x -> class scores``) ordered from least to most pruned; the order
        must be fixed before looking at the calibration data.
    reference
        The dense (or Bayesian) model that ``accuracy_drop`` and ``disagreement`` compare with; any
        callable returning class scores or probabilities (only the argmax is used).
    cal_loader
        ``(inputs, labels)`` batches of calibration data, disjoint from the training data.
    risk
        ``"accuracy_drop"``, ``"disagreement"`` or ``"error"`` (see :func:`risk_losses`).
    alpha, delta, method, pvalue
        As in :func:`learn_then_test`.
    levels
        The candidates' levels (thresholds, keep fractions, ...), for the certificate only.
    dense
        The model returned when no candidate passes, and the denominator of ``params_kept``;
        defaults to ``reference`` when it is an ``nn.Module``.
    params_kept
        Fraction of parameters kept per candidate; by default non-zero parameters of each candidate
        over those of ``dense`` (right for physically pruned and for masked networks).
    num_classes
        Expected number of classes; by default the width of the reference's output.
    train_loader
        The training loader, so that a calibration loader equal to it is refused.
    reference_name
        The reference in words, for the certificate (default: "the reference network
        (<its type>)").

    Returns
    -------
    Certificate
        Its ``model`` is the chosen candidate (``dense`` when none passed), in eval mode.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from bayesprune.conformal import certify_candidates
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> dense = nn.Linear(5, 3)
    >>> x = torch.randn(400, 5)
    >>> cal = DataLoader(TensorDataset(x, dense(x).argmax(-1).detach()), batch_size=100)
    >>> cert = certify_candidates([dense, dense], dense, cal, alpha=0.05, progress=False)
    >>> cert.index, cert.risk_hat
    (1, 0.0)
    """
    alpha, delta = _check_level(alpha, "alpha"), _check_level(delta, "delta")
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates is empty: give at least one pruned network")
    if levels is not None and len(levels) != len(candidates):
        raise ValueError(f"got {len(levels)} levels for {len(candidates)} candidates")
    levels = list(range(len(candidates))) if levels is None else list(levels)
    _check_cal_loader(cal_loader, train_loader)
    if dense is None and isinstance(reference, nn.Module):
        dense = reference
    modules = [m for m in [reference, *candidates] if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    fns = [_as_fn(reference)] + [_as_fn(c) for c in candidates]
    devices = [_device_of(m) for m in [reference, *candidates]]
    names = ["the reference model"] + [f"candidate {j} ({levels[j]})" for j in range(len(levels))]
    try:
        preds, labels = _predict_labels(fns, devices, cal_loader, num_classes, names, progress)
    finally:  # evaluation switched the networks to eval mode; give them back as they were
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    losses = risk_losses(preds[1:], preds[0], labels, risk)
    res = learn_then_test(losses, alpha, delta, method=method, pvalue=pvalue)
    accs = (preds == labels[None]).mean(1)
    if reference_name is None:
        reference_name = f"the reference network ({type(reference).__name__})"
    if risk != "error" and accs[0] < accs[1] - 0.1:
        warnings.warn(
            f"the reference ({reference_name}) scores {accs[0]:.3f} on the calibration data, "
            f"{accs[1] - accs[0]:.3f} below the least pruned candidate ({accs[1]:.3f}): a drop "
            "relative to it says little about accuracy. Was it trained? Certify against a trained "
            "dense network, or the posterior predictive (reference='predictive')",
            UserWarning,
            stacklevel=2,
        )
    if params_kept is None:
        if isinstance(dense, nn.Module):
            total = count_nonzero(dense)
            params_kept = [
                count_nonzero(c) / total if isinstance(c, nn.Module) else None for c in candidates
            ]
        else:
            params_kept = [None] * len(candidates)
    curve = [
        {
            "level": levels[j],
            "params_kept": None if params_kept[j] is None else float(params_kept[j]),
            "risk_hat": float(res.risks[j]),
            "p_value": float(res.p_values[j]),
            "rejected": bool(res.rejected[j]),
            "accuracy": float(accs[j + 1]),
        }
        for j in range(len(candidates))
    ]
    j = res.index
    chosen = dense if j is None else candidates[j]
    if isinstance(chosen, nn.Module):
        chosen.eval()  # a deployable network: BatchNorm uses its running statistics
    if j is not None:
        accuracy = float(accs[j + 1])
    elif dense is reference:
        accuracy = float(accs[0])
    else:
        accuracy = None
    return Certificate(
        alpha=alpha, delta=delta, n=res.n, risk=risk, method=method, pvalue=res.pvalue,
        index=j, level=None if j is None else levels[j],
        risk_hat=None if j is None else float(res.risks[j]),
        p_value=None if j is None else float(res.p_values[j]),
        params_kept=(1.0 if dense is not None else None) if j is None else curve[j]["params_kept"],
        curve=curve, level_name=level_name, reference=reference_name,
        reference_accuracy=float(accs[0]), accuracy=accuracy, model=chosen,
    )  # fmt: skip


def default_levels(pips: Mapping[str, Any], max_levels: int = 20) -> list[float]:
    """PIP thresholds from least to most pruned: the median-probability model, then up to
    ``max_levels - 1`` PIP quantiles of the nodes it keeps.

    Each threshold :math:`t` keeps the nodes with :math:`\\mathrm{PIP} \\ge t`. The first is
    :math:`t = 1/2`, the median-probability model (Barbieri and Berger, 2004). A lower threshold
    would add nodes that the posterior more likely switches off, at their slab means (the
    posterior mean given inclusion), which makes the network worse than the predictive, not
    better; and fixed-sequence testing, which starts at the least pruned candidate, would stop
    there and certify nothing. The later thresholds are snapped to observed PIP values, so each one
    prunes strictly more nodes than the previous. For other levels, pass ``levels=`` to
    :func:`certify`.

    >>> from bayesprune.conformal import default_levels
    >>> default_levels({"0": [0.1, 0.2, 0.6, 0.9, 0.95]}, max_levels=10)
    [0.5, 0.9, 0.95]
    """
    if max_levels < 1:
        raise ValueError(f"max_levels must be at least 1, got {max_levels}")
    values = [
        (
            v.detach().double().cpu().numpy() if torch.is_tensor(v) else np.asarray(v, np.float64)
        ).ravel()
        for v in pips.values()
    ]
    flat = np.concatenate(values) if values else np.zeros(0)
    if flat.size == 0:
        raise ValueError(
            "the model has no node inclusion probabilities; bayesianize it with a node-level prior "
            "(e.g. SpikeAndSlab(level='node')) or pass levels="
        )
    uniq = np.unique(flat)
    if uniq.size < 2:
        raise ValueError(
            f"every prunable node has the same PIP ({uniq[0]:.6g}), so no PIP threshold prunes "
            "some nodes but not all"
            + (
                " (the posterior includes them all with near certainty, typical of a short fit "
                "of a pretrained net). Certify by keep fraction, certify(..., by='keep'), which "
                "ranks the nodes by their log-odds of inclusion; or fit for more epochs"
                if uniq[0] >= 0.5
                else ". Fit for more epochs, or check the prior (the fit may have collapsed)"
            )
        )
    kept = np.unique(flat[flat >= 0.5])
    if kept.size < 2:  # the median-probability model is the only sensible level
        return [0.5]
    qs = np.quantile(flat[flat >= 0.5], np.linspace(0.0, 1.0, max_levels)[1:])
    snapped = kept[np.minimum(np.searchsorted(kept, qs, side="left"), kept.size - 1)]
    return [0.5] + [float(t) for t in np.unique(snapped) if t > kept[0]]


def _prunable_pips(pips: Mapping[str, Any], groups: Sequence[Any]) -> dict[str, torch.Tensor]:
    """PIPs of the layers whose nodes can be physically removed.

    A frozen channel group (the network's output, a concatenation, ...) is kept whole by the
    pruner but its masked nodes would still be zeroed: for the output layer that deletes classes.
    Such a candidate is never smaller, only worse, so certify does not generate it.
    """
    if not pips:
        raise ValueError(
            "this BayesianModule has no node-level inclusion probabilities (Gaussian or "
            "weight-level priors give none); bayesianize with a node-level prior such as "
            "SpikeAndSlab(level='node') or GroupHorseshoe"
        )
    prunable = {p for g in groups if not g.frozen for p in g.producers}
    out = {k: torch.as_tensor(v).detach().double().cpu() for k, v in pips.items() if k in prunable}
    if not out:
        raise ValueError(
            "no layer with node inclusion probabilities can be pruned (only frozen layers, such "
            "as the output layer, carry PIPs); bayesianize with a node-level prior on hidden layers"
        )
    return out


def _masks_at(
    pips: Mapping[str, torch.Tensor],
    level: float,
    by: str,
    logits: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Node decisions at one level: PIP >= threshold, or the top ``keep`` fraction (global),
    ranked by log-odds of inclusion when given (PIPs saturate at 1.0, their log-odds do not)."""
    if by == "threshold":
        return {k: v >= level for k, v in pips.items()}
    if logits is not None:
        pips = {k: logits[k] for k in pips}
    flat = torch.cat(list(pips.values()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.argsort(-flat, stable=True)[: max(1, round(level * flat.numel()))]] = True
    return dict(zip(pips, torch.split(chosen, [v.numel() for v in pips.values()]), strict=True))


class _Predictive:
    """The posterior predictive of a BayesianModule as a callable that knows its device.

    Its posterior draws are frozen (``predict(seed=...)``): the same function of ``x`` for every
    calibration batch, so the per-example losses stay independent.
    """

    def __init__(
        self, model: Any, num_samples: int, device: torch.device, seed: int | None
    ) -> None:
        self.model, self.num_samples, self.device = model, num_samples, device
        self.seed = _draw_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.predict(x, num_samples=self.num_samples, seed=self.seed)


_REFERENCES = ("dense", "predictive", "mean")


def _draw_seed(seed: int | None) -> int:
    """``seed``, or one drawn from torch's global generator (reproducible under ``torch.manual_seed``)."""
    return int(torch.randint(2**62, (1,))) if seed is None else seed


def pip_candidates(
    model: Any,
    levels: Sequence[float] | None = None,
    *,
    by: Literal["threshold", "keep"] = "threshold",
    example_input: Any = None,
    max_levels: int = 20,
    prune_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> tuple[list[float], list[nn.Module]]:
    """The candidates of :func:`certify`: pruned plain networks from least to most pruned.

    Candidate :math:`j` keeps the nodes with :math:`\\mathrm{PIP} \\ge t_j` for increasing
    thresholds (or the top fraction :math:`f_j` of nodes by PIP for decreasing fractions with
    ``by="keep"``; by default from the median-probability model's fraction down, see
    :func:`default_levels`), built by :func:`bayesprune.prune` with those masks. Only layers the pruner can
    shrink take part: a frozen layer such as the output layer is kept whole (zeroing its nodes
    would delete classes without making the network smaller).

    Returns
    -------
    levels, candidates
    """
    # prune.py imports nothing from here; its example-input inference is reused, not copied
    from .prune import _infer_example_input, dependency_groups
    from .prune import prune as prune_network

    if not _is_bayesian(model):
        raise TypeError(
            f"expected a bayesprune BayesianModule, got {type(model).__name__}; for a plain "
            "network's sequence of pruned candidates use certify_candidates(candidates, dense, "
            "cal_loader)"
        )
    if by not in ("threshold", "keep"):
        raise ValueError(f"by must be 'threshold' or 'keep', got {by!r}")
    dense = model.mean_module()
    x = _infer_example_input(model, dense) if example_input is None else example_input
    x = x.to(_device_of(dense)) if torch.is_tensor(x) else x
    pips = _prunable_pips(model.inclusion_probs(), dependency_groups(dense, x))
    logits = (
        model.inclusion_logits() if callable(getattr(model, "inclusion_logits", None)) else None
    )
    if levels is None:
        if by == "threshold":
            levels = default_levels(pips, max_levels)
        else:  # from the median-probability model's share of the nodes down (default_levels)
            flat = torch.cat([p.flatten().float().cpu() for p in pips.values()])
            top = max(float((flat >= 0.5).float().mean()), 1 / len(flat))  # at least one node
            levels = [top] + [round(f, 4) for f in np.linspace(0.95, 0.05, 19) if f < top - 1e-4]
    levels = [float(v) for v in levels]
    if not levels:
        raise ValueError("levels is empty")
    steps = np.diff(levels)
    if (by == "threshold" and np.any(steps <= 0)) or (by == "keep" and np.any(steps >= 0)):
        order = "increasing PIP thresholds" if by == "threshold" else "decreasing keep fractions"
        raise ValueError(f"levels must be {order} (least pruned first), got {levels}")
    if by == "keep" and not all(0 < f <= 1 for f in levels):
        raise ValueError(f"keep fractions must be in (0, 1], got {levels}")
    if by == "threshold" and not all(0 <= t <= 1 for t in levels):
        raise ValueError(f"PIP thresholds must be in [0, 1], got {levels}")
    kwargs = dict(prune_kwargs or {})
    with warnings.catch_warnings():
        # high thresholds empty layers and the pruner's floor keeps a node there; the curve's
        # params_kept shows the real size, so one warning per candidate would only be noise
        warnings.filterwarnings("ignore", message="the node decisions keep 0")
        candidates = [
            prune_network(model, masks=_masks_at(pips, t, by, logits), example_input=x, **kwargs)
            for t in tqdm(levels, desc="prune candidates", disable=not progress, leave=False)
        ]
    return levels, candidates


def certify(
    model: Any,
    cal_loader: Iterable,
    *,
    risk: str = "accuracy_drop",
    alpha: float = 0.02,
    delta: float = 0.1,
    levels: Sequence[float] | None = None,
    by: Literal["threshold", "keep"] = "threshold",
    method: Literal["fixed_sequence", "bonferroni"] = "fixed_sequence",
    pvalue: Literal["hb", "hoeffding", "bentkus", "binomial", "auto"] = "auto",
    reference: Literal["dense", "predictive", "mean"] | nn.Module | Callable = "dense",
    train_loader: Iterable | None = None,
    example_input: Any = None,
    num_samples: int = 32,
    max_levels: int = 20,
    prune_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    seed: int | None = None,
) -> Certificate:
    """Certified pruning of a :class:`bayesprune.BayesianModule` by Learn then Test.

    The candidates come from :func:`pip_candidates` (increasing PIP thresholds, or decreasing keep
    fractions with ``by="keep"``: least to most pruned); :func:`certify_candidates` then picks the
    most pruned one whose risk is certified to be at most ``alpha`` with probability
    ``1 - delta`` over the calibration set.

    Parameters
    ----------
    model
        A fitted ``BayesianModule`` (``inclusion_probs``, ``mean_module``, ``predict``).
    cal_loader
        Calibration batches, disjoint from the training data (see the module docstring).
    risk
        ``"accuracy_drop"`` (default; relative to the reference), ``"disagreement"`` or ``"error"``.
    alpha, delta, method, pvalue
        As in :func:`learn_then_test`.
    levels
        PIP thresholds, increasing (default :func:`default_levels`), or keep fractions, decreasing.
    reference
        What ``accuracy_drop`` and ``disagreement`` are measured against, i.e. "how much worse than
        what" the certificate promises:

        * ``"dense"`` (default): the dense network given to :func:`bayesprune.bayesianize`, with
          the weights it had then (:meth:`~bayesprune.BayesianModule.dense_module`; saved with
          the module). This is the README's promise: how much worse the pruned network may be
          than the dense one. If that network was untrained, a warning says so;
        * an ``nn.Module`` (or a callable ``x -> class scores``): your own dense network;
        * ``"predictive"``: the posterior predictive (``model.predict`` with ``num_samples`` draws,
          frozen: the same ``num_samples`` posterior draws for every calibration batch);
        * ``"mean"``: the dense posterior-mean network ``model.mean_module()``.

        The certificate states the reference in words (``cert.reference``) with its calibration
        accuracy next to the chosen network's. When no candidate passes, the returned model is
        the reference network (``"dense"``, ``"mean"`` or yours) or, for ``"predictive"``, the
        posterior-mean network.
    seed
        Seed of the predictive reference's frozen draws (default: drawn from torch's generator).
    train_loader
        The training loader, so that a calibration loader equal to it is refused.
    example_input, max_levels, prune_kwargs
        Passed to :func:`pip_candidates` (and on to :func:`bayesprune.prune`).

    Example
    -------
    >>> from bayesprune.conformal import certify
    >>> from bayesprune.data import loader
    >>> cert = certify(bnet, loader(splits.cal, shuffle=False), alpha=0.02)  # doctest: +SKIP
    >>> small = cert.model; print(cert); cert.save("certificate.json")  # doctest: +SKIP
    """
    if isinstance(reference, str):
        if reference not in _REFERENCES:
            raise ValueError(
                f"reference must be one of {_REFERENCES}, an nn.Module or a callable, got {reference!r}"
            )
    elif not callable(reference):
        raise TypeError(
            f"reference must be one of {_REFERENCES}, an nn.Module or a callable x -> class "
            f"scores, got {type(reference).__name__}"
        )
    _check_level(alpha, "alpha"), _check_level(delta, "delta")
    if _is_bayesian(model):
        _check_cal_loader(cal_loader, train_loader)
    levels, candidates = pip_candidates(
        model, levels, by=by, example_input=example_input, max_levels=max_levels,
        prune_kwargs=prune_kwargs, progress=progress,
    )  # fmt: skip
    dev = _device_of(model)
    mean = model.mean_module().to(dev)
    for c in candidates:
        c.to(dev)
    if reference == "predictive":
        ref: Any = _Predictive(model, num_samples, dev, seed)
        name, dense = f"the posterior predictive ({num_samples} frozen posterior draws)", mean
    elif reference == "mean":
        ref, name, dense = mean, "the posterior-mean network", mean
    elif reference == "dense":
        if not callable(getattr(model, "dense_module", None)):
            raise TypeError(
                f"{type(model).__name__} has no dense_module() (ARCHITECTURE.md), so certify cannot "
                "measure the drop relative to the dense network; pass it: certify(model, cal, "
                "reference=dense_net), or reference='predictive'"
            )
        ref = model.dense_module().to(dev)
        name, dense = "the dense network given to bayesianize", ref
    else:
        ref, name = reference, f"the dense network passed as reference ({type(reference).__name__})"
        dense = reference if isinstance(reference, nn.Module) else mean
    return certify_candidates(
        candidates, ref, cal_loader, risk=risk, alpha=alpha, delta=delta, levels=levels,
        level_name="PIP threshold" if by == "threshold" else "keep fraction", method=method,
        pvalue=pvalue, dense=dense, num_classes=getattr(model, "num_classes", None),
        train_loader=train_loader, progress=progress, reference_name=name,
    )  # fmt: skip


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
        gen.manual_seed(_check_seed(seed))
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
    _check_labels(y, p.shape[1])
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
    alpha = _check_level(alpha, "alpha")
    s, _ = _to_torch(scores, torch.float64)
    s = s.detach().cpu().ravel()
    n = s.numel()
    if n == 0:
        raise ValueError("scores is empty: calibration needs at least one point")
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
    >>> from models import lenet_300_100
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
        self.bayesian = _is_bayesian(model) or (
            callable(getattr(model, "predict", None)) and not isinstance(model, nn.Module)
        )
        if not self.bayesian and not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a BayesianModule or an nn.Module, got {type(model).__name__}"
            )
        self.model, self.score, self.num_samples = model, score, int(num_samples)
        self.lam, self.k_reg, self.randomized = float(lam), int(k_reg), bool(randomized)
        self.device = _device_of(model)
        self.num_classes = num_classes or getattr(model, "num_classes", None)
        self._gen = torch.Generator(device=self.device)
        if seed is not None:
            self._gen.manual_seed(_check_seed(seed))
        else:
            self._gen.seed()
        # drawn once: the predictive must be one fixed function for calibration and test alike
        self._draw_seed = _draw_seed(seed) if _is_bayesian(model) else None
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
        self.num_classes = _check_outputs(p, self.num_classes, "the model")
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
        alpha = _check_level(alpha, "alpha")
        _check_cal_loader(cal_loader, train_loader)
        scores = []
        for x, y in self._batches(cal_loader, "cal_loader"):
            p = self.probs(x)
            y = y.to(p.device, torch.long)
            _check_labels(y, p.shape[1])
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
            _check_labels(y, sets.shape[1])
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
