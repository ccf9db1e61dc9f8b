"""From node decisions (masks) to a pruning plan: per-layer floors, rounding, and the branches
that a switched-off layer removes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..registry import has_nodes, layer_spec
from .graph import (
    Analysis,
    ChannelGroup,
    DependencyGraph,
    direct_layer,
    tensor_nodes,
)
from .layers import NORM_TYPES, check_layout, node_rows, replaceable
from .ops import ZERO_PRESERVING_FUNCTIONS, ZERO_PRESERVING_METHODS, ZERO_PRESERVING_MODULES

__all__ = [
    "PruningPlan",
    "check_masks",
    "plan_pruning",
    "prunable_layers",
]


def _layer_width(layer: nn.Module) -> int:
    return layer_spec(layer).widths(layer)[0]


def prunable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Path -> layer of every layer with nodes (:func:`bayesprune.registry.has_nodes`), each
    checked against its registered layout."""
    out = {name: m for name, m in module.named_modules() if has_nodes(m)}
    for name, m in out.items():
        check_layout(name, m)
    return out


def _as_vector(value: Any, name: str, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{what}[{name!r}] must be a 1-D tensor or array, got {type(value)}"
        ) from exc
    if t.dim() != 1:
        raise ValueError(f"{what}[{name!r}] must be 1-D (one entry per node), got shape {t.shape}")
    return t


def check_masks(
    layers: Mapping[str, nn.Module], masks: Mapping[str, Any], what: str = "masks"
) -> dict[str, torch.Tensor]:
    if not isinstance(masks, Mapping):
        raise TypeError(
            f"{what} must be a dict {{layer path: keep vector}}, got {type(masks).__name__}"
        )
    out = {}
    for name, value in masks.items():
        if name not in layers:
            raise KeyError(
                f"{what} names {name!r}, which is not a Linear/Conv layer of the network; "
                f"layers are {sorted(layers)}"
            )
        t = _as_vector(value, name, what)
        if what == "masks" and t.dtype != torch.bool:
            raise TypeError(
                f"masks[{name!r}] must be boolean (True = keep), got dtype {t.dtype}; "
                "threshold probabilities first, e.g. pip >= 0.5"
            )
        if what != "masks":
            t = t.to(torch.float64)
        width = _layer_width(layers[name])
        if t.numel() != width:
            raise ValueError(
                f"{what}[{name!r}] has {t.numel()} entries but layer {name!r} has {width} output nodes"
            )
        out[name] = t
    return out


