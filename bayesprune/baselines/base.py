"""The common interface of the baseline pruning methods.

Every method turns a trained plain network (and data where it needs it) into

* ``scores``: per node (structured methods: layer path -> one score per output unit / filter) or per
  weight (unstructured methods: parameter name -> a tensor of the parameter's shape); higher = more
  important;
* ``masks(level)``: the pruning decision at ``level``, the fraction of the prunable units (nodes
  or weights) removed, in ``[0, 1)``;
* ``prune(level)``: a plain ``nn.Module`` — physically smaller for structured methods (through
  :func:`bayesprune.prune_module`), masked (zeroed) for unstructured ones;
* ``candidates(levels)``: ``prune`` at increasing levels, from least to most pruned, which is the
  form :func:`bayesprune.conformal.certify_candidates` (Learn then Test) takes, so one selection
  rule certifies every method (``method.certify(cal_loader, levels)``).

Example
-------
>>> import torch
>>> from torch import nn
>>> from bayesprune.baselines import MagnitudePruning
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> method = MagnitudePruning(structured=True).fit(net, example_input=torch.zeros(1, 4))
>>> small = method.prune(0.5)
>>> small[0].out_features
4
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import registry
from ..metrics import count_nonzero, count_params
from ..pruning import dependency_groups, prune_module

__all__ = [
    "PruningMethod",
    "PruningResult",
    "global_node_masks",
    "global_weight_masks",
    "hidden_layers",
    "layer_relative",
    "prunable_parameters",
]

#: the layers the baselines score: bayesprune.registry's built-in ones (and their subclasses), except
#: Conv3d (no 3-D baseline rules); a family registered with a LayerSpec of its own is kept whole
LAYER_TYPES = tuple(t for t in registry.LAYER_TYPES if t is not nn.Conv3d)


@dataclass
class PruningResult:
    """One pruned network and what produced it.

    Attributes
    ----------
    module
        The pruned plain network (physically smaller when ``structured``, else zeroed weights).
    scores
        The scores the method ranked by (per node or per weight).
    masks
        The decision: layer path -> keep vector per node (structured) or parameter name -> keep
        tensor of the parameter's shape (unstructured).
    level
        Fraction of the prunable units removed.
    structured
        Whether nodes (``True``) or single weights were removed.
    wall_time
        Seconds spent by the method: fitting its scores (``fit``) plus building this network.
    params_kept
        Non-zero parameters of ``module`` over the parameters of the dense network.
    """

    module: nn.Module
    scores: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    level: float
    structured: bool
    wall_time: float
    params_kept: float = field(default=float("nan"))


def hidden_layers(net: nn.Module, example_input: Any, *, heads: bool = False) -> list[str]:
    """Paths of the Linear / Conv layers whose output nodes can be removed, in module order.

    A layer qualifies when it alone produces its channel space and that space is not frozen
    (:func:`bayesprune.dependency_groups`): the output layer, and layers tied to others by a
    residual addition, are left out, so structured methods never prune them. With ``heads``, the
    layers whose nodes are groups of several tensors (``LayerSpec(nodes=...)``: the heads of an
    ``nn.MultiheadAttention``) count too.
    """
    single = {
        g.producers[0]
        for g in dependency_groups(net, example_input)
        if g.prunable and len(g.producers) == 1
    }

    def counts(m: nn.Module) -> bool:
        spec = registry.layer_spec(m)
        return isinstance(m, LAYER_TYPES) or (heads and spec is not None and spec.nodes is not None)

    return [name for name, m in net.named_modules() if name in single and counts(m)]


def prunable_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    """Weights and biases of every Linear / Conv layer (what unstructured methods prune)."""
    out: dict[str, nn.Parameter] = {}
    for name, m in net.named_modules():
        if isinstance(m, LAYER_TYPES):
            for pname, p in m.named_parameters(recurse=False):
                out[f"{name}.{pname}" if name else pname] = p
    return out


def _check_level(level: float) -> float:
    try:
        level = float(level)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"level must be a number in [0, 1), got {level!r}") from exc
    if not 0.0 <= level < 1.0 or math.isnan(level):
        raise ValueError(
            f"level is the fraction of prunable units removed and must be in [0, 1), got {level}"
        )
    return level


def _example_from(loader: Iterable | None, example_input: Any) -> torch.Tensor:
    if example_input is not None:
        return example_input
    if loader is None:
        raise ValueError("pass example_input= (one input batch) or a train_loader to take it from")
    try:
        x = next(iter(loader))[0]
    except (StopIteration, TypeError, IndexError) as exc:
        raise ValueError(
            "could not take an example input from train_loader: it must yield (inputs, labels) "
            "batches; or pass example_input="
        ) from exc
    return x[:1]


class PruningMethod(ABC):
    """A pruning method behind one interface (see the module docstring).

    Subclasses implement :meth:`_fit` (compute ``self.scores``, may retrain a copy of the network
    into ``self.net``) and :meth:`_masks`; :meth:`masks` (which checks the level), :meth:`prune`,
    :meth:`candidates`, :meth:`result` and :meth:`certify` come from here.
    """

    #: short name used in tables
    name: str = "method"
    #: whether the method removes nodes (True) or single weights (False)
    structured: bool = True

    def __init__(self) -> None:
        self.net: nn.Module | None = None
        self.dense: nn.Module | None = None
        self.scores: dict[str, torch.Tensor] = {}
        self.example_input: torch.Tensor | None = None
        self.fit_time: float = float("nan")
        self._dense_params = 0

    # -- to implement ---------------------------------------------------------------------------
    @abstractmethod
    def _fit(self, net: nn.Module, train_loader: Iterable | None, **kwargs: Any) -> None:
        """Compute ``self.scores`` (and, for methods that retrain, set ``self.net``)."""

    @abstractmethod
    def _masks(self, level: float) -> dict[str, torch.Tensor]:
        """The decision at ``level``, already checked to be in [0, 1) (see :meth:`masks`)."""

    # -- common ---------------------------------------------------------------------------------
    def fit(
        self,
        net: nn.Module,
        train_loader: Iterable | None = None,
        *,
        example_input: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> PruningMethod:
        """Score the units of a trained plain network ``net`` (not modified); returns ``self``."""
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a trained torch.nn.Module, got {type(net).__name__}")
        if not prunable_parameters(net):
            raise ValueError(
                f"{type(net).__name__} has no Linear / Conv1d / Conv2d layer: nothing to prune"
            )
        self.example_input = _example_from(train_loader, example_input)
        self.net = copy.deepcopy(net).eval()
        #: the network as given: the reference of ``certify`` (methods that retrain change ``net``)
        self.dense = copy.deepcopy(net).eval()
        self._dense_params = count_params(net)
        start = time.perf_counter()
        self._fit(self.net, train_loader, **kwargs)
        self.fit_time = time.perf_counter() - start
        return self

    def _require_fit(self) -> nn.Module:
        if self.net is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(net, ...) first")
        return self.net

    def _device_input(self) -> torch.Tensor:
        net = self._require_fit()
        p = next(net.parameters())
        return self.example_input.to(p.device)

    def apply(self, masks: Mapping[str, torch.Tensor]) -> nn.Module:
        """The plain network for a decision: physically pruned (structured) or zeroed."""
        net = self._require_fit()
        if self.structured:
            return prune_module(net, masks, self._device_input()).eval()
        out = copy.deepcopy(net).eval()
        params = prunable_parameters(out)
        with torch.no_grad():
            for name, keep in masks.items():
                params[name].mul_(keep.to(params[name].device, params[name].dtype))
        return out

    def masks(self, level: float) -> dict[str, torch.Tensor]:
        """The pruning decision that removes the fraction ``level`` of the prunable units."""
        level = _check_level(level)
        self._require_fit()
        return self._masks(level)

    def prune(self, level: float) -> nn.Module:
        """The network with the fraction ``level`` of the prunable units removed."""
        return self.apply(self.masks(level))

    def candidates(self, levels: Sequence[float]) -> list[nn.Module]:
        """``prune(level)`` for each level; ``levels`` must increase (least to most pruned)."""
        levels = [_check_level(v) for v in levels]
        if not levels:
            raise ValueError("levels is empty: give increasing fractions such as [0.1, 0.2, 0.5]")
        if any(b <= a for a, b in itertools.pairwise(levels)):
            raise ValueError(
                "levels must be strictly increasing (candidates run from least to most pruned), "
                f"got {levels}"
            )
        return [self.prune(v) for v in levels]

    def result(self, level: float) -> PruningResult:
        """:meth:`prune` with its scores, masks, wall time and parameters kept."""
        start = time.perf_counter()
        masks = self.masks(level)
        module = self.apply(masks)
        return PruningResult(
            module=module,
            scores=self.scores,
            masks=masks,
            level=float(level),
            structured=self.structured,
            wall_time=self.fit_time + time.perf_counter() - start,
            params_kept=count_nonzero(module) / max(self._dense_params, 1),
        )

    def certify(
        self,
        cal_loader: Iterable,
        levels: Sequence[float],
        *,
        alpha: float = 0.02,
        delta: float = 0.1,
        risk: str = "accuracy_drop",
        pvalue: str = "auto",
        method: str = "fixed_sequence",
        train_loader: Iterable | None = None,
        progress: bool = True,
    ):
        """Learn then Test over :meth:`candidates` with :func:`bayesprune.conformal.certify_candidates`.

        Returns its :class:`~bayesprune.conformal.Certificate`: with probability at least
        ``1 - delta`` over the calibration set, the chosen network's ``risk`` is at most ``alpha``.
        The reference of ``accuracy_drop`` / ``disagreement`` is the network passed to :meth:`fit`
        (the dense net), also for methods that retrain it; when no level passes, the certificate's
        model is that dense net.
        """
        from ..conformal import certify_candidates

        self._require_fit()
        return certify_candidates(
            self.candidates(levels),
            self.dense,
            cal_loader,
            risk=risk,
            alpha=alpha,
            delta=delta,
            levels=list(levels),
            level_name="fraction pruned",
            method=method,
            pvalue=pvalue,
            train_loader=train_loader,
            progress=progress,
        )


def global_node_masks(
    scores: Mapping[str, torch.Tensor], level: float, min_nodes: int = 1
) -> dict[str, torch.Tensor]:
    """Remove the ``level`` fraction of all scored nodes with the lowest scores, ranked globally.

    Each layer keeps at least ``min_nodes`` nodes (its best ones), so no layer is emptied.
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().float().cpu() for n in names])
    n_drop = math.floor(level * flat.numel() + 1e-9)
    drop = torch.zeros(flat.numel(), dtype=torch.bool)
    drop[torch.argsort(flat, stable=True)[:n_drop]] = True
    out, start = {}, 0
    for n in names:
        w = scores[n].numel()
        keep = ~drop[start : start + w]
        if int(keep.sum()) < min_nodes:
            keep[
                torch.argsort(-scores[n].detach().flatten().float().cpu(), stable=True)[:min_nodes]
            ] = True
        out[n] = keep
        start += w
    return out


def layer_relative(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's scores divided by their mean, so one global ranking compares like with like.

    Raw node norms scale with a layer's fan-in and initialisation (a 300-input layer's nodes are
    smaller than a 64-input layer's), so a global ranking of raw norms empties whole layers.
    """
    return {n: s / s.float().mean().clamp_min(1e-12) for n, s in scores.items()}


def global_weight_masks(
    scores: Mapping[str, torch.Tensor], level: float
) -> dict[str, torch.Tensor]:
    """Remove the ``level`` fraction of all scored weights with the lowest scores (global ranking)."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().float().cpu() for n in names])
    n_drop = math.floor(level * flat.numel() + 1e-9)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:n_drop]] = False
    out, start = {}, 0
    for n in names:
        k = scores[n].numel()
        out[n] = keep[start : start + k].view(scores[n].shape)
        start += k
    return out
