"""Structured pruning: node decisions -> a physically smaller plain network.

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
>>> from bayesprune.prune import prune_module, zero_masked
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

import copy
import io
import json
import math
import operator
import statistics
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from .bayesianize import _is_bayesian, _modes_kept, _with_versions
from .data import input_tensor
from .files import atomic_write, check_target
from .metrics import _macs_by_layer, count_params, measure_latency
from .train import TrainHistory, resolve_device, train

__all__ = [
    "ChannelGroup",
    "CompressionReport",
    "ConstantLayer",
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

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Parameter-free modules that act per channel and map 0 to 0 (eval mode), so a zero channel stays
# zero through them and can be removed on both sides.
_ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)  # fmt: skip
# Per-channel modules that map 0 to a non-zero value: the channel axis passes through, but its
# channels cannot be removed.
_OFFSET_MODULES = (nn.Sigmoid, nn.Softplus, nn.Hardsigmoid, nn.LogSigmoid)
_ZERO_PRESERVING_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.hardtanh, F.hardswish, torch.tanh, F.tanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
}  # fmt: skip
_ZERO_PRESERVING_METHODS = {
    "relu", "relu_", "tanh", "tanh_", "contiguous", "clone", "detach", "float", "to",
}  # fmt: skip
# Operations that only regroup the axes after the channel axis (checked on the traced shapes).
_RESHAPES_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPES_METHODS = {"flatten", "view", "reshape"}
# Reductions map an all-zero slice to 0; they are followed only when they spare axes 0 and 1.
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_ADDITIVE = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_MULTIPLICATIVE = {operator.mul, operator.imul, torch.mul}
_ADDITIVE_METHODS = {"add", "add_", "sub", "sub_"}
_MULTIPLICATIVE_METHODS = {"mul", "mul_"}


# --------------------------------------------------------------------------------------------------
# dependency analysis
# --------------------------------------------------------------------------------------------------


class _Spaces:
    """Union-find over channel spaces; a root carries the width and why it is frozen (if it is)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.width: list[int] = []
        self.frozen: list[list[str]] = []  # reasons; empty = prunable

    def new(self, width: int, frozen: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.width.append(width)
        self.frozen.append([frozen] if frozen else [])
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.width[ra] != self.width[rb]:
            raise ValueError(
                f"node {where!r} ties channel axes of different widths ({self.width[ra]} and "
                f"{self.width[rb]}); prune_module cannot follow this pattern"
            )
        self.parent[rb] = ra
        # the second graph walk (training mode) meets the same reasons again
        self.frozen[ra] += [r for r in self.frozen[rb] if r not in self.frozen[ra]]
        return ra

    def freeze(self, s: int, reason: str) -> None:
        r = self.find(s)
        if reason not in self.frozen[r]:
            self.frozen[r].append(reason)

    def freeze_layout(self, lay: _Layout, reason: str) -> None:
        for s, _ in lay.segments:
            self.freeze(s, reason)

    def union_layouts(self, a: _Layout, b: _Layout, where: str) -> _Layout | None:
        """Tie two layouts channel by channel; ``None`` when their segments do not line up."""
        if len(a.segments) != len(b.segments) or any(
            ra != rb or self.width[self.find(sa)] != self.width[self.find(sb)]
            for (sa, ra), (sb, rb) in zip(a.segments, b.segments, strict=True)
        ):
            return None
        return _Layout(
            tuple(
                (self.union(sa, sb, where), ra)
                for (sa, ra), (sb, _) in zip(a.segments, b.segments, strict=True)
            )
        )


@dataclass(frozen=True)
class _Layout:
    """The channel axis (dim 1) of a traced tensor, as consecutive segments ``(space, repeat)``.

    A segment holds the channels of one space, each as ``repeat`` consecutive features (1 for an
    ``(N, C, ...)`` tensor, ``H * W`` after flattening ``(N, C, H, W)``). A concatenation along
    the channel axis gives several segments.
    """

    segments: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, space: int, repeat: int = 1) -> _Layout:
        return cls(((space, repeat),))

    def scaled(self, factor: int) -> _Layout:
        return _Layout(tuple((s, r * factor) for s, r in self.segments))

    @property
    def channelwise(self) -> bool:
        """Every feature is a whole channel (no flattened spatial positions)."""
        return all(r == 1 for _, r in self.segments)


@dataclass
class ChannelGroup:
    """One channel space: the layers whose outputs share these channels (tied by additions).

    Attributes
    ----------
    producers
        Paths of the Linear / Conv layers whose output units are these channels.
    consumers
        ``(path, repeat)`` of the Linear / Conv layers reading them (``repeat`` input columns per
        channel: ``H * W`` for a Linear after a flattened ``C x H x W`` map).
    norms
        Paths of the BatchNorm layers acting on these channels.
    width
        Number of channels.
    frozen
        Why the group must be kept whole (empty when it may be pruned).
    keep
        After planning: which channels stay (``None`` before).
    """

    producers: list[str]
    consumers: list[tuple[str, int]]
    norms: list[str]
    width: int
    frozen: list[str]
    keep: torch.Tensor | None = None

    @property
    def prunable(self) -> bool:
        return not self.frozen


def _tensor_meta(node: Any) -> Any:
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = _tensor_meta(node)
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


