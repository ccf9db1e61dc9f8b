r"""Is a fitted posterior any good for pruning? The checks :func:`bayesprune.fit` runs and records.

Inclusion probabilities are useful for pruning only when they *separate* nodes: most PIPs near 0
or 1, and the median-probability model (keep node :math:`j` iff :math:`\mathrm{PIP}_j \ge 1/2`,
Barbieri and Berger 2004) about as accurate as the posterior predictive. Four failures are common
and silent without a check:

* **collapse**: nearly every hidden node switched off (the weights' KL outweighs the likelihood,
  variational over-pruning);
* **uninformative PIPs**: most PIPs between 0.1 and 0.9 (the network then works as a
  random-dropout ensemble, and the median-probability model keeps an arbitrary subset);
* **a median model far below the predictive**, measured on validation data;
* **freeze**: no hidden node switched off, so that ``prune(threshold=0.5)`` gives back a network
  as large as the dense one (a fit too short for the gates to move, a prior that prices nodes too
  low for the data, or the group horseshoe, whose scales rarely shrink a node under the
  mean-field posterior: ``docs/notes/gate-decisions.md``, points 6 and 17).

:func:`bayesprune.fit` records :func:`nodes_off` per epoch in :class:`~bayesprune.FitResult`,
the median-probability model's validation accuracy when it is given a ``val_loader``
(:func:`median_model`), and warns with :func:`informativeness_warnings` at the end of the fit.

Example
-------
>>> import torch
>>> import bayesprune as bp
>>> from bayesprune.diagnostics import nodes_off, uncertain_fraction
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
>>> bnet = bp.bayesianize(net)
>>> hidden = ["0"]  # the output layer's units are never pruned
>>> nodes_off(bnet, hidden)
{'0': 0.0}
>>> uncertain_fraction(bnet, hidden)
0.0
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .priors import GroupHorseshoe
from .pruning import dependency_groups
from .pruning.layers import to_module_device

__all__ = [
    "COLLAPSED_SHARE",
    "MEDIAN_MODEL_TOLERANCE",
    "UNCERTAIN_SHARE",
    "hidden_layers",
    "informativeness_warnings",
    "median_model",
    "nodes_off",
    "uncertain_fraction",
]

#: the median-probability model may score this much below the posterior predictive on
#: validation data before :func:`bayesprune.fit` warns (the robustness target of
#: ``benchmarks/robustness.py`` is 1 point on test data)
MEDIAN_MODEL_TOLERANCE = 0.02
#: warn when more than this share of the hidden nodes' PIPs lie in [0.1, 0.9]
UNCERTAIN_SHARE = 0.5
#: warn that the network collapsed when at least this share of the hidden nodes has PIP < 1/2
COLLAPSED_SHARE = 0.99


def hidden_layers(bnet, example_input: torch.Tensor) -> list[str]:
    """Layers with node PIPs whose units are not the network's output (those are never pruned)."""
    pips = bnet.inclusion_probs()
    if not pips:
        return []
    mean = bnet.mean_module()
    outputs = {
        p
        for g in dependency_groups(mean, to_module_device(example_input, mean))
        if "the network output" in g.frozen
        for p in g.producers
    }
    return [k for k in pips if k not in outputs]


def nodes_off(bnet, layers: Iterable[str]) -> dict[str, float]:
    """Per layer, the share of nodes with PIP below 1/2 (what ``prune(threshold=0.5)`` drops)."""
    pips = bnet.inclusion_probs()
    return {k: round(float((pips[k] < 0.5).float().mean()), 4) for k in layers}


def uncertain_fraction(bnet, layers: Iterable[str]) -> float:
    """Share of the listed layers' nodes whose PIP lies in [0.1, 0.9]."""
    pips = bnet.inclusion_probs()
    values = [pips[k] for k in layers]
    if not values:
        return 0.0
    allp = torch.cat(values)
    return float(((allp >= 0.1) & (allp <= 0.9)).float().mean())


def median_model(bnet, layers: Iterable[str]) -> nn.Module:
    """The median-probability model as a plain network: posterior means, nodes of ``layers``
    with PIP below 1/2 zeroed (``bp.prune(bnet, threshold=0.5)`` computes the same function,
    physically smaller)."""
    pips = bnet.inclusion_probs()
    return bnet.mean_module({k: pips[k] >= 0.5 for k in layers})


