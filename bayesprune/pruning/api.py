"""The pruning entry points: :func:`prune` (a BayesianModule or a scored module) and
:func:`prune_module` (a plain module and masks), and :func:`finetune`."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._utils import is_bayesian
from ..registry import has_nodes
from ..train import TrainHistory, train
from .graph import DependencyGraph, dependency_groups, to_module_device
from .plan import PruningPlan, check_masks, plan_pruning, prunable_layers
from .surgery import apply_plan, check_exact, zero_in_place

__all__ = [
    "finetune",
    "infer_example_input",
    "prune",
    "prune_module",
]


def prune_module(
    module: nn.Module,
    masks: Mapping[str, Any],
    example_input: Any,
    *,
    scores: Mapping[str, Any] | None = None,
    min_fraction: float = 0.0,
    min_nodes: int = 1,
    round_to: int | None = None,
    verify: bool = True,
    graph: DependencyGraph | None = None,
) -> nn.Module:
    """Remove the masked nodes of a plain network for real: a deep copy with narrower layers.

    Parameters
    ----------
    module
        A plain, ``torch.fx``-traceable ``nn.Module`` (no Pyro). It is not modified.
    masks
        Layer path -> boolean keep vector per output node (layers absent are kept whole).
    example_input
        One batch the network accepts (or a tuple of inputs); only its shapes matter.
    scores
        Optional layer path -> score per node (e.g. posterior inclusion probabilities), used to
        choose which nodes the floors and ``round_to`` restore. Default: weight-row norms.
    min_fraction, min_nodes
        Per-layer floor: at least ``max(min_nodes, ceil(min_fraction * width))`` nodes are kept.
        ``min_nodes=0`` lets a layer lose every node when its whole branch can go: its zeros
        must reach only layers that read nothing else (through activations, pooling, dropout and
        a BatchNorm right after it). The layer becomes a :class:`RemovedLayer`, those readers
        become :class:`ConstantLayer` (bias, and a BatchNorm right after folded in, broadcast),
        so a residual block the posterior switched off becomes ``relu(shortcut(x) + c)``.
        Elsewhere (e.g. a layer whose channels an addition ties to others) the layer keeps its
        best node, with a warning. Still exact: ``g(x) = f_M(x)``.
    round_to
        Round each pruned group's width up to a multiple of this (e.g. 8). Convolutions left with
        a handful of filters run far below their kernels' efficiency on CPUs too, so rounded
        widths can run faster than the narrower unrounded ones: the ``round_to 8`` rows of
        ``benchmarks/README.md#compression``.
    verify
        Check on a random input of ``example_input``'s shape that the result computes exactly the
        zeroed network (one forward pass of each); raise if not.
    graph
        A :class:`~bayesprune.pruning.DependencyGraph` of ``module``'s architecture, reused
        instead of tracing the network again (several prunings of one architecture).

    Returns
    -------
    nn.Module
        Same classes and module paths as ``module``, with fewer rows / columns / channels, in
        eval mode (call ``.train()`` to fine-tune it). ``prune_module(m, masks, x)(x) == zero_masked(m, plan.masks)(x)`` in eval mode, where
        ``plan = plan_pruning(m, masks, x, ...)`` (``plan.masks == masks`` when no floor or
        rounding applied).

    Example
    -------
    >>> import torch
    >>> from bayesprune.pruning import prune_module
    >>> from bayesprune.models import lenet5_caffe
    >>> net = lenet5_caffe()
    >>> keep = torch.zeros(20, dtype=torch.bool)
    >>> keep[:5] = True
    >>> small = prune_module(net, {"0": keep}, torch.zeros(1, 1, 28, 28))
    >>> small[0].out_channels, small[3].in_channels
    (5, 5)
    """
    example_input = to_module_device(example_input, module)
    graph = DependencyGraph(module, example_input) if graph is None else graph
    plan = plan_pruning(
        module,
        masks,
        example_input,
        scores=scores,
        min_fraction=min_fraction,
        min_nodes=min_nodes,
        round_to=round_to,
        graph=graph,
    )
    return _slice(module, plan, graph, example_input, verify)


def _slice(
    module: nn.Module, plan: PruningPlan, graph: DependencyGraph, example_input: Any, verify: bool
) -> nn.Module:
    """The sliced copy of ``module`` under ``plan``, checked against the zeroed one (``verify``),
    in eval mode: a deployable network, BatchNorm on its running statistics."""
    small = apply_plan(module, plan, graph.bn_followers)
    if verify:
        reference = copy.deepcopy(module)
        zero_in_place(reference, plan.masks, graph.bn_followers)
        check_exact(reference, small, example_input)
    return small.eval()


def infer_example_input(model: Any, module: nn.Module) -> torch.Tensor:
    for attr in ("example_input", "input_shape"):
        value = getattr(model, attr, None)
        if torch.is_tensor(value):
            return torch.zeros_like(value[:1])
        if isinstance(value, tuple | list | torch.Size) and all(isinstance(v, int) for v in value):
            return torch.zeros(1, *value)
    first = next((m for m in module.modules() if has_nodes(m)), None)
    if isinstance(first, nn.Linear):
        return torch.zeros(1, first.in_features)
    raise ValueError(
        f"cannot infer an input shape for {type(module).__name__} (its first layer is "
        f"{type(first).__name__}); pass example_input=, e.g. torch.zeros(1, 1, 28, 28)"
    )


def _masks_from_scores(
    scores: Mapping[str, torch.Tensor], threshold: float | None, keep: float | None
) -> dict[str, torch.Tensor]:
    if threshold is not None:
        return {k: v >= threshold for k, v in scores.items()}
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep is the fraction of nodes to keep, in (0, 1]; got {keep}")
    names = list(scores)
    flat = torch.cat([scores[k] for k in names])
    k = max(1, round(float(keep) * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.argsort(-flat, stable=True)[:k]] = True
    out, start = {}, 0
    for name in names:
        n = scores[name].numel()
        out[name] = chosen[start : start + n].clone()
        start += n
    return out


def prune(
    model: nn.Module | Any,
    *,
    threshold: float | None = None,
    keep: float | None = None,
    masks: Mapping[str, Any] | None = None,
    scores: Mapping[str, Any] | None = None,
    example_input: Any = None,
    min_fraction: float = 0.0,
    min_nodes: int = 1,
    round_to: int | None = None,
    verify: bool = True,
    graph: DependencyGraph | None = None,
) -> nn.Module:
    """A physically smaller plain network from a posterior (or from node scores).

    Parameters
    ----------
    model
        A :class:`bayesprune.BayesianModule` (node scores = posterior inclusion probabilities from
        ``model.inclusion_probs()``, weights = posterior means from ``model.mean_module(masks)``) or
        a plain ``nn.Module`` together with ``masks=`` or ``scores=``.
    threshold
        Keep node :math:`j` of layer :math:`\\ell` iff
        :math:`\\mathrm{PIP}_{\\ell j} \\ge` threshold.
        Layers producing the network output are left out of ``threshold`` / ``keep`` decisions
        (their units are never pruned).
    keep
        Keep the fraction ``keep`` of all scored nodes with the highest scores, ranked globally
        across layers (``keep=0.2``: the top 20%).
    masks
        Explicit node decisions (layer path -> boolean keep vector).
    scores
        For a plain module: layer path -> score per node, for ``threshold`` / ``keep`` and floors.
    example_input
        One input batch; inferred (zeros) when the network starts with a Linear layer, or from
        ``model.input_shape`` (recorded by :func:`bayesprune.fit` from its first batch).
    min_fraction, min_nodes, round_to, verify, graph
        As in :func:`prune_module` (``graph`` of ``model.mean_module()``'s architecture).

    Exactly one of ``threshold``, ``keep`` and ``masks`` must be given.

    Example
    -------
    >>> import torch
    >>> from bayesprune.pruning import prune
    >>> from bayesprune.models import lenet_300_100
    >>> net = lenet_300_100(in_features=64)
    >>> scores = {"1": torch.rand(300), "3": torch.rand(100)}
    >>> small = prune(net, keep=0.1, scores=scores)
    >>> small[1].out_features + small[3].out_features
    40
    """
    given = [
        n for n, v in (("threshold", threshold), ("keep", keep), ("masks", masks)) if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of threshold=, keep= or masks= (got {given or 'none'}), e.g. "
            "prune(bnet, threshold=0.5)"
        )
    bayesian = is_bayesian(model)
    rank = None  # what orders nodes (keep=, per-layer floors), when it differs from scores
    if bayesian:
        base = model.mean_module()
        if scores is None:
            scores = {
                k: torch.as_tensor(v).detach().cpu() for k, v in model.inclusion_probs().items()
            }
            # PIPs saturate at exactly 1.0; their log-odds still order the nodes by evidence
            if callable(getattr(model, "inclusion_logits", None)):
                rank = model.inclusion_logits() or None
            if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(
                    f"threshold is compared with posterior inclusion probabilities, so it must be in "
                    f"[0, 1]; got {threshold} (0.5 keeps the nodes more likely on than off)"
                )
        if masks is None and not scores:
            raise ValueError(
                "this BayesianModule has no node-level inclusion probabilities (Gaussian or "
                "weight-level priors give none); bayesianize with a node-level prior such as "
                "GroupHorseshoe, or pass masks="
            )
        # bp.fit sets num_data; objects that only follow the contract (ARCHITECTURE.md) lack it
        never_fitted = getattr(model, "num_data", 0) is None
        if masks is None and never_fitted:
            warnings.warn(
                "this BayesianModule was never fitted: its inclusion probabilities are the "
                "starting values of the variational family, not a posterior. Run "
                "bp.fit(bnet, train_loader) before pruning",
                stacklevel=2,
            )
    elif isinstance(model, nn.Module):
        base = model
        if masks is None and scores is None:
            raise ValueError(
                "threshold= and keep= on a plain nn.Module need scores= (layer path -> score per "
                "node, e.g. a baseline's .scores); or pass masks="
            )
    else:
        raise TypeError(
            f"prune expects a BayesianModule or an nn.Module, got {type(model).__name__}"
        )
    layers = prunable_layers(base)
    if scores is not None:
        scores = check_masks(layers, scores, what="scores")
    if example_input is None:
        example_input = infer_example_input(model, base)
    example_input = to_module_device(example_input, base)
    graph = DependencyGraph(base, example_input) if graph is None else graph
    if masks is None:
        # the units of the network's output are never pruned, so they take no part in the
        # decisions (and, with keep=, in the global ranking); zeroing a logit would only hurt
        outputs = {
            p
            for g in dependency_groups(base, example_input, graph=graph)
            if "the network output" in g.frozen
            for p in g.producers
        }
        ranked = {k: v for k, v in scores.items() if k not in outputs}
        if not ranked:
            raise ValueError(
                "only the output layer has node scores, and output units are never pruned; "
                "use a node-level prior on the hidden layers, or pass masks="
            )
        if keep is not None and rank is not None:
            ranked = {k: rank[k] for k in ranked}
        masks = _masks_from_scores(ranked, threshold, keep)
    plan = plan_pruning(
        base,
        masks,
        example_input,
        scores=rank if rank is not None else scores,
        min_fraction=min_fraction,
        min_nodes=min_nodes,
        round_to=round_to,
        graph=graph,
    )
    # with keep= an empty layer only says where the global ranking fell, not that the posterior
    # switched the layer off
    if bayesian and min_nodes > 0 and not never_fitted and threshold is not None:
        _warn_switched_off(masks, plan)
    # the posterior mean of a Bayesian net depends on the mask (its gates), so build it for the
    # final decisions; a plain module is simply zeroed and sliced
    module = model.mean_module(plan.masks) if bayesian else base
    return _slice(module, plan, graph, example_input, verify)


def _warn_switched_off(masks: Mapping[str, torch.Tensor], plan: PruningPlan) -> None:
    """Warn when the posterior switched off whole channel groups (only the floor keeps them).

    A layer whose channels an addition ties to layers that keep them (a ResNet shortcut) is
    switched off harmlessly: the group stays, so it is not named.
    """
    tied = {p: g.producers for g in plan.groups for p in g.producers}
    empty = [
        k
        for k, m in masks.items()
        if not bool(m.any())
        and all(p in masks and not bool(masks[p].any()) for p in tied.get(k, [k]))
    ]
    if empty:
        warnings.warn(
            f"the posterior switched off every node of layer(s) {empty}: the KL term outweighs "
            "the likelihood (typical on small data sets). Fit with bp.fit(..., kl_weight=0.1) "
            "or less, or a larger prior inclusion, if you want a usable network",
            stacklevel=3,
        )


def finetune(
    small: nn.Module,
    loader: Iterable,
    *,
    epochs: int = 1,
    lr: float = 1e-4,
    device: str | torch.device | None = None,
    val_loader: Iterable | None = None,
    progress: bool = True,
    seed: int | None = None,
) -> TrainHistory:
    """Briefly retrain a pruned network in place (Adam, cosine schedule; see ``train``).

    A small learning rate keeps the net near the posterior mean it starts from.

    Example
    -------
    >>> from bayesprune.data import load_digits, loader
    >>> from bayesprune.pruning import finetune
    >>> from bayesprune.models import lenet_300_100
    >>> splits = load_digits(seed=0)
    >>> history = finetune(lenet_300_100(in_features=64), loader(splits.train, 64), progress=False)
    >>> len(history.epoch_loss)
    1
    """
    return train(
        small,
        loader,
        epochs=epochs,
        lr=lr,
        device=device,
        val_loader=val_loader,
        progress=progress,
        seed=seed,
    )
