"""The four seed pruning methods, and SNACS's predecessor MINT, as baselines.

All behind one interface (:class:`PruningMethod`).

=========================  ===================================================  ===============
class                      paper                                                removes
=========================  ===================================================  ===============
:class:`MagnitudePruning`  Alvarez, confident magnitude pruning (2408.04759)    weights / nodes
:class:`SNACS`             Ganesh et al., SNACS (2006.12463)                    nodes
:class:`MINT`              Ganesh, Corso and Sekeh, MINT (SNACS's predecessor)  nodes
:class:`GumbelPruning`     Zhang, Tao and Zhang (2311.12526)                    weights / nodes
:class:`SelfCompression`   Carannante et al. (2111.05950)                       nodes
=========================  ===================================================  ===============

Each is fitted on a trained plain network, exposes ``scores``, ``masks(level)``, ``prune(level)``,
``candidates(levels)`` and ``certify(cal_loader, levels)`` (Learn then Test through
:func:`bayesprune.conformal.certify_candidates`).

Example
-------
>>> import torch
>>> from torch import nn
>>> import bayesprune as bp
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> method = bp.baselines.MagnitudePruning().fit(net, example_input=torch.zeros(1, 4))
>>> [round(bp.count_nonzero(m) / bp.count_params(net), 2) for m in method.candidates([0.0, 0.5, 0.9])]
[1.0, 0.51, 0.1]
"""

from __future__ import annotations

from .base import PruningMethod, PruningResult, hidden_layers, prunable_parameters
from .gumbel import GumbelPruning
from .magnitude import PAPER_LEVELS, PAPER_PROTOCOL, MagnitudePruning
from .mint import MINT, geometric_conditional_dependence
from .self_compression import SelfCompression
from .snacs import SNACS, edge_conditional_mutual_information, edge_mutual_information

__all__ = [
    "MINT",
    "PAPER_LEVELS",
    "PAPER_PROTOCOL",
    "SNACS",
    "GumbelPruning",
    "MagnitudePruning",
    "PruningMethod",
    "PruningResult",
    "SelfCompression",
    "edge_conditional_mutual_information",
    "edge_mutual_information",
    "geometric_conditional_dependence",
    "hidden_layers",
    "prunable_parameters",
]