@contextmanager
def _rng_kept(example_input: Any) -> Iterator[None]:
    """Leave torch's global random state as it was (CPU, and the CUDA devices of the inputs):
    dropout in a traced training-mode graph or in a training-mode check draws from it."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    devices = sorted(
        {x.device.index or 0 for x in inputs if torch.is_tensor(x) and x.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        yield


def _trace(module: nn.Module, example_input: Any, training: bool = False) -> fx.GraphModule:
    """The module's graph in eval mode (or training mode), with shapes from ``example_input``.

    fx bakes ``if self.training`` (and ``F.dropout(x, training=self.training)``) into the graph,
    so each mode has its own graph: the eval one is the network that is deployed, the training
    one may run more branches (the auxiliary heads of GoogLeNet / Inception), or skip some at
    random (LayerDrop). :class:`_Analysis` walks both.
    """
    with _modes_kept(module):
        module.train(training)
        try:
            gm = fx.symbolic_trace(module)
        except Exception as exc:  # tracing errors come in many types from deep inside torch.fx
            raise TypeError(
                f"bayesprune.prune could not trace {type(module).__name__} with torch.fx "
                f"({type(exc).__name__}: {exc}). Its forward must be symbolically traceable (no "
                "control flow that depends on tensor values)."
            ) from exc
    if example_input is None:
        return gm
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    input_tensor(inputs[0], "example_input is")
    with _modes_kept(module), _rng_kept(example_input):
        module.eval()
        try:
            # ShapeProp prints the traceback of a failing node before raising; the error says it
            with torch.no_grad(), redirect_stderr(io.StringIO()):
                fx.passes.shape_prop.ShapeProp(gm).propagate(*inputs)
        except Exception as exc:
            root = _root_cause(exc)  # ShapeProp wraps the real error in a dump of the graph
            shape = tuple(inputs[0].shape)
            raise ValueError(
                f"running {type(module).__name__} on example_input of shape {shape} failed "
                f"({type(root).__name__}: {root}); pass an example_input of the shape the network "
                "expects, e.g. one batch of data"
            ) from exc
    return gm


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _direct_layer(gm: fx.GraphModule, bn_node: fx.Node) -> str | None:
    """Path of the Linear / Conv whose output goes only into this BatchNorm call, if any."""
    src = bn_node.args[0] if bn_node.args else None
    # the layer's output must feed nothing but this BatchNorm (the rule of BayesianModule's gates,
    # which act after such a BatchNorm): otherwise the zero channel also flows around the BatchNorm
    if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
        return None
    layer, bn = gm.get_submodule(src.target), gm.get_submodule(bn_node.target)
    if not isinstance(layer, _LAYERS):
        return None
    width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return str(src.target) if bn.num_features == width else None


def _first_tensor_arg(node: fx.Node) -> fx.Node | None:
    for a in node.args:
        if isinstance(a, fx.Node) and _tensor_meta(a) is not None:
            return a
    return None


def _tensor_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n) if _tensor_meta(n) is not None else None)
    return out


class _Analysis:
    """Walk the traced graphs and record channel spaces, producers, consumers and norms.

    Both the eval-mode and the training-mode graph are walked, into the same channel spaces: a
    layer met in both is treated like a layer called twice (its spaces are joined), so the plan
    holds for every branch either mode runs, auxiliary heads included.
    """

    def __init__(self, module: nn.Module, example_input: Any) -> None:
        self.module = module
        self.graphs = [_trace(module, example_input, training=False)]
        try:
            self.graphs.append(_trace(module, example_input, training=True))
        except ValueError as exc:  # e.g. Inception's auxiliary head needs larger images
            root = _root_cause(exc)
            warnings.warn(
                f"{type(module).__name__} runs on example_input in eval mode but not in training "
                f"mode ({type(root).__name__}: {root}), so the branches only training mode runs (auxiliary "
                "heads) are left out of the pruning analysis: the pruned network may fail in "
                "training mode. Pass an example_input of a size training uses to include them",
                stacklevel=4,
            )
        self.spaces = _Spaces()
        self.layout: dict[fx.Node, _Layout] = {}
        self.out_space: dict[str, int] = {}  # layer path -> space of its output units
        self.in_space: dict[str, _Layout] = {}  # layer path -> layout of its input
        self.norm_space: dict[str, _Layout] = {}
        self.bn_after: dict[str, set[str]] = {}  # layer path -> BatchNorms fed directly by it
        self.bad_layers: set[str] = set()
        for gm in self.graphs:
            self.gm = gm  # the graph being walked
            for node in gm.graph.nodes:
                self._visit(node)

    # helpers -------------------------------------------------------------------------------------
    def _fresh_frozen(self, node: fx.Node, reason: str) -> None:
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            self.layout[node] = _Layout.of(self.spaces.new(shape[1], reason))

    def _unsupported(self, node: fx.Node, problem: str) -> None:
        """Keep every channel space this node touches whole: always exact, possibly less pruned."""
        reason = f"{problem} at node {node.name!r}"
        for arg in _tensor_nodes((node.args, node.kwargs)):
            if arg in self.layout:
                self.spaces.freeze_layout(self.layout[arg], reason)
        self._fresh_frozen(node, reason)

    def _pass_through(self, node: fx.Node, src: fx.Node, zero_preserving: bool, what: str) -> None:
        if src not in self.layout:
            self._fresh_frozen(node, f"{what} of an untracked tensor at node {node.name!r}")
            return
        lay = self.layout[src]
        self.layout[node] = lay
        if not zero_preserving:
            self.spaces.freeze_layout(
                lay, f"{what} maps 0 to a non-zero value at node {node.name!r}"
            )

    def _regroup(self, node: fx.Node, src: fx.Node, what: str) -> None:
        """Flatten / view / reshape: follow the channel axis through the traced shapes."""
        a, b = _shape(src), _shape(node)
        if src not in self.layout or a is None or b is None:
            self._unsupported(node, f"{what} of an untracked tensor")
            return
        lay = self.layout[src]
        if len(a) >= 2 and len(b) >= 2 and a[:2] == b[:2]:
            # batch and channel axes untouched: only trailing axes are regrouped or reduced, which
            # keeps each (sample, channel) slice apart, and zeros stay zeros
            self.layout[node] = lay
        elif len(a) >= 2 and len(b) == 2 and b[0] == a[0] and b[1] == math.prod(a[1:]):
            # row-major flatten: channel c occupies one contiguous block of columns
            self.layout[node] = lay.scaled(math.prod(a[2:]))
        else:
            self._unsupported(node, f"{what} from shape {list(a)} to {list(b)} mixes channels")

    def _reduce(self, node: fx.Node, src: fx.Node, what: str) -> None:
        a = _shape(src)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, tuple | list) else []
        if (
            src not in self.layout
            or a is None
            or not dims
            or not all(isinstance(d, int) for d in dims)
        ):
            self._unsupported(node, f"reduction .{what}() over unknown axes")
        elif any(d % len(a) in (0, 1) for d in dims):
            self._unsupported(node, f"reduction .{what}() over the batch or channel axis")
        else:
            self.layout[node] = self.layout[src]

    def _binary(self, node: fx.Node, additive: bool) -> None:
        tensors = _tensor_nodes(node.args)
        others = [a for a in node.args if not isinstance(a, fx.Node)]
        if len(tensors) == 1:
            src = tensors[0]
            scalar_zero = all(isinstance(o, int | float) and o == 0 for o in others)
            keeps_zero = (not additive) or scalar_zero
            if others and all(isinstance(o, int | float) for o in others):
                self._pass_through(node, src, keeps_zero, "adding a constant")
            else:
                self._unsupported(node, "an arithmetic operation with a non-scalar operand")
            return
        shapes = [_shape(t) for t in tensors]
        lays = [self.layout.get(t) for t in tensors]
        tied = None
        if (
            len(tensors) == 2
            and all(lay is not None for lay in lays)
            and shapes[0] == shapes[1] == _shape(node)
        ):
            # an addition of two branches: a channel is zero only when it is zero in both, so the
            # two spaces become one and a channel goes only when every producer prunes it
            tied = self.spaces.union_layouts(lays[0], lays[1], node.name)
        if tied is None:
            self._unsupported(node, "an elementwise operation on tensors of different layouts")
        else:
            self.layout[node] = tied

    def _cat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _shape(node)
        ok = (
            isinstance(tensors, list | tuple)
            and all(isinstance(t, fx.Node) and t in self.layout for t in tensors)
            and isinstance(dim, int)
            and shape is not None
            and len(shape) >= 2
        )
        dim = dim % len(shape) if ok else dim
        if ok and dim == 1:
            # channel concatenation: the pieces keep their own spaces, one after the other
            segments = tuple(seg for t in tensors for seg in self.layout[t].segments)
            self.layout[node] = _Layout(segments)
            return
        if ok and dim >= 2:
            # joined along a spatial axis: the channel axis of all pieces is one and the same
            tied = self.layout[tensors[0]]
            for t in tensors[1:]:
                tied = self.spaces.union_layouts(tied, self.layout[t], node.name) if tied else None
            if tied is not None:
                self.layout[node] = tied
                return
        self._unsupported(node, f"concatenation along axis {dim}")

    # the walk ------------------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> None:
        meta = _tensor_meta(node)
        if node.op == "placeholder":
            if meta is not None:
                self._fresh_frozen(node, "the network input")
            return
        if node.op == "get_attr":
            self._fresh_frozen(node, f"a stored tensor {node.target!r}")
            return
        if node.op == "output":
            for t in _tensor_nodes(node.args):
                if t in self.layout:
                    self.spaces.freeze_layout(self.layout[t], "the network output")
            return
        if meta is None:
            return  # sizes, shapes and other non-tensor values carry no channels
        if node.op == "call_module":
            self._visit_module(node, self.gm.get_submodule(node.target))
        elif node.op == "call_function":
            self._visit_function(node)
        elif node.op == "call_method":
            self._visit_method(node)
        else:  # pragma: no cover - torch.fx has no other node kinds
            self._unsupported(node, f"graph node kind {node.op!r}")

    def _visit_module(self, node: fx.Node, mod: nn.Module) -> None:
        path = str(node.target)
        src = _first_tensor_arg(node)
        if isinstance(mod, _LAYERS):
            self._visit_layer(node, path, mod, src)
        elif isinstance(mod, _NORMS):
            lay = self.layout.get(src) if src is not None else None
            if path in self.norm_space and lay is not None:  # a BatchNorm called twice
                lay = self.spaces.union_layouts(self.norm_space[path], lay, node.name)
            if lay is None or not lay.channelwise:
                self._unsupported(node, f"BatchNorm {path!r} on an untracked layout")
                if path in self.norm_space:
                    self.spaces.freeze_layout(self.norm_space[path], "a BatchNorm called twice")
                return
            self.layout[node] = lay
            self.norm_space[path] = lay
            direct = _direct_layer(self.gm, node)
            if direct is not None:
                self.bn_after.setdefault(direct, set()).add(path)
            else:
                # BN(0) = bias - mean * weight / std is not 0, and zero_masked only clears the
                # BatchNorms fed directly by a masked layer, so these channels must stay
                self.spaces.freeze_layout(
                    lay, f"BatchNorm {path!r} that does not directly follow a Linear/Conv"
                )
        elif isinstance(mod, nn.Flatten):
            self._regroup(node, src, f"Flatten {path!r}")
        elif isinstance(mod, _ZERO_PRESERVING_MODULES) and src is not None:
            self._pass_through(node, src, True, type(mod).__name__)
        elif isinstance(mod, _OFFSET_MODULES) and src is not None:
            self._pass_through(node, src, False, type(mod).__name__)
        else:
            self._unsupported(node, f"module {path!r} of unsupported type {type(mod).__name__}")

    def _visit_layer(self, node: fx.Node, path: str, mod: nn.Module, src: fx.Node | None) -> None:
        in_shape = _shape(src) if src is not None else None
        lay = self.layout.get(src) if src is not None else None
        width = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        problem = None
        if isinstance(mod, _CONVS) and mod.groups != 1:
            problem = f"grouped convolution {path!r} (groups={mod.groups})"
        elif isinstance(mod, nn.Linear) and (in_shape is None or len(in_shape) != 2):
            problem = f"Linear {path!r} applied to a {len(in_shape or ())}-D input"
        elif isinstance(mod, _CONVS) and lay is not None and not lay.channelwise:
            problem = f"convolution {path!r} on flattened features"
        elif lay is None:
            problem = f"layer {path!r} reading an untracked tensor"
        if problem is None and path in self.in_space:  # a layer called twice reads one channel set
            lay = self.spaces.union_layouts(self.in_space[path], lay, node.name)
            if lay is None:
                problem = f"layer {path!r} called on two different layouts"
        if problem is not None:
            reason = f"{problem} at node {node.name!r}"
            self._unsupported(node, problem)  # the output tensor gets a frozen space of its own
            self.bad_layers.add(path)
            if path in self.in_space:  # an earlier call of this layer: its inputs stay whole too
                self.spaces.freeze_layout(self.in_space[path], reason)
            space = self.spaces.new(width, reason)
        else:
            if path in self.bad_layers:
                self.spaces.freeze_layout(lay, f"another call of layer {path!r} is unsupported")
            self.in_space[path] = lay
            space = self.spaces.new(width)
            self.layout[node] = _Layout.of(space)
        if path in self.out_space:
            space = self.spaces.union(self.out_space[path], space, node.name)
            if problem is None:
                self.layout[node] = _Layout.of(space)
        self.out_space[path] = space

    def _visit_function(self, node: fx.Node) -> None:
        target = node.target
        src = _first_tensor_arg(node)
        if target in _ZERO_PRESERVING_FUNCTIONS and src is not None:
            self._pass_through(node, src, True, getattr(target, "__name__", str(target)))
        elif getattr(target, "__name__", None) in _REDUCTIONS and target in _REDUCE_FUNCTIONS:
            self._reduce(node, src, target.__name__)
        elif target in _RESHAPES_FUNCTIONS and src is not None:
            self._regroup(node, src, getattr(target, "__name__", str(target)))
        elif target in (torch.cat, torch.concat, torch.concatenate):
            self._cat(node)
        elif target in _ADDITIVE:
            self._binary(node, additive=True)
        elif target in _MULTIPLICATIVE or target in (operator.truediv, torch.div):
            if target in (operator.truediv, torch.div) and (
                len(_tensor_nodes(node.args)) != 1 or _tensor_meta(node.args[0]) is None
            ):
                self._unsupported(node, "a division by a tensor")
            else:
                self._binary(node, additive=False)
        elif target in (torch.sigmoid, F.sigmoid) and src is not None:
            self._pass_through(node, src, False, "sigmoid")
        else:
            name = getattr(target, "__name__", str(target))
            self._unsupported(node, f"operation {name!r} is not supported")

    def _visit_method(self, node: fx.Node) -> None:
        name = str(node.target)
        src = _first_tensor_arg(node)
        if name in _ZERO_PRESERVING_METHODS and src is not None:
            self._pass_through(node, src, True, name)
        elif name in _REDUCTIONS and src is not None:
            self._reduce(node, src, name)
        elif name in _RESHAPES_METHODS and src is not None:
            self._regroup(node, src, f".{name}()")
        elif name in _ADDITIVE_METHODS:
            self._binary(node, additive=True)
        elif name in _MULTIPLICATIVE_METHODS:
            self._binary(node, additive=False)
        elif name in ("sigmoid", "sigmoid_") and src is not None:
            self._pass_through(node, src, False, name)
        else:
            self._unsupported(node, f"tensor method .{name}() is not supported")

    # results -------------------------------------------------------------------------------------
    def groups(self) -> tuple[list[ChannelGroup], dict[str, list], dict[str, list]]:
        """The groups, and the input layouts of consumers and BatchNorms as lists of
        ``(group index, repeat)`` segments in channel order."""
        by_root: dict[int, int] = {}
        groups: list[ChannelGroup] = []

        def group(space: int) -> int:
            r = self.spaces.find(space)
            if r not in by_root:
                by_root[r] = len(groups)
                groups.append(ChannelGroup([], [], [], self.spaces.width[r], self.spaces.frozen[r]))
            return by_root[r]

        for path, space in self.out_space.items():
            groups[group(space)].producers.append(path)
        inputs: dict[str, list] = {}
        for path, lay in self.in_space.items():
            inputs[path] = [(group(s), r) for s, r in lay.segments]
            for gi, r in inputs[path]:
                groups[gi].consumers.append((path, r))
        norms: dict[str, list] = {}
        for path, lay in self.norm_space.items():
            norms[path] = [(group(s), r) for s, r in lay.segments]
            for gi, _ in norms[path]:
                groups[gi].norms.append(path)
        return groups, inputs, norms


def dependency_groups(module: nn.Module, example_input: Any) -> list[ChannelGroup]:
    """The channel groups of ``module``: which layers' output units must be pruned together.

    Parameters
    ----------
    module
        A plain, ``torch.fx``-traceable network.
    example_input
        One batch (or a tuple of inputs) the network accepts; it fixes the traced shapes.

    Returns
    -------
    list of ChannelGroup
        One entry per channel space, in the order the producing layers appear in the graph.

    Example
    -------
    >>> from bayesprune.prune import dependency_groups
    >>> from models import resnet20
    >>> import torch
    >>> groups = dependency_groups(resnet20(), torch.zeros(1, 1, 28, 28))
    >>> sorted(len(g.producers) for g in groups if g.prunable)[-1]  # stem + 3 blocks of stage 1
    4
    """
    return _Analysis(module, example_input).groups()[0]


# --------------------------------------------------------------------------------------------------
# masks, floors and plans
# --------------------------------------------------------------------------------------------------


def _layer_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _prunable_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if isinstance(m, _LAYERS)}


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


def _check_masks(
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
    return {
        name: m.weight.detach().flatten(1).norm(dim=1).to(torch.float64).cpu()
        for name, m in layers.items()
    }


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

    See :func:`prune_module` for the parameters.
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
    layers = _prunable_layers(module)
    masks = _check_masks(layers, masks)
    score = _default_scores(layers)
    if scores is not None:
        score.update(_check_masks(layers, scores, what="scores"))
    analysis = _Analysis(module, example_input)
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
    stack = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in group.producers]
    seen: set[fx.Node] = set()
    consumers: list[str] = []
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            sole_input = _tensor_nodes((user.args, user.kwargs)) == [node]
            mod = gm.get_submodule(user.target) if user.op == "call_module" else None
            if isinstance(mod, _NORMS) and _direct_layer(gm, user) in group.producers:
                stack.append(user)
            elif isinstance(mod, _LAYERS) and sole_input and calls[str(user.target)] == 1:
                consumers.append(str(user.target))
            elif sole_input and (
                isinstance(mod, _ZERO_PRESERVING_MODULES)
                or (user.op == "call_function" and user.target in _ZERO_PRESERVING_FUNCTIONS)
                or (user.op == "call_method" and user.target in _ZERO_PRESERVING_METHODS)
            ):
                stack.append(user)
            else:
                return f"its zero output reaches node {user.name!r}, which cannot be bypassed", []
    return None, consumers


def _branches(
    analysis: _Analysis,
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
        if not dead:
            continue
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


# --------------------------------------------------------------------------------------------------
# zeroing and slicing
# --------------------------------------------------------------------------------------------------


def _bn_followers(module: nn.Module) -> dict[str, set[str]]:
    """Layer path -> the BatchNorms fed only by that layer's output, read off the traced graphs."""
    out: dict[str, set[str]] = {}
    for gm in (_trace(module, None, training=t) for t in (False, True)):
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _NORMS):
                layer = _direct_layer(gm, node)
                if layer is not None:
                    out.setdefault(layer, set()).add(str(node.target))
    return out


