r"""Which nodes to drop for a network smaller than the median-probability model.

The median-probability model (PIP >= 1/2) is the posterior's answer to "which nodes": its size is
the data's, not the user's. For a smaller network the PIPs do not say which nodes to drop next:
after :mod:`bayesprune.gate_tests` most gates sit at their bounds, so their log-odds tie.

:func:`elimination_scores` asks the posterior-mean network instead. With every node weight at its
posterior mean and the nodes off in the median model removed, it removes nodes in rounds by
greedy backward elimination: in each round it evaluates, exactly, the change of the training
negative log-likelihood when each remaining unit alone is removed,

.. math:: \Delta_u = \mathrm{NLL}(M \setminus u) - \mathrm{NLL}(M),

divides it by the parameters the unit holds (its rows, the consumers' columns, its BatchNorm
entries), and removes the ``fraction`` of units with the smallest quotient. A unit is one node of a
layer, or one channel of a group of layers tied by residual additions (removed together, as
:func:`bayesprune.prune` removes them). The order in which units go is a path of masks :math:`M_k`,
each approximately minimising :math:`\mathrm{NLL}(M) + \lambda\, \mathrm{params}(M)` for some
:math:`\lambda`: the mode of the masks under a prior that prices parameters, with the weights at
their posterior means, traced from the median model (:math:`\lambda` small) down. It is a
search on the training likelihood, not a posterior probability: the candidates it gives are to be
checked on held-out data, by :func:`bayesprune.conformal.certify_candidates` for a guarantee.

The NLL is that of the plain posterior-mean network in eval mode (BatchNorm with its running
statistics), on the first ``examples`` examples of ``data``; a unit is removed by zeroing its
rows and the BatchNorm entries after it, which gives the pruned network's outputs exactly. A
removal is evaluated from the first layer it changes on (:class:`~bayesprune.replay.ForwardReplay`).

Example
-------
>>> import torch
>>> import bayesprune as bp
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> x = torch.randn(256, 4)
>>> data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
>>> loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
>>> bnet = bp.bayesianize(torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
...                                           torch.nn.Linear(16, 2)))
>>> _ = bp.fit(bnet, loader, epochs=5, progress=False, seed=0)
>>> scores = bp.elimination_scores(bnet, loader)
>>> small = bp.prune(bnet, keep=0.25, scores=scores)
>>> small[0].out_features
4
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .data import examples_of
from .pruning import dependency_groups
from .pruning.layers import to_module_device
from .replay import ForwardReplay

__all__ = ["elimination_scores"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def elimination_scores(
    bnet: Any,
    data: Iterable | tuple[torch.Tensor, torch.Tensor],
    *,
    examples: int = 1024,
    fraction: float = 0.05,
    example_input: Any = None,
) -> dict[str, torch.Tensor]:
    """Node scores for :func:`bayesprune.prune`'s ``keep=``: the order of greedy backward
    elimination on the posterior-mean network (:mod:`bayesprune.elimination`).

    Parameters
    ----------
    bnet
        A fitted :class:`~bayesprune.BayesianModule` with node PIPs.
    data
        Training data (a loader, a ``TensorDataset`` or ``(x, y)`` tensors): the first
        ``examples`` examples are used.
    examples
        Examples each evaluation reads.
    fraction
        Share of the remaining units removed in each round (smaller: more rounds, closer to one
        unit at a time).
    example_input
        One input batch for tracing; by default the first of ``data``.

    Returns
    -------
    dict
        Layer path -> one score per node (higher: removed later; the nodes off in the
        median-probability model lowest, by PIP). ``bp.prune(bnet, keep=f, scores=scores)``
        keeps the nodes removed last.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"fraction is the share of units removed per round, in (0, 1]; got {fraction}"
        )
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples must be a positive integer, got {examples!r}")
    pips = {k: torch.as_tensor(v).detach().cpu() for k, v in bnet.inclusion_probs().items()}
    if not pips:
        raise ValueError(
            "this BayesianModule has no node-level inclusion probabilities; bayesianize with a "
            "node-level prior such as the default, bp.priors.default_prior() (a node SpikeAndSlab)"
        )
    if getattr(bnet, "num_data", 0) is None:  # as bayesprune.prune
        warnings.warn(
            "this BayesianModule was never fitted: the elimination starts from the variational "
            "family's starting values, not a posterior. Run bp.fit(bnet, train_loader) first",
            stacklevel=2,
        )
    base = bnet.mean_module().eval()
    x, y = (to_module_device(t, base) for t in examples_of(data, examples))
    trace = x[:1] if example_input is None else to_module_device(example_input, base)
    modules = dict(base.named_modules())
    units = _units(dependency_groups(base, trace), pips, modules)
    if not units:
        raise ValueError("no prunable node-level layer: nothing to eliminate")
    with torch.no_grad(), ForwardReplay(base, device=x.device, keep=_LAYERS) as replay:
        return _eliminate(bnet, base, modules, units, pips, x, y, fraction, replay)


