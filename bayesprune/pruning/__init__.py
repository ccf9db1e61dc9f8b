"""Structured pruning: node decisions -> a physically smaller plain network.

The package is laid out as the pruning pipeline: :mod:`.layers` (what is known about each layer
type), :mod:`.graph` (the dependency graph, traced once), :mod:`.plan` (masks, floors and
plans), :mod:`.surgery` (zeroing, slicing and the exactness check), :mod:`.api` (:func:`prune`,
:func:`prune_module`), :mod:`.report` (:func:`compression_report`) and :mod:`.io`
(:func:`save_pruned`, :func:`load_pruned`); :mod:`.attention` (attention heads as nodes,
:class:`PrunedMultiheadAttention`) and :mod:`.transformer` (PyTorch's transformer encoder blocks).

A *node decision* is ``masks: dict[str, BoolTensor]``: the module path of a ``Linear`` / ``Conv``
layer -> one entry per output unit / filter, ``True`` = keep (see ``ARCHITECTURE.md``). The pruner
turns it into a network whose layers are narrower for real: pruned output rows / filters are removed
and so are the matching input columns / channels of every layer that consumes them.

Semantics
---------
Let :math:`f_M` be the network with the masked nodes *zeroed* (:func:`zero_masked`: their weight
rows and biases are 0 and, when a BatchNorm directly follows (the layer's output feeds only that
BatchNorm), that BatchNorm's weight and bias of those channels are 0 too). :func:`prune_module`
returns a smaller network :math:`g` with

.. math:: g(x) = f_M(x) \\quad \\text{for every input } x \\text{ (eval mode)},

so pruning changes nothing but size and speed. A channel can be removed only when it is identically
zero in :math:`f_M` wherever it flows. Channels tied by an addition (residual connections) form one
*channel space*; such a channel is zero only when **every** layer producing into that space masks
it:

.. math:: \\text{keep}_S[c] = \\bigvee_{\\ell \\in \\text{producers}(S)} m_\\ell[c].

The spaces are found by tracing the forward pass with :mod:`torch.fx` and joining, with a
union-find, the channel axes that operations tie together; a channel concatenation lays spaces side
by side, and a flatten turns each channel into a block of ``H * W`` columns of the next Linear. A
space is kept whole ("frozen") when it touches the network input or output, or passes through an
operation whose zero-preservation or channel layout is not known (a grouped convolution, a BatchNorm
that does not directly follow a layer, a reshape that mixes channels, a sigmoid, ...); masked nodes
in it are still zeroed, so the identity above holds, and a warning names the node when this stops a
requested removal. Checked exact on LeNets, VGG, ResNet-20, and torchvision's ResNet-18/50,
SqueezeNet, GoogLeNet, DenseNet-121 and MobileNet-V2 (the last two partly frozen).

The analysis is written here rather than taken from Torch-Pruning because the pruner must reproduce
one exact function, :math:`f_M`: it has to know which operations keep a zero channel zero (ReLU,
pooling, a BatchNorm fed directly by the masked layer) and which do not (a BatchNorm after a ReLU,
a sigmoid, adding a constant), and keep the latter's channels. That rule set is small (one walk of
the ``torch.fx`` graph and a union-find) and adds no dependency.

Example
-------
>>> import torch
>>> from torch import nn
>>> from bayesprune.pruning import prune_module, zero_masked
>>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
>>> masks = {"0": torch.tensor([True, False, True, False, False, True])}
>>> x = torch.randn(5, 4)
>>> small = prune_module(net, masks, x)
>>> small[0].out_features, small[2].in_features
(3, 3)
>>> torch.allclose(small(x), zero_masked(net, masks)(x), atol=1e-6)
True
"""

from __future__ import annotations

from . import transformer  # noqa: F401  (registers the transformer blocks)
from .api import finetune, prune, prune_module
from .attention import PrunedMultiheadAttention
from .graph import ChannelGroup, DependencyGraph, dependency_groups
from .io import load_pruned, save_pruned
from .layers import ConstantLayer, RemovedLayer
from .plan import PruningPlan, plan_pruning
from .report import CompressionReport, LayerStats, architecture_string, compression_report
from .surgery import zero_masked

__all__ = [
    "ChannelGroup",
    "CompressionReport",
    "ConstantLayer",
    "DependencyGraph",
    "LayerStats",
    "PrunedMultiheadAttention",
    "PruningPlan",
    "RemovedLayer",
    "architecture_string",
    "compression_report",
    "dependency_groups",
    "finetune",
    "load_pruned",
    "plan_pruning",
    "prune",
    "prune_module",
    "save_pruned",
    "zero_masked",
]