@torch.no_grad()
def _zero_in_place(
    module: nn.Module, masks: Mapping[str, torch.Tensor], followers: Mapping[str, set[str]]
) -> None:
    for name, m in masks.items():
        drop = ~m
        if not drop.any():
            continue
        layer = module.get_submodule(name)
        layer.weight[drop.to(layer.weight.device)] = 0
        if layer.bias is not None:
            layer.bias[drop.to(layer.bias.device)] = 0
        for bn_name in followers.get(name, ()):
            bn = module.get_submodule(bn_name)
            if bn.weight is not None:
                bn.weight[drop.to(bn.weight.device)] = 0
            if bn.bias is not None:
                bn.bias[drop.to(bn.bias.device)] = 0
            if bn.weight is None and bn.running_mean is not None:
                # BatchNorm(affine=False): a zero input channel leaves it as -mean / std; with a
                # zero running mean it is 0 in eval mode too (as with batch statistics)
                bn.running_mean[drop.to(bn.running_mean.device)] = 0


def zero_masked(module: nn.Module, masks: Mapping[str, Any]) -> nn.Module:
    """A copy of ``module`` with the masked nodes zeroed exactly (the reference of the pruner).

    The weight rows and bias entries of masked output nodes are set to 0 and, when the layer's
    output goes straight into a BatchNorm (and nowhere else), that BatchNorm's ``weight`` and
    ``bias`` of those channels too (its ``running_mean`` when it has no affine parameters), so the
    channel is identically 0 after normalisation (ARCHITECTURE.md, "Node decisions"). ``module``
    is not modified.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> from bayesprune.prune import zero_masked
    >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> zero_masked(net, {"0": torch.tensor([True, False])})[0].weight[1].abs().sum().item()
    0.0
    """
    out = copy.deepcopy(module)
    checked = _check_masks(_prunable_layers(out), masks)
    _zero_in_place(out, checked, _bn_followers(out))
    return out


