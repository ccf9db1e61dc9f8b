"""Candidate networks for Learn then Test: pruned networks at increasing PIP thresholds (or
decreasing keep fractions), least pruned first, built from one dependency graph of the
architecture (:func:`pip_candidates`, :func:`default_levels`)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._guarantee_checks import device_of
from ._utils import is_bayesian

__all__ = ["default_levels", "pip_candidates"]


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

    >>> from bayesprune.certificate import default_levels
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
    ranked by log-odds of inclusion when given (PIPs saturate at 1.0, their log-odds do not).
    Nodes with the same score (gates at the bounds where :mod:`bayesprune.gate_tests` leaves
    them) are taken in equal shares from every layer, in index order within a layer: a global
    tie broken by index alone would empty the last layers first."""
    if by == "threshold":
        return {k: v >= level for k, v in pips.items()}
    if logits is not None:
        pips = {k: logits[k] for k in pips}
    flat = torch.cat(list(pips.values())).double()
    share = torch.cat(
        [torch.arange(v.numel(), dtype=torch.float64) / v.numel() for v in pips.values()]
    )
    order = np.lexsort((share.numpy(), -flat.numpy()))  # by score, then by share of the layer
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.as_tensor(order[: max(1, round(level * flat.numel()))])] = True
    return dict(zip(pips, torch.split(chosen, [v.numel() for v in pips.values()]), strict=True))


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
    # the pruning package imports nothing from here; its example-input inference is reused, not
    # copied
    from .pruning import DependencyGraph, dependency_groups
    from .pruning import prune as prune_network
    from .pruning.api import infer_example_input

    if not is_bayesian(model):
        raise TypeError(
            f"expected a bayesprune BayesianModule, got {type(model).__name__}; for a plain "
            "network's sequence of pruned candidates use certify_candidates(candidates, dense, "
            "cal_loader)"
        )
    if by not in ("threshold", "keep"):
        raise ValueError(f"by must be 'threshold' or 'keep', got {by!r}")
    dense = model.mean_module()
    x = infer_example_input(model, dense) if example_input is None else example_input
    x = x.to(device_of(dense)) if torch.is_tensor(x) else x
    # one trace of the architecture serves every candidate (they differ in weights, not shape)
    graph = DependencyGraph(dense, x) if isinstance(dense, nn.Module) else None
    pips = _prunable_pips(model.inclusion_probs(), dependency_groups(dense, x, graph=graph))
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
            prune_network(
                model, masks=_masks_at(pips, t, by, logits), example_input=x, graph=graph, **kwargs
            )
            for t in tqdm(levels, desc="prune candidates", disable=not progress, leave=False)
        ]
    return levels, candidates