class _Unit:
    """One removable channel: node ``j`` of every producer of a group, with what it holds."""

    def __init__(self, group, j: int, modules: dict[str, nn.Module]) -> None:
        self.j, self.producers, self.norms = j, list(group.producers), list(group.norms)
        params = 0
        for p in self.producers:
            m = modules[p]
            params += m.weight[j].numel() + (0 if m.bias is None else 1)
        for path, repeat in group.consumers:
            w = modules[path].weight
            params += w.shape[0] * math.prod(w.shape[2:]) * repeat
        self.params = params + 2 * len(self.norms)

    def tensors(self, modules):
        for path in self.producers + self.norms:
            m = modules[path]
            for t in (m.weight, m.bias):
                if t is not None:
                    yield t

    def remove(self, modules) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zero the unit; returns what :meth:`restore` puts back."""
        saved = [(t, t[self.j].clone()) for t in self.tensors(modules)]
        for t, _ in saved:
            t[self.j] = 0
        return saved

    def restore(self, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for t, value in saved:
            t[self.j] = value


def _units(groups, pips: dict[str, torch.Tensor], modules) -> list[_Unit]:
    """Every unit of the prunable groups whose producers all have node PIPs."""
    out = []
    for g in groups:
        if g.frozen or not g.producers or any(p not in pips for p in g.producers):
            continue
        out += [_Unit(g, j, modules) for j in range(g.width)]
    return out


def _eliminate(bnet, base, modules, units, pips, x, y, fraction, replay):
    def nll(start=None) -> float:
        return -float(
            replay.run(lambda: bnet.log_likelihood(base(x), y).double().sum(), start=start)
        )

    def on_in_median(u: _Unit) -> bool:
        return any(bool(pips[p][u.j] >= 0.5) for p in u.producers)

    rank: dict[int, float] = {}
    # the median model first: its off units go first, the least probable first
    off = sorted(
        (u for u in units if not on_in_median(u)),
        key=lambda u: max(float(pips[p][u.j]) for p in u.producers),
    )
    for u in off:
        rank[id(u)] = len(rank)
        u.remove(modules)
    alive = [u for u in units if id(u) not in rank]
    while alive:
        current = nll()
        replay.commit()
        cost = []
        for u in alive:
            saved = u.remove(modules)
            # evaluated from the first producer in graph order, the first module it changes
            cost.append((nll(start=modules[u.producers[0]]) - current) / u.params)
            u.restore(saved)
        order = sorted(range(len(alive)), key=cost.__getitem__)
        drop = order[: max(1, math.ceil(fraction * len(alive)))]
        for i in drop:
            rank[id(alive[i])] = len(rank)
            alive[i].remove(modules)
        dropped = set(drop)
        alive = [u for i, u in enumerate(alive) if i not in dropped]
    # nodes outside the eliminated units (frozen groups, the output) are never ranked below them
    scores = {k: torch.full_like(v, float(len(rank)), dtype=torch.float64) for k, v in pips.items()}
    for u in units:
        for p in u.producers:
            scores[p][u.j] = float(rank[id(u)])
    return scores
