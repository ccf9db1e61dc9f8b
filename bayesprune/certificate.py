"""Certified pruning: Learn then Test over a sequence of pruning levels.

Candidates :math:`f_1, \\dots, f_K` are ordered from least to most pruned, the order fixed before the
calibration data are seen. On each calibration point :math:`i` a loss :math:`L_{ji} \\in [0, 1]` is
measured (e.g. ``accuracy_drop``: the pruned net is wrong where the reference net is right). For
each null :math:`H_j: R(f_j) > \\alpha`, with :math:`R` the expected loss on new data, a valid
p-value :math:`p_j` is computed from the empirical risk :math:`\\hat R_j`; fixed-sequence testing
rejects :math:`H_1, H_2, \\dots` while :math:`p_j \\le \\delta` and stops at the first null it
cannot reject. The chosen candidate is the last one rejected, and

.. math:: \\Pr_{\\text{cal}}\\big(R(f_{\\hat\\jmath}) \\le \\alpha\\big) \\ge 1 - \\delta.

Fixed-sequence testing controls the family-wise error rate for any order fixed before seeing the
calibration data, so a non-monotone risk curve (pruning is not monotone per example) is fine.

The statistics (p-values, :func:`~bayesprune.risk.learn_then_test`) work on arrays in
:mod:`bayesprune.risk`; this module is their adapter to networks. :func:`certify_candidates` takes
any sequence of candidates (every baseline's goes through it); :func:`certify` builds them from a
:class:`bayesprune.BayesianModule`'s inclusion probabilities (:func:`pip_candidates`) and measures
the drop against a stated reference. Both return a :class:`Certificate`.

**Calibration data must be disjoint from the training data** (and from anything used to choose the
candidates). Learn then Test needs i.i.d. calibration points (its p-values bound a mean of
independent losses), so a Bayesian reference is one fixed function: the same posterior draws for
every batch (``predict(seed=...)``). Both functions refuse the training loader when it is passed as
``train_loader=``; :func:`bayesprune.data.load_fashion_mnist` gives a ``cal`` split training never sees.

References: Angelopoulos, Bates, Candès, Jordan and Lei, "Learn then Test: Calibrating predictive
algorithms to achieve risk control", arXiv:2110.01052 (2021); Bates, Angelopoulos, Lei, Malik and
Jordan, "Distribution-free, risk-controlling prediction sets", J. ACM 68(6) (2021), for the
Hoeffding-Bentkus p-value; Barbieri and Berger, "Optimal predictive model selection", Ann. Statist.
32(3) (2004), for the median-probability model that :func:`default_levels` starts from.

Example
-------
>>> import torch
>>> from torch import nn
>>> from torch.utils.data import DataLoader, TensorDataset
>>> import bayesprune as bp
>>> from bayesprune.certificate import certify_candidates
>>> _ = torch.manual_seed(0)
>>> dense = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
>>> x = torch.randn(2000, 8)
>>> cal = DataLoader(TensorDataset(x, dense(x).argmax(-1).detach()), batch_size=500)
>>> score = dense[0].weight.detach().norm(dim=1) * dense[2].weight.detach().norm(dim=0)
>>> keep = [0.9, 0.75, 0.5, 0.25]  # fractions of hidden nodes kept, least pruned first
>>> masks = [{"0": score >= score.quantile(1 - f)} for f in keep]
>>> candidates = [bp.prune_module(dense, m, x[:1]) for m in masks]
>>> [c[0].out_features for c in candidates]  # physically smaller networks
[28, 24, 16, 8]
>>> cert = certify_candidates(candidates, dense, cal, alpha=0.1, levels=keep, progress=False)
>>> cert.passed, cert.level  # keeping half the nodes costs more than 10 points of accuracy
(True, 0.75)
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._guarantee_checks import check_cal_loader, check_labels, check_outputs, device_of, draw_seed
from ._utils import check_level, is_bayesian
from .candidates import default_levels, pip_candidates  # re-exported: the candidates certify tests
from .data import batch_xy, check_finite
from .files import write_json
from .metrics import count_nonzero
from .risk import RISKS, learn_then_test, risk_losses

__all__ = ["Certificate", "certify", "certify_candidates", "default_levels", "pip_candidates"]


# --------------------------------------------------------------------------------------------------
# model adapters: predictions of candidate networks on a calibration loader
# --------------------------------------------------------------------------------------------------


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
            num_classes = check_outputs(out, num_classes, names[j])
            if out.shape[0] != y.shape[0]:
                raise ValueError(f"{names[j]} returned {out.shape[0]} rows for {y.shape[0]} labels")
            preds[j].append(out.argmax(-1).cpu().numpy())
        check_labels(y, num_classes)
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
    >>> from bayesprune.certificate import certify_candidates
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> dense = nn.Linear(5, 3)
    >>> x = torch.randn(400, 5)
    >>> cal = DataLoader(TensorDataset(x, dense(x).argmax(-1).detach()), batch_size=100)
    >>> cert = certify_candidates([dense, dense], dense, cal, alpha=0.05, progress=False)
    >>> cert.index, cert.risk_hat
    (1, 0.0)
    """
    alpha, delta = check_level(alpha, "alpha"), check_level(delta, "delta")
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates is empty: give at least one pruned network")
    if levels is not None and len(levels) != len(candidates):
        raise ValueError(f"got {len(levels)} levels for {len(candidates)} candidates")
    levels = list(range(len(candidates))) if levels is None else list(levels)
    check_cal_loader(cal_loader, train_loader)
    if is_bayesian(reference) and not isinstance(reference, _Predictive):
        raise TypeError(
            "reference is a BayesianModule: one forward pass of it is one random posterior draw, "
            "a different function for every batch. Certify against its posterior predictive with "
            "certify(bnet, cal, reference='predictive'), or pass bnet.mean_module()"
        )
    if dense is None and isinstance(reference, nn.Module):
        dense = reference
    modules = [m for m in [reference, *candidates] if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    fns = [_as_fn(reference)] + [_as_fn(c) for c in candidates]
    devices = [device_of(m) for m in [reference, *candidates]]
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
    # a deployable network (BatchNorm on its running statistics); the caller's own reference
    # network comes back as it was given, its mode untouched
    if isinstance(chosen, nn.Module) and chosen is not reference:
        chosen.eval()
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


class _Predictive:
    """The posterior predictive of a BayesianModule as a callable that knows its device.

    Its posterior draws are frozen (``predict(seed=...)``): the same function of ``x`` for every
    calibration batch, so the per-example losses stay independent.
    """

    def __init__(
        self, model: Any, num_samples: int, device: torch.device, seed: int | None
    ) -> None:
        self.model, self.num_samples, self.device = model, num_samples, device
        self.seed = draw_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.predict(x, num_samples=self.num_samples, seed=self.seed)


_REFERENCES = ("dense", "predictive", "mean")


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
    >>> from bayesprune.certificate import certify
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
    check_level(alpha, "alpha"), check_level(delta, "delta")
    if is_bayesian(model):
        check_cal_loader(cal_loader, train_loader)
    levels, candidates = pip_candidates(
        model, levels, by=by, example_input=example_input, max_levels=max_levels,
        prune_kwargs=prune_kwargs, progress=progress,
    )  # fmt: skip
    dev = device_of(model)
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