def informativeness_warnings(
    bnet,
    layers: list[str],
    *,
    val_accuracy: float | None = None,
    median_accuracy: float | None = None,
) -> list[str]:
    """Messages, each with what to try, for PIPs that will not prune well (empty: none)."""
    messages = []
    if not layers:
        return messages
    pips = bnet.inclusion_probs()
    off = float((torch.cat([pips[k] for k in layers]) < 0.5).float().mean())
    layer_map = bnet.bayesian_layers
    priors = [layer_map[k].prior for k in layers if k in layer_map]  # the advice depends on them
    if off >= COLLAPSED_SHARE:
        if all(p.point_weights for p in priors):
            why = (
                "With point weights a node stays when it lowers the NLL by more than its prior "
                "log-odds charge: use a weaker prior (a prior_inclusion nearer 0.5, a smaller "
                "price_per_example, or prior_log_odds nearer 0)"
            )
        else:
            why = (
                "Usually the KL of the weights outweighs what the data can pay for; with a node "
                "SpikeAndSlab use weights='point' (the default for the Gaussian slab), otherwise "
                "more data or a tempered fit (kl_weight < 1, and report it)"
            )
        messages.append(
            f"the posterior switched off {off:.0%} of the hidden nodes (PIP < 0.5): the "
            "median-probability model, what prune(threshold=0.5) keeps, has collapsed to an "
            f"empty network. {why}"
        )
    if off == 0.0:
        messages.append(_kept_every_node(priors))
    share = uncertain_fraction(bnet, layers)
    if share > UNCERTAIN_SHARE:
        messages.append(
            f"{share:.0%} of the hidden nodes have inclusion probabilities between 0.1 and 0.9: "
            "the posterior does not tell needed nodes from unneeded ones, and "
            "prune(threshold=0.5) keeps an arbitrary subset. Fit for more steps (epochs=), or "
            "check the prior: node SpikeAndSlab with weights='point' (the default) separates "
            "nodes on the nets of benchmarks/robustness.py"
        )
    if (
        val_accuracy is not None
        and median_accuracy is not None
        and median_accuracy < val_accuracy - MEDIAN_MODEL_TOLERANCE
    ):
        messages.append(
            f"the median-probability model (nodes with PIP >= 0.5) scores {median_accuracy:.3f} "
            f"on val_loader against {val_accuracy:.3f} for the posterior predictive: pruning at "
            "threshold=0.5 will lose accuracy. Fit for more steps, or prune less "
            "(prune(keep=...) or conformal.certify, which tests each level)"
        )
    return messages


def _kept_every_node(priors: list) -> str:
    """The freeze message, with what to try for the hidden layers' ``priors``."""
    if any(isinstance(p, GroupHorseshoe) for p in priors):
        why = (
            "The group horseshoe's node scales rarely shrink a node under the mean-field "
            "posterior: on the nets of benchmarks/README.md#robustness it keeps every node, or "
            "nearly every node, at its default global_scale; a smaller global_scale pruned some "
            "nodes but left most PIPs undecided in most cells tried, and point weights pruned "
            "nothing (docs/notes/gate-decisions.md, points 6 and 17). To prune, fit with the "
            "default prior: bp.bayesianize(net), or prior=bp.priors.default_prior()"
        )
    elif priors and all(p.point_weights for p in priors):
        why = (
            "Either every node lowers the training loss by more than its prior price, or the fit "
            "was too short for the gates to decide (they are frozen for the first part of the "
            "fit, structure_delay, and a switch needs the evidence of many steps). Fit for more "
            "epochs, or price nodes higher (SpikeAndSlab(price_per_example=...) above "
            "bp.priors.DEFAULT_PRICE_PER_EXAMPLE, or a prior_inclusion nearer 0)"
        )
    else:
        why = (
            "With Bayesian weights (in some or all hidden layers) the gates or scales are moved "
            "by Adam (structure_lr) against the weights' KL, and often do not move in a fit of "
            "this length. To prune, fit with the default prior: bp.bayesianize(net), or "
            "prior=bp.priors.default_prior()"
        )
    return (
        "the posterior keeps every hidden node (no PIP below 0.5): prune(threshold=0.5) gives "
        f"back a network as large as the dense one. {why}. Whatever the PIPs, prune(keep=...) "
        "and conformal.certify(..., by='keep') prune to a size, ranking the nodes by PIP"
    )