def _geometry(layer: nn.Module) -> tuple[tuple[int, int, int, int], ...] | None:
    """Per spatial axis of a convolution: (padding before, padding after, reach, stride).

    ``reach = dilation * (kernel - 1)``; ``None`` for a Linear layer.
    """
    if isinstance(layer, nn.Linear):
        return None
    axes = []
    for i, k in enumerate(layer.kernel_size):
        reach = layer.dilation[i] * (k - 1)
        if layer.padding == "valid":
            before = after = 0
        elif layer.padding == "same":  # torch puts the odd extra pixel after
            before, after = reach // 2, reach - reach // 2
        else:
            before = after = layer.padding[i]
        axes.append((before, after, reach, layer.stride[i]))
    return tuple(axes)


def _positions(x: torch.Tensor, geometry: tuple | None) -> torch.Tensor:
    """A one-channel zero tensor shaped like a layer's output for input ``x`` (its positions).

    Written with tensor operations only (padding and strided slicing of one channel, no shape
    arithmetic), so that the pruned network stays ``torch.fx``-traceable.
    """
    if geometry is None:  # Linear: every leading axis stays
        return torch.zeros_like(x[..., :1])
    one = x[:, :1]
    pads = [p for before, after, _, _ in reversed(geometry) for p in (before, after)]
    if any(pads):
        one = F.pad(one, pads)
    # a kernel of reach r at stride s has outputs at 0, s, 2s, ... < L - r (L = padded length)
    window = tuple(slice(0, -reach if reach else None, stride) for _, _, reach, stride in geometry)
    return torch.zeros_like(one[(slice(None), slice(None), *window)])


