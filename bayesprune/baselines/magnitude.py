r"""Confident magnitude pruning (J. Alvarez, "Confident magnitude-based neural network pruning", arXiv 2408.04759).

A trained dense network is pruned by global magnitude at a fixed sequence of levels, with no
fine-tuning, and Learn then Test picks the most pruned level whose risk is at most :math:`\alpha`
with confidence :math:`1 - \delta`:

.. math::
    f_q = f \text{ with every } |\theta_i| < Q_q(|\theta|) \text{ set to } 0,\quad
    q \in \{0, 0.01, \dots, 0.99\},\qquad
    \hat q = \max\{q_j : p_1, \dots, p_j \le \delta\},

where :math:`Q_q` is the :math:`q`-quantile of the magnitudes of all weights and biases and
:math:`p_j` is the exact binomial p-value of :math:`H_j: R(f_{q_j}) > \alpha` from the 0/1 losses
of :math:`n` calibration points (fixed-sequence testing).

What we followed (the paper's public Keras code): global quantile levels 0, 0.01, ..., 0.99 over
all weights *and* biases, no fine-tuning, 0/1 loss (``risk="error"``), exact binomial p-value,
fixed sequence, :math:`\alpha = 0.03`, :math:`\delta = 0.05` (:data:`PAPER_PROTOCOL`); the
unlabeled disagreement loss (``risk="disagreement"``: the pruned net disagrees with the dense one)
is available too. The Learn-then-Test step is :func:`bayesprune.conformal.certify_candidates`
(``method.certify(...)``), shared by every method.

What we changed: our networks are PyTorch modules (the paper's MLP is 784-128-128-10; we run it
on any Linear / Conv network: magnitudes are pooled over the weights and biases of every Linear and
Conv layer, BatchNorm parameters are not pruned). Ties at the quantile are broken by index, so level
:math:`q` removes exactly :math:`\lfloor qN \rfloor` parameters. The structured variant (node
decisions, physically removed by :func:`bayesprune.prune_module`) scores each hidden node by the L2
norm of its incoming weights and bias (an attention head by its q, k, v rows and out_proj
columns, a transformer's feed-forward unit by its ``linear1`` row), divided by the mean node norm
of its layer, and ranks all hidden nodes globally by this relative norm (raw norms scale with
fan-in and would empty whole layers); the output layer is never pruned.

Example
-------
>>> import torch
>>> from torch import nn
>>> from bayesprune.baselines import MagnitudePruning
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> m = MagnitudePruning().fit(net, example_input=torch.zeros(1, 4))
>>> pruned = m.prune(0.5)
>>> from bayesprune.metrics import count_nonzero
>>> count_nonzero(pruned)  # 67 parameters, floor(0.5 * 67) = 33 removed
34
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..registry import layer_spec
from .base import (
    PruningMethod,
    global_node_masks,
    global_weight_masks,
    hidden_layers,
    layer_relative,
    prunable_parameters,
)

__all__ = ["PAPER_LEVELS", "PAPER_PROTOCOL", "MagnitudePruning", "node_norms"]

#: the paper's quantile levels 0, 0.01, ..., 0.99
PAPER_LEVELS: list[float] = [round(float(q), 2) for q in np.arange(100) / 100]
#: the paper's Learn-then-Test settings (pass as ``method.certify(cal, PAPER_LEVELS, **PAPER_PROTOCOL)``)
PAPER_PROTOCOL: dict[str, Any] = {
    "alpha": 0.03,
    "delta": 0.05,
    "risk": "error",
    "pvalue": "binomial",
    "method": "fixed_sequence",
}


def node_norms(layer: nn.Module) -> torch.Tensor:
    """RMS of each output node's incoming weights and bias: :math:`\\|w_j, b_j\\|_2 / \\sqrt{d_j}`;
    for a head of an ``nn.MultiheadAttention``, of its q, k, v rows (and biases) and its out_proj
    columns (its group, ``LayerSpec.nodes.rows``)."""
    spec = layer_spec(layer)
    if spec is not None and spec.nodes is not None:
        w = spec.nodes.rows(layer).detach()
        return w.norm(dim=1).cpu() / w.shape[1] ** 0.5
    w = layer.weight.detach().flatten(1)
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach()[:, None]], 1)
    return w.norm(dim=1).cpu() / w.shape[1] ** 0.5


class MagnitudePruning(PruningMethod):
    """Global magnitude pruning, unstructured (default) or structured; certify with :meth:`certify`.

    Parameters
    ----------
    structured
        ``False``: prune single weights and biases by :math:`|\\theta|` (the paper); ``True``: prune
        hidden nodes by the RMS norm of their incoming weights (:func:`node_norms`).
    """

    def __init__(self, structured: bool = False) -> None:
        super().__init__()
        self.structured = bool(structured)
        self.name = "magnitude (structured)" if structured else "magnitude"

    def _fit(self, net: nn.Module, train_loader: Iterable | None, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"MagnitudePruning.fit got unexpected arguments {sorted(kwargs)}")
        if self.structured:
            layers = hidden_layers(net, self._device_input(), heads=True)
            if not layers:
                raise ValueError(
                    "the network has no hidden Linear / Conv layer whose nodes can be removed"
                )
            self.scores = layer_relative({n: node_norms(net.get_submodule(n)) for n in layers})
        else:
            self.scores = {n: p.detach().abs().cpu() for n, p in prunable_parameters(net).items()}

    def _masks(self, level: float) -> dict[str, torch.Tensor]:
        if self.structured:
            return global_node_masks(self.scores, level)
        return global_weight_masks(self.scores, level)
