r"""The Bernoulli KL of the node gates of many layers in one set of operators.

With the default prior (point-weight node spike-and-slab) a layer's whole KL is
:math:`\sum_j \mathrm{KL}(\mathrm{Bern}(\sigma(\theta_j)) \,\|\, \mathrm{Bern}(\gamma))`, with
:math:`\gamma` the layer's prior inclusion (its price grows with the layer's group size, so
:math:`\gamma` differs between layers). :func:`gates_kl` computes it for the gates of every such
layer at once: the logits are concatenated, and :math:`\log\gamma` and :math:`\log(1-\gamma)`
are given per gate as constant tensors, built once per set of priors and kept. Each gate's term
is computed by the same elementwise operators, in the same order, as
:meth:`~bayesprune.priors.SpikeAndSlab.kl_gates` computes it with the layer's numbers, so the
terms and their gradients are the same bits; only the order of the final sum differs. A training
step dispatches about ten operators for the KL instead of about ten per layer (the ``--ops``
column of ``benchmarks/README.md#svi-speed``).

Example
-------
>>> import torch
>>> import bayesprune as bp
>>> from bayesprune.priors.gates_kl import gates_kl
>>> bnet = bp.bayesianize(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
...                                            torch.nn.Linear(8, 6), torch.nn.ReLU(),
...                                            torch.nn.Linear(6, 3)))
>>> bnet.num_data = 100  # the default prior's price needs N (bp.fit sets it)
>>> layers = list(bnet.bayesian_layers.values())
>>> per_layer = sum(layer.prior.kl_gates(layer, layer.gate_logit).sum() for layer in layers)
>>> torch.allclose(gates_kl(layers), per_layer)
True
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ._math import kl_bernoulli_logs
from .base import Prior
from .spike_slab import SpikeAndSlab

if TYPE_CHECKING:
    from ..layers import BayesianLayer

__all__ = ["gates_kl", "gates_only"]


def gates_only(prior: Prior) -> bool:
    """Whether a layer's KL under ``prior`` is the Bernoulli KL of its gate logits alone: a
    :class:`~bayesprune.priors.SpikeAndSlab` (whose ``kl`` no subclass replaces) at node level
    with point weights, the default prior."""
    return (
        isinstance(prior, SpikeAndSlab)
        and type(prior).kl is SpikeAndSlab.kl
        and prior.level == "node"
        and prior.point_weights
    )


def gates_kl(layers: Sequence[BayesianLayer]) -> torch.Tensor:
    """The summed Bernoulli KL of the gates of ``layers``, each against its own prior inclusion
    (``layer.prior.inclusion_logs(layer)``: a :class:`~bayesprune.priors.SpikeAndSlab` at node
    level with point weights, whose KL is that of its gates alone)."""
    if not layers:
        raise ValueError("gates_kl needs at least one layer")
    other = [type(layer.prior).__name__ for layer in layers if not gates_only(layer.prior)]
    if other:
        raise ValueError(
            f"gates_kl takes layers whose KL is that of their gates alone (node-level "
            f"SpikeAndSlab with point weights); got priors {other}: use layer.kl() for those"
        )
    logits = [layer.gate_logit.reshape(-1) for layer in layers]
    flat = logits[0] if len(logits) == 1 else torch.cat(logits)
    priors = tuple(
        (*layer.prior.inclusion_logs(layer), logit.numel())
        for layer, logit in zip(layers, logits, strict=True)
    )
    if len({p[:2] for p in priors}) == 1:  # one prior: its numbers
        return kl_bernoulli_logs(flat, priors[0][0], priors[0][1]).sum()
    if torch.compiler.is_compiling():  # a compiled graph keeps the constants itself
        log_g, log_1mg = _per_gate(priors, flat.device, flat.dtype)
    else:
        log_g, log_1mg = _per_gate_kept(priors, flat.device, flat.dtype)
    return kl_bernoulli_logs(flat, log_g, log_1mg).sum()


def _per_gate(
    priors: tuple[tuple[float, float, int], ...], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_g`` and ``log_1mg`` of every gate, from ``(log_g, log_1mg, gates)`` per layer."""
    return tuple(
        torch.cat([torch.full((n,), p[k], device=device, dtype=dtype) for *p, n in priors])
        for k in (0, 1)
    )


# a fit asks for the same priors at every step; a few sets (several nets, devices) are kept
_per_gate_kept = functools.lru_cache(maxsize=8)(_per_gate)