class RemovedLayer(nn.Module):
    r"""Stands in for a layer all of whose output nodes were pruned (``prune(..., min_nodes=0)``).

    The layer computed zeros only (its masked nodes, and a BatchNorm right after it, are zeroed),
    and every layer reading those zeros became a :class:`ConstantLayer`, which needs only the
    positions of its input. So this module returns a one-channel zero tensor with the spatial size
    the layer's output had: no weights, no multiply-adds.

    Attributes
    ----------
    kind, in_width
        The replaced layer's class name and input width (for reports).
    norms
        Paths of the BatchNorms that followed it and are now ``nn.Identity``.
    """

    def __init__(self, layer: nn.Module, in_width: int, norms: Iterable[str] = ()) -> None:
        super().__init__()
        self.kind = type(layer).__name__
        self.in_width = int(in_width)
        self.norms = tuple(norms)
        self.geometry = _geometry(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _positions(x, self.geometry)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.in_width} -> 0"


class ConstantLayer(nn.Module):
    r"""A layer whose every input channel was removed: it outputs one value per node everywhere.

    With an all-zero input a Linear or Conv layer outputs its bias at every position (zero padding
    keeps a zero map zero), and a BatchNorm right after it maps that to
    :math:`\gamma (b - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`, one number per channel. That is
    ``value``, broadcast to the positions of the layer's output, so a residual branch switched off
    by the posterior costs one write instead of its convolutions.

    Attributes
    ----------
    value
        One trainable number per output node (the bias, with the BatchNorm folded in).
    kind
        The replaced layer's class name.
    norms
        Paths of the BatchNorms folded into ``value`` (now ``nn.Identity``).
    """

    def __init__(self, layer: nn.Module, value: torch.Tensor, norms: Iterable[str] = ()) -> None:
        super().__init__()
        self.kind = type(layer).__name__
        self.norms = tuple(norms)
        self.geometry = _geometry(layer)
        self.value = nn.Parameter(value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = _positions(x, self.geometry)
        if self.geometry is None:
            return pos + self.value
        return pos + self.value.view(-1, *([1] * len(self.geometry)))

    def extra_repr(self) -> str:
        return f"{self.kind}, 0 -> {self.value.numel()}"


_REPLACED = (RemovedLayer, ConstantLayer)


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    elif old is None and name in module._parameters:  # an empty slot, e.g. a bias=False conv
        setattr(module, name, nn.Parameter(value))
    else:
        setattr(module, name, value)


@torch.no_grad()
def _slice(module: nn.Module, names: Iterable[str], idx: torch.Tensor, dim: int) -> None:
    for n in names:
        t = getattr(module, n, None)
        if t is not None:
            _set(module, n, t.index_select(dim, idx.to(t.device)).clone())


def _kept_columns(plan: PruningPlan, segments: list[tuple[int, int]]) -> torch.Tensor | None:
    """Indices of the input features that stay, or ``None`` when all stay."""
    cols, offset, removed = [], 0, False
    for gi, repeat in segments:
        g = plan.groups[gi]
        idx = g.keep.nonzero().flatten()
        removed |= len(idx) < g.width
        cols.append(offset + (idx[:, None] * repeat + torch.arange(repeat)).flatten())
        offset += g.width * repeat
    return torch.cat(cols) if removed else None


def _apply_plan(module: nn.Module, plan: PruningPlan) -> nn.Module:
    small = copy.deepcopy(module)
    _zero_in_place(small, plan.masks, _bn_followers(small))
    for g in plan.groups:
        if bool(g.keep.all()):
            continue
        idx = g.keep.nonzero().flatten()
        for p in g.producers:
            layer = small.get_submodule(p)
            _slice(layer, ("weight", "bias"), idx, 0)
            if isinstance(layer, nn.Linear):
                layer.out_features = len(idx)
            else:
                layer.out_channels = len(idx)
    for p, segments in plan.inputs.items():
        cols = _kept_columns(plan, segments)
        if cols is None:
            continue
        layer = small.get_submodule(p)
        _slice(layer, ("weight",), cols, 1)
        if isinstance(layer, nn.Linear):
            layer.in_features = len(cols)
        else:
            layer.in_channels = len(cols)  # convolutions read whole channels (repeat 1)
    for p, segments in plan.norm_inputs.items():
        cols = _kept_columns(plan, segments)
        if cols is not None:
            bn = small.get_submodule(p)
            _slice(bn, ("weight", "bias", "running_mean", "running_var"), cols, 0)
            bn.num_features = len(cols)
    _replace_branches(small, plan)
    return small


@torch.no_grad()
def _replace_branches(small: nn.Module, plan: PruningPlan) -> None:
    """Swap emptied layers for :class:`RemovedLayer` and the layers they fed for constants."""
    for p, norms in plan.removed.items():
        layer = small.get_submodule(p)
        small.set_submodule(p, RemovedLayer(layer, _width(layer)[1], norms))
        for bn in norms:
            small.set_submodule(bn, nn.Identity())
    for c, norms in plan.constant.items():
        layer = small.get_submodule(c)
        w = layer.weight
        value = layer.bias if layer.bias is not None else w.new_zeros(_width(layer)[0])
        folded = []
        for path in norms:
            bn = small.get_submodule(path)
            if bn.running_mean is None:  # batch statistics even in eval mode: leave it in place
                continue
            value = (value - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                value = value * bn.weight + bn.bias
            small.set_submodule(path, nn.Identity())
            folded.append(path)
        small.set_submodule(c, ConstantLayer(layer, value, folded))


def _check_runs_in_training_mode(dense: nn.Module, small: nn.Module, probe: tuple) -> None:
    """Training mode may run more of the net (auxiliary heads): where the dense net runs in it,
    the pruned one must too. On copies, so that BatchNorm statistics stay as they are."""

    def runs(net: nn.Module) -> Exception | None:
        try:
            with torch.no_grad(), _rng_kept(probe):
                copy.deepcopy(net).train()(*probe)
        except Exception as exc:  # e.g. BatchNorm refuses a batch of one in training mode
            return exc
        return None

    failure = runs(small)
    if failure is not None and runs(dense) is None:
        raise RuntimeError(
            f"the pruned network runs in eval mode but fails in training mode "
            f"({type(failure).__name__}: {failure}); please report this with the network "
            "definition"
        ) from failure


def _check_exact(dense: nn.Module, small: nn.Module, example_input: Any) -> None:
    """Guard against silent errors: the pruned net must compute the zeroed net's function."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    gen = torch.Generator().manual_seed(0)
    probe = tuple(
        torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        if torch.is_tensor(x) and x.is_floating_point()
        else x
        for x in inputs
    )
    with _modes_kept(dense), _modes_kept(small):
        dense.eval(), small.eval()
        with torch.no_grad():
            ref = dense(*probe)
            try:
                out = small(*probe)
            except Exception as exc:
                raise RuntimeError(
                    f"the pruned network fails to run ({type(exc).__name__}: {exc}); its forward "
                    "probably hard-codes a width (e.g. x.view(-1, 800)); use torch.flatten(x, 1)"
                ) from exc
        _check_runs_in_training_mode(dense, small, probe)
    if torch.is_tensor(ref) and torch.is_tensor(out):
        if ref.shape != out.shape:
            raise RuntimeError(f"pruning changed the output shape from {ref.shape} to {out.shape}")
        tol = 1e-4 * (1.0 + float(ref.abs().max()))
        if float((ref - out).abs().max()) > tol:
            raise RuntimeError(
                "internal error: the pruned network does not reproduce the masked network "
                f"(max difference {float((ref - out).abs().max()):.3g}); please report this "
                "with the network definition, or pass verify=False to inspect the result"
            )


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
        a handful of filters run far below their kernels' efficiency on CPUs too: a ResNet-20
        pruned on Fashion-MNIST reached 0.39-0.43 of its FLOP reduction in CPU latency
        unrounded and 0.61-0.65 with ``round_to=8`` (``benchmarks/latency.py``, RESULTS.md).
    verify
        Check on a random input of ``example_input``'s shape that the result computes exactly the
        zeroed network (one forward pass of each); raise if not.

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
    >>> from bayesprune.prune import prune_module
    >>> from models import lenet5_caffe
    >>> net = lenet5_caffe()
    >>> keep = torch.zeros(20, dtype=torch.bool)
    >>> keep[:5] = True
    >>> small = prune_module(net, {"0": keep}, torch.zeros(1, 1, 28, 28))
    >>> small[0].out_channels, small[3].in_channels
    (5, 5)
    """
    example_input = _to_module_device(example_input, module)
    plan = plan_pruning(
        module,
        masks,
        example_input,
        scores=scores,
        min_fraction=min_fraction,
        min_nodes=min_nodes,
        round_to=round_to,
    )
    small = _apply_plan(module, plan)
    if verify:
        reference = copy.deepcopy(module)
        _zero_in_place(reference, plan.masks, _bn_followers(reference))
        _check_exact(reference, small, example_input)
    return small.eval()  # a deployable network: BatchNorm uses its running statistics


# --------------------------------------------------------------------------------------------------
# from a posterior (or scores) to a smaller network
# --------------------------------------------------------------------------------------------------


def _to_module_device(example_input: Any, module: nn.Module) -> Any:
    """Tracing runs the network once, so its input must live where its weights do."""
    param = next(module.parameters(), None)
    if param is None:
        return example_input
    if torch.is_tensor(example_input):
        return example_input.to(param.device)
    if isinstance(example_input, tuple):
        return tuple(x.to(param.device) if torch.is_tensor(x) else x for x in example_input)
    return example_input


def _infer_example_input(model: Any, module: nn.Module) -> torch.Tensor:
    for attr in ("example_input", "input_shape"):
        value = getattr(model, attr, None)
        if torch.is_tensor(value):
            return torch.zeros_like(value[:1])
        if isinstance(value, tuple | list | torch.Size) and all(isinstance(v, int) for v in value):
            return torch.zeros(1, *value)
    first = next((m for m in module.modules() if isinstance(m, _LAYERS)), None)
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
    min_fraction, min_nodes, round_to, verify
        As in :func:`prune_module`.

    Exactly one of ``threshold``, ``keep`` and ``masks`` must be given.

    Example
    -------
    >>> import torch
    >>> from bayesprune.prune import prune
    >>> from models import lenet_300_100
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
    bayesian = _is_bayesian(model)
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
    layers = _prunable_layers(base)
    if scores is not None:
        scores = _check_masks(layers, scores, what="scores")
    if example_input is None:
        example_input = _infer_example_input(model, base)
    example_input = _to_module_device(example_input, base)
    if masks is None:
        # the units of the network's output are never pruned, so they take no part in the
        # decisions (and, with keep=, in the global ranking); zeroing a logit would only hurt
        outputs = {
            p
            for g in dependency_groups(base, example_input)
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
    )
    # with keep= an empty layer only says where the global ranking fell, not that the posterior
    # switched the layer off
    if bayesian and min_nodes > 0 and not never_fitted and threshold is not None:
        _warn_switched_off(masks, plan)
    # the posterior mean of a Bayesian net depends on the mask (its gates), so build it for the
    # final decisions; a plain module is simply zeroed and sliced
    module = model.mean_module(plan.masks) if bayesian else base
    small = _apply_plan(module, plan)
    if verify:
        reference = copy.deepcopy(module)
        _zero_in_place(reference, plan.masks, _bn_followers(reference))
        _check_exact(reference, small, example_input)
    return small.eval()  # a deployable network: BatchNorm uses its running statistics


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
    >>> from bayesprune.prune import finetune
    >>> from models import lenet_300_100
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


# --------------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------------


def _width(m: nn.Module) -> tuple[int, int]:
    """(output width, input width) of a counted layer."""
    if isinstance(m, RemovedLayer):
        return 0, m.in_width
    if isinstance(m, ConstantLayer):
        return m.value.numel(), 0
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    if isinstance(m, _CONVS):
        return m.out_channels, m.in_channels
    return m.num_features, m.num_features


def architecture_string(net: nn.Module) -> str:
    """Widths in the form of the pruning literature: conv filters, then the inputs of each Linear.

    LeNet-5-Caffe gives ``"20-50-800-500"``, LeNet-300-100 ``"784-300-100"``.

    >>> from bayesprune.prune import architecture_string
    >>> from models import lenet5_caffe
    >>> architecture_string(lenet5_caffe())
    '20-50-800-500'
    """
    parts = []
    for m in net.modules():
        kind = m.kind if isinstance(m, _REPLACED) else type(m).__name__
        if isinstance(m, _CONVS) or kind in ("Conv1d", "Conv2d", "Conv3d"):
            parts.append(_width(m)[0])
        elif isinstance(m, nn.Linear) or kind == "Linear":
            parts.append(_width(m)[1])
    return "-".join(str(p) for p in parts)


@dataclass
class LayerStats:
    """One layer of a :class:`CompressionReport` (FLOPs are MACs per example)."""

    name: str
    kind: str
    width_before: int
    width_after: int
    in_before: int
    in_after: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclass
class CompressionReport:
    """Size and measured speed of a dense network and its pruned version.

    ``latency`` maps batch size -> ``(dense seconds, pruned seconds)``, medians of repeated
    wall-clock runs after warm-up on ``device``; ``speedup`` is their ratio, and
    ``speedup_range`` the lowest and highest speed-up of the single rounds (one dense and one
    pruned measurement, taken back to back): two runs of the same comparison differ by about that
    much. ``flop_reduction`` is the ratio of FLOP counts: a property of the architecture, not a
    measured speed-up.
    """

    layers: list[LayerStats]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    latency: dict[int, tuple[float, float]] = field(default_factory=dict)
    speedup_range: dict[int, tuple[float, float]] = field(default_factory=dict)
    device: str = "cpu"
    threads: int = 1
    architecture_before: str = ""
    architecture_after: str = ""

    @property
    def params_kept(self) -> float:
        return self.params_after / self.params_before

    @property
    def flops_kept(self) -> float:
        return self.flops_after / self.flops_before

    @property
    def flop_reduction(self) -> float:
        return self.flops_before / max(self.flops_after, 1)

    @property
    def speedup(self) -> dict[int, float]:
        return {bs: dense / small for bs, (dense, small) in self.latency.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (JSON-serialisable)."""
        return {
            "layers": [vars(s).copy() for s in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_kept": self.params_kept,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flops_kept": self.flops_kept,
            "flop_reduction": self.flop_reduction,
            "latency_s": {
                str(bs): {"dense": d, "pruned": s} for bs, (d, s) in self.latency.items()
            },
            "speedup": {str(bs): v for bs, v in self.speedup.items()},
            "speedup_range": {str(bs): list(v) for bs, v in self.speedup_range.items()},
            "device": self.device,
            "threads": self.threads,
            "architecture_before": self.architecture_before,
            "architecture_after": self.architecture_after,
        }

    def __str__(self) -> str:
        def pct(a: int, b: int) -> str:
            return f"{100 * a / b:.1f}%" if b else "-"

        rows = [("layer", "kind", "width", "inputs", "params", "kept", "FLOPs", "kept")]
        for s in self.layers:
            rows.append(
                (
                    s.name,
                    s.kind,
                    f"{s.width_before} -> {s.width_after}",
                    f"{s.in_before} -> {s.in_after}",
                    f"{s.params_before:,} -> {s.params_after:,}",
                    pct(s.params_after, s.params_before),
                    f"{s.flops_before:,} -> {s.flops_after:,}",
                    pct(s.flops_after, s.flops_before),
                )
            )
        rows.append(
            (
                "total",
                "",
                "",
                "",
                f"{self.params_before:,} -> {self.params_after:,}",
                pct(self.params_after, self.params_before),
                f"{self.flops_before:,} -> {self.flops_after:,}",
                pct(self.flops_after, self.flops_before),
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(-1, lines[1])
        lines.append(f"architecture: {self.architecture_before} -> {self.architecture_after}")
        lines.append(f"FLOP reduction: {self.flop_reduction:.2f}x (a count, not a timing)")
        for bs, (d, s) in self.latency.items():
            lo_hi = self.speedup_range.get(bs)
            spread = f" (single rounds {lo_hi[0]:.2f}-{lo_hi[1]:.2f}x)" if lo_hi else ""
            lines.append(
                f"latency on {self.device} ({self.threads} thread(s)), batch {bs}: dense "
                f"{d * 1e3:.3f} ms, pruned {s * 1e3:.3f} ms, measured speed-up {d / s:.2f}x{spread}"
            )
        return "\n".join(lines)


def _own_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


def _flops_checked(net: nn.Module, what: str, example_input: torch.Tensor) -> dict[str, int]:
    return _macs_by_layer(net, _to_module_device(example_input, net), what)


def compression_report(
    dense: nn.Module,
    small: nn.Module,
    example_input: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    batch_sizes: Iterable[int] = (1, 256),
    repeats: int = 30,
    warmup: int = 5,
    rounds: int = 3,
    progress: bool = True,
) -> CompressionReport:
    """Per-layer widths, parameters and FLOPs of ``dense`` and ``small``; their measured latency.

    Parameters
    ----------
    dense, small
        The network before and after pruning (same module paths; ``small`` may have its BatchNorms
        folded by :func:`bayesprune.fold_batchnorm`, reported as layers of width 0).
    example_input
        An input batch; its first example is repeated to each of ``batch_sizes`` for timing.
    device
        Where latency is measured (``"cpu"``, ``"cuda"``).
    batch_sizes
        Batch sizes to time; an empty tuple skips timing.
    repeats, warmup
        Timed and discarded passes per measurement (:func:`bayesprune.metrics.measure_latency`).
    rounds
        Measurements per net, alternating dense and pruned; the latency is their median.
    progress
        Show a progress bar over the latency measurements.

    Example
    -------
    >>> import torch
    >>> from bayesprune.prune import compression_report, prune_module
    >>> from models import lenet_300_100
    >>> net = lenet_300_100(in_features=64)
    >>> small = prune_module(net, {"1": torch.arange(300) < 30}, torch.zeros(1, 64))
    >>> rep = compression_report(net, small, torch.zeros(1, 64), batch_sizes=())
    >>> round(rep.params_kept, 3)
    0.12
    """
    if not torch.is_tensor(example_input):
        raise TypeError("example_input must be a tensor (one input batch)")
    device = resolve_device(device)
    if count_params(small) > count_params(dense):
        raise ValueError(
            f"small has more parameters ({count_params(small):,}) than dense "
            f"({count_params(dense):,}): pass the dense network first, compression_report(dense, "
            "small, example_input)"
        )
    f_dense, f_small = (
        _flops_checked(net, what, example_input)
        for net, what in ((dense, "dense"), (small, "small"))
    )
    small_modules = dict(small.named_modules())
    dropped = {n for m in small.modules() if isinstance(m, RemovedLayer) for n in m.norms}
    layers = []
    for name, m in dense.named_modules():
        if name not in f_dense:
            continue
        s = small_modules.get(name)
        if isinstance(m, _NORMS) and isinstance(s, nn.Identity):  # folded, or its branch removed
            wb, ib = _width(m)
            how = "removed" if name in dropped else "folded"
            layers.append(
                LayerStats(name, f"{type(m).__name__} ({how})", wb, 0, ib, 0,
                           _own_params(m), 0, f_dense[name], 0)
            )  # fmt: skip
            continue
        if isinstance(s, _REPLACED) and s.kind == type(m).__name__:
            how = "removed" if isinstance(s, RemovedLayer) else "constant"
            (wb, ib), (wa, ia) = _width(m), _width(s)
            layers.append(
                LayerStats(name, f"{s.kind} ({how})", wb, wa, ib, ia,
                           _own_params(m), _own_params(s), f_dense[name], 0)
            )  # fmt: skip
            continue
        if s is None or type(s) is not type(m):
            raise ValueError(
                f"small has no {type(m).__name__} at {name!r}: compare a network with its own "
                "pruned version"
            )
        (wb, ib), (wa, ia) = _width(m), _width(s)
        layers.append(
            LayerStats(
                name,
                type(m).__name__,
                wb,
                wa,
                ib,
                ia,
                _own_params(m),
                _own_params(s),
                f_dense[name],
                f_small.get(name, 0),
            )
        )
    if rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds}")
    latency, spread = {}, {}
    batch_sizes = list(batch_sizes)
    bar = tqdm(
        total=2 * rounds * len(batch_sizes), desc="latency", disable=not progress, leave=False
    )
    for bs in batch_sizes:
        x = example_input[:1].expand(bs, *example_input.shape[1:]).contiguous()
        times: tuple[list[float], list[float]] = ([], [])
        # alternate the two nets so that a slow spell of a shared machine hits both alike
        for _ in range(rounds):
            for net, out in ((dense, times[0]), (small, times[1])):
                out.append(measure_latency(net, x, device=device, repeats=repeats, warmup=warmup))
                bar.update()
        latency[int(bs)] = (statistics.median(times[0]), statistics.median(times[1]))
        ratios = [d / s for d, s in zip(*times, strict=True)]
        spread[int(bs)] = (min(ratios), max(ratios))
    bar.close()
    return CompressionReport(
        layers=layers,
        params_before=count_params(dense),
        params_after=count_params(small),
        flops_before=sum(f_dense.values()),
        flops_after=sum(f_small.values()),
        latency=latency,
        speedup_range=spread,
        device=str(device),
        threads=torch.get_num_threads(),
        architecture_before=architecture_string(dense),
        architecture_after=architecture_string(small),
    )


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------

_FORMAT = "bayesprune.pruned/1"


def save_pruned(small: nn.Module, path: str | Path) -> None:
    """Write a pruned network's weights and layer shapes to a safetensors file (no pickle).

    The metadata records every Linear / Conv / BatchNorm width, so :func:`load_pruned` can re-slice
    an unpruned instance of the architecture to fit, and every ``nn.Identity`` (where
    :func:`bayesprune.fold_batchnorm` removed a BatchNorm), so that a folded network reloads too.

    Example
    -------
    >>> import tempfile, torch
    >>> from bayesprune.prune import load_pruned, prune_module, save_pruned
    >>> from models import lenet_300_100
    >>> net = lenet_300_100(in_features=64)
    >>> small = prune_module(net, {"1": torch.arange(300) < 7}, torch.zeros(1, 64))
    >>> path = tempfile.mkdtemp() + "/small.safetensors"
    >>> save_pruned(small, path)
    >>> load_pruned(path, lambda: lenet_300_100(in_features=64))[1].out_features
    7
    """
    from safetensors.torch import save_file

    if _is_bayesian(small):
        raise TypeError(
            "save_pruned saves a plain pruned network; this is a BayesianModule. Save it with "
            "bnet.save(path) (reload with bp.load), or prune it first: "
            "bp.save_pruned(bp.prune(bnet, ...), path)"
        )
    check_target(path)
    widths, identities, replaced = {}, [], {}
    for name, m in small.named_modules():
        if isinstance(m, _LAYERS + _NORMS):
            out_w, in_w = _width(m)
            widths[name] = {"type": type(m).__name__, "out": out_w, "in": in_w, **_conv_config(m)}
        elif isinstance(m, nn.Identity) and name:
            identities.append(name)
        elif isinstance(m, _REPLACED):
            replaced[name] = {
                "as": type(m).__name__,
                "type": m.kind,
                "in": _width(m)[1],
                "norms": list(m.norms),
                "geometry": m.geometry,
            }
    # cloned, contiguous CPU tensors: safetensors refuses views and shared storage
    state = {k: v.detach().cpu().contiguous().clone() for k, v in small.state_dict().items()}
    meta = {
        "format": _FORMAT,
        "widths": json.dumps(widths),
        "identities": json.dumps(identities),
        "replaced": json.dumps(replaced),
    }
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def _conv_config(m: nn.Module) -> dict[str, Any]:
    """What a convolution computes besides its widths (empty for other layers), JSON-able."""
    if not isinstance(m, _CONVS):
        return {}
    keys = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(m, k)) for k in keys)
    }


def _check_against_base(name: str, saved: dict[str, Any], m: nn.Module) -> None:
    """Refuse a base whose layer computes something else than the saved one, or is narrower."""
    base_out, base_in = _width(m)
    if saved["out"] > base_out or saved["in"] > base_in:
        raise ValueError(
            f"layer {name!r} was saved {saved['in']} -> {saved['out']} wide but base's is "
            f"{base_in} -> {base_out}: pruning never widens a layer, so base is not the "
            "architecture the network was pruned from; pass that (unpruned) architecture"
        )
    for key, value in _conv_config(m).items():
        if key in saved and saved[key] != value:  # files saved before this check lack it
            raise ValueError(
                f"layer {name!r} was saved with {key}={saved[key]} but base's has {key}={value}: "
                "pass the architecture the network was pruned from"
            )


def load_pruned(
    path: str | Path, base: nn.Module | Callable[[], nn.Module], *, device: str = "cpu"
) -> nn.Module:
    """Rebuild a network saved by :func:`save_pruned`.

    Parameters
    ----------
    path
        A file written by :func:`save_pruned`.
    base
        An unpruned instance of the architecture (it is copied, not modified) or a callable that
        builds one, e.g. ``lambda: resnet20()``. Its layers are re-sliced to the saved widths.
    device
        Where the returned network lives.

    Returns
    -------
    nn.Module
        ``base``'s architecture with the saved widths and weights, in ``base``'s mode (a freshly
        built module is in training mode): call ``.eval()`` before inference (BatchNorm).

    Raises
    ------
    ValueError
        When ``base`` is not the architecture the network was pruned from: a layer of another
        type, a convolution with another kernel, stride, padding, dilation or groups, or a layer
        narrower than the saved one.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    device = resolve_device(device)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a safetensors file ({exc})") from exc
    if meta.get("format") != _FORMAT:
        raise ValueError(
            f"{path} was not written by bayesprune.save_pruned (metadata format "
            f"{meta.get('format')!r}, expected {_FORMAT!r})"
        )
    widths = json.loads(meta["widths"])
    state = load_file(str(path))
    if isinstance(base, nn.Module):
        net = copy.deepcopy(base)
    elif callable(base):
        net = base()
        if not isinstance(net, nn.Module):
            raise TypeError(f"base() must return an nn.Module, got {type(net).__name__}")
    else:
        raise TypeError(f"base must be an nn.Module or a callable building one, got {type(base)}")
    for name in json.loads(meta.get("identities", "[]")):
        try:
            net.set_submodule(name, nn.Identity())
        except AttributeError as exc:
            raise ValueError(
                f"the saved network has a folded layer at {name!r} that base does not have: "
                "pass the same architecture"
            ) from exc
    modules = dict(net.named_modules())
    for name, r in json.loads(meta.get("replaced", "{}")).items():
        layer = modules.get(name)
        if layer is None or type(layer).__name__ != r["type"]:
            raise ValueError(
                f"the saved network has a removed {r['type']} at {name!r} but base has "
                f"{type(layer).__name__ if layer is not None else 'nothing'} there: pass the same "
                "architecture"
            )
        if "geometry" in r and json.loads(json.dumps(_geometry(layer))) != r["geometry"]:
            raise ValueError(
                f"the removed layer {name!r} was saved with kernel, padding and stride "
                f"{r['geometry']} but base's are {_geometry(layer)}: pass the architecture the "
                "network was pruned from"
            )
        if r["as"] == "RemovedLayer":
            net.set_submodule(name, RemovedLayer(layer, r["in"], r["norms"]))
        else:
            value = torch.empty_like(state[f"{name}.value"])
            net.set_submodule(name, ConstantLayer(layer, value, r["norms"]))
    modules = dict(net.named_modules())
    for name, w in widths.items():
        m = modules.get(name)
        if m is None or type(m).__name__ != w["type"]:
            raise ValueError(
                f"the saved network has a {w['type']} at {name!r} but base has "
                f"{type(m).__name__ if m is not None else 'nothing'} there: pass the same architecture"
            )
        _check_against_base(name, w, m)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            key = f"{name}.{attr}" if name else attr
            # any registered slot the file fills, including a bias that folding added
            if key in state and (attr in m._parameters or attr in m._buffers):
                _set(m, attr, torch.empty_like(state[key]))
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = w["out"], w["in"]
        elif isinstance(m, _CONVS):
            m.out_channels, m.in_channels = w["out"], w["in"]
        else:
            m.num_features = w["out"]
    try:
        net.load_state_dict(_with_versions(state, net), strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"the weights in {path} do not fit base {type(net).__name__}: {exc}"
        ) from exc
    return net.to(device)