def _default_scores(layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """L2 norm of each output node's incoming weights: the tie-breaker when no scores are given."""
    return {name: node_rows(m).norm(dim=1).to(torch.float64).cpu() for name, m in layers.items()}


def _top(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest-scoring candidate nodes (ties: lowest index first)."""
    idx = candidates.nonzero().flatten()
    order = torch.argsort(-scores[idx], stable=True)
    return idx[order[:k]]


@dataclass
class PruningPlan:
    """What :func:`prune_module` will do: the effective masks and the channel groups.

    Attributes
    ----------
    masks
        The node decisions after floors and rounding (the masks the pruned net is exact for:
        ``prune_module(m, masks, x)(x) == zero_masked(m, plan.masks)(x)``).
    groups
        The channel groups, each with its ``keep`` vector filled in.
    inputs, norm_inputs
        Input channel layout of each consuming Linear / Conv and of each BatchNorm: a list of
        ``(index into groups, repeat)`` segments in channel order (several after a concatenation).
    removed
        Layers that lose every node (only with ``min_nodes=0``) -> the BatchNorms right after
        them; each becomes a :class:`RemovedLayer`, its BatchNorms ``nn.Identity``.
    constant
        Layers whose whole input is removed -> the BatchNorms right after them; each becomes a
        :class:`ConstantLayer` with those BatchNorms folded in.
    """

    masks: dict[str, torch.Tensor]
    groups: list[ChannelGroup]
    inputs: dict[str, list[tuple[int, int]]] = field(default_factory=dict, repr=False)
    norm_inputs: dict[str, list[tuple[int, int]]] = field(default_factory=dict, repr=False)
    removed: dict[str, list[str]] = field(default_factory=dict)
    constant: dict[str, list[str]] = field(default_factory=dict)

    def widths(self) -> dict[str, tuple[int, int]]:
        """Layer path -> (width before, width after)."""
        out = {}
        for g in self.groups:
            for p in g.producers:
                out[p] = (g.width, int(g.keep.sum()))
        return out


def plan_pruning(
    module: nn.Module,
    masks: Mapping[str, Any],
    example_input: Any,
    *,
    scores: Mapping[str, Any] | None = None,
    min_fraction: float = 0.0,
    min_nodes: int = 1,
    round_to: int | None = None,
    graph: DependencyGraph | None = None,
) -> PruningPlan:
    """Apply the floors and rounding to ``masks`` and decide which channels of each group stay.

    Floors: layer :math:`\\ell` of width :math:`w_\\ell` keeps at least
    :math:`\\min(w_\\ell, \\max(m, \\lceil f \\cdot w_\\ell\\rceil))` (:math:`m` = ``min_nodes``,
    :math:`f` = ``min_fraction``)
    nodes, the highest-scoring ones (``scores``: e.g. PIPs; default: the L2 norm of each node's
    weights), with a warning naming the layer. With ``min_nodes=0`` a layer may lose every node
    when it can go with its whole branch (see :func:`prune_module`); where it cannot, it keeps its
    best node, with a warning that says why. ``round_to=k`` then rounds each prunable group's kept
    width up to a multiple of ``k`` (capped at the full width) by restoring its next-best nodes
    (score of a channel = its best score over the group's layers).

    See :func:`prune_module` for the parameters; ``graph`` (a :class:`DependencyGraph` of the
    same architecture) skips the tracing.
    """
    if not 0.0 <= float(min_fraction) <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    if not isinstance(min_nodes, int) or isinstance(min_nodes, bool) or min_nodes < 0:
        raise ValueError(
            f"min_nodes must be an integer >= 0 (1, the default, never empties a layer; 0 lets a "
            f"layer go with the branch it feeds), got {min_nodes!r}"
        )
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer (e.g. 8) or None, got {round_to}")
    layers = prunable_layers(module)
    masks = check_masks(layers, masks)
    score = _default_scores(layers)
    if scores is not None:
        score.update(check_masks(layers, scores, what="scores"))
    if graph is not None:
        graph.check(module)
        analysis = graph.analysis
    else:
        analysis = Analysis(module, example_input)
    groups, inputs, norm_inputs = analysis.groups()

    eff: dict[str, torch.Tensor] = {}
    floored = []  # one warning for all layers: a big net can hit its floors in dozens
    for name, m in masks.items():
        width = m.numel()
        floor = min(width, max(min_nodes, math.ceil(float(min_fraction) * width - 1e-9)))
        kept = int(m.sum())
        if kept < floor:
            floored.append(f"keep {kept} of {width} nodes of layer {name!r} (now {floor})")
            m = m.clone()
            m[_top(score[name], ~m, floor - kept)] = True
        eff[name] = m
    if floored:
        warnings.warn(
            f"the node decisions {_listing(floored)}; each such layer keeps its highest-scoring "
            f"nodes up to its floor (min_nodes={min_nodes}, min_fraction={min_fraction})",
            stacklevel=3,
        )
    removed, constant = _branches(analysis, groups, eff, score)

    zeroed = []
    for g in groups:
        full = torch.ones(g.width, dtype=torch.bool)
        if not g.producers:
            g.keep = full
            continue
        keep = torch.zeros(g.width, dtype=torch.bool)
        for p in g.producers:
            keep |= eff.get(p, full)
        if g.frozen:
            if not keep.all():
                zeroed.append(
                    f"{int((~keep).sum())} of layer(s) {g.producers}, because of "
                    f"{'; '.join(g.frozen)}"
                )
            g.keep = full
            continue
        if round_to is not None and round_to > 1:
            target = min(g.width, math.ceil(int(keep.sum()) / round_to) * round_to)
            extra = target - int(keep.sum())
            if extra > 0:
                best = torch.stack([score[p] for p in g.producers]).amax(0)
                add = _top(best, ~keep, extra)
                keep[add] = True
                for p in g.producers:
                    if p in eff:
                        eff[p] = eff[p].clone()
                        eff[p][add] = True
        g.keep = keep
    grouped = {p for g in groups for p in g.producers}
    zeroed += [
        f"{int((~m).sum())} of layer {n!r}, which the traced forward never calls as a module (e.g. "
        "a Linear whose weight attention reads directly)"
        for n, m in eff.items()
        if n not in grouped and not m.all()
    ]
    if zeroed:
        warnings.warn(
            f"masked output nodes are only zeroed, not removed, where their channel group is kept "
            f"whole: {_listing(zeroed)}",
            stacklevel=3,
        )
    return PruningPlan(
        masks=eff,
        groups=groups,
        inputs=inputs,
        norm_inputs=norm_inputs,
        removed=removed,
        constant=constant,
    )


def _listing(items: list[str], limit: int = 8) -> str:
    """``items`` joined for a warning, the first ``limit`` of them and a count of the rest."""
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _dead_region(
    gm: fx.GraphModule, calls: Mapping[str, int], group: ChannelGroup
) -> tuple[str | None, list[str]]:
    """Follow a group's all-zero output to the layers that read it.

    Returns ``(None, consumers)`` when the zeros reach nothing but BatchNorms right after the
    group's layers, operations that keep zeros zero (activations, pooling, dropout), and Linear /
    Conv layers that read only them (each becomes a constant); else ``(why not, [])``.
    """
    for p in group.producers:
        if calls.get(p, 0) != 1:
            return f"layer {p!r} is called {calls.get(p, 0)} times", []
        if not replaceable(gm.get_submodule(p)):
            kind = type(gm.get_submodule(p)).__name__
            return f"a removed {kind} (a registered layer type) has no placeholder", []
    stack = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in group.producers]
    seen: set[fx.Node] = set()
    consumers: list[str] = []
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            sole_input = tensor_nodes((user.args, user.kwargs)) == [node]
            mod = gm.get_submodule(user.target) if user.op == "call_module" else None
            if isinstance(mod, NORM_TYPES) and direct_layer(gm, user) in group.producers:
                stack.append(user)
            elif (
                has_nodes(mod) and replaceable(mod) and sole_input and calls[str(user.target)] == 1
            ):
                consumers.append(str(user.target))
            elif sole_input and (
                isinstance(mod, ZERO_PRESERVING_MODULES)
                or (user.op == "call_function" and user.target in ZERO_PRESERVING_FUNCTIONS)
                or (user.op == "call_method" and user.target in ZERO_PRESERVING_METHODS)
            ):
                stack.append(user)
            else:
                return f"its zero output reaches node {user.name!r}, which cannot be bypassed", []
    return None, consumers


def _branches(
    analysis: Analysis,
    groups: list[ChannelGroup],
    eff: dict[str, torch.Tensor],
    score: Mapping[str, torch.Tensor],
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Decide which emptied layers go with their branch; give the others their best node back.

    A group whose every producer lost all its nodes computes zeros; where those zeros only flow
    into layers (through zero-preserving operations), those layers output constants and the
    producers can go. Mutates ``eff`` for the layers that must keep a node.
    """
    empty = {n for n, m in eff.items() if m.numel() and not bool(m.any())}
    if not empty:
        return {}, {}
    calls_per_graph = []
    for gm in analysis.graphs:
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        calls_per_graph.append(calls)
    removed: dict[str, list[str]] = {}
    constant: dict[str, list[str]] = {}
    blocked: dict[str, str] = {}
    for g in groups:
        dead = [p for p in g.producers if p in empty]
        if not dead or all(p in analysis.internal for p in g.producers):
            continue  # nodes inside a block or attention layer: an empty group is just sliced
        if g.frozen:
            reason = f"its channels are kept whole because of {'; '.join(g.frozen)}"
        elif len(dead) < len(g.producers):
            live = [p for p in g.producers if p not in empty]
            reason = f"an addition ties its channels to those of {live}, which keep some"
        else:
            # the zeros must be bypassable in every mode's graph that runs the group
            reason, consumers = None, []
            for gm, calls in zip(analysis.graphs, calls_per_graph, strict=True):
                if reason is None and any(p in calls for p in g.producers):
                    reason, found = _dead_region(gm, calls, g)
                    consumers += [c for c in found if c not in consumers]
        if reason is None:
            for p in g.producers:
                removed[p] = sorted(analysis.bn_after.get(p, ()))
            constant.update({c: [] for c in consumers})
            warnings.warn(
                f"every node of layer(s) {g.producers} is pruned: removed with the branch they "
                f"feed; layer(s) {consumers} now output one constant per node (min_nodes=0)",
                stacklevel=4,
            )
        else:
            blocked.update({p: reason for p in dead})
    for c in list(constant):
        if c in removed:  # a chain of emptied layers: the later one goes too
            del constant[c]
        else:
            constant[c] = sorted(analysis.bn_after.get(c, ()))
    for p, reason in blocked.items():
        if p in constant:  # it outputs a constant anyway (zeros where its nodes are masked)
            continue
        warnings.warn(
            f"every node of layer {p!r} is pruned, but the layer cannot go ({reason}); keeping "
            "its highest-scoring node",
            stacklevel=4,
        )
        eff[p] = eff[p].clone()
        eff[p][_top(score[p], ~eff[p], 1)] = True
    return removed, constant
