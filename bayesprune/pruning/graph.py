"""The dependency graph of a network: channel spaces tied by additions, concatenations and
flattens, found by tracing the forward pass with :mod:`torch.fx` (see :mod:`bayesprune.pruning`
for the rules), and the groups of layers whose nodes must be pruned together."""

from __future__ import annotations

import io
import math
import operator
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .._utils import modes_kept
from ..data import input_tensor
from ..registry import fused_paths_off, has_nodes, internal_groups, layer_spec, symbolic_trace
from .layers import NORM_TYPES, to_module_device
from .ops import (
    ADDITIVE,
    ADDITIVE_METHODS,
    MULTIPLICATIVE,
    MULTIPLICATIVE_METHODS,
    OFFSET_MODULES,
    REDUCE_FUNCTIONS,
    REDUCTIONS,
    RESHAPES_FUNCTIONS,
    RESHAPES_METHODS,
    ZERO_PRESERVING_FUNCTIONS,
    ZERO_PRESERVING_METHODS,
    ZERO_PRESERVING_MODULES,
)

__all__ = [
    "Analysis", "ChannelGroup", "DependencyGraph", "bn_followers", "dependency_groups",
    "direct_layer", "rng_kept", "tensor_nodes", "to_module_device", "trace",
]  # fmt: skip


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
def rng_kept(example_input: Any) -> Iterator[None]:
    """Leave torch's global random state as it was (CPU, and the CUDA devices of the inputs):
    dropout in a traced training-mode graph or in a training-mode check draws from it."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    devices = sorted(
        {x.device.index or 0 for x in inputs if torch.is_tensor(x) and x.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        yield


def trace(module: nn.Module, example_input: Any, training: bool = False) -> fx.GraphModule:
    """The module's graph in eval mode (or training mode), with shapes from ``example_input``.

    fx bakes ``if self.training`` (and ``F.dropout(x, training=self.training)``) into the graph,
    so each mode has its own graph: the eval one is the network that is deployed, the training
    one may run more branches (the auxiliary heads of GoogLeNet / Inception), or skip some at
    random (LayerDrop). :class:`Analysis` walks both.
    """
    with modes_kept(module):
        module.train(training)
        try:
            gm = symbolic_trace(module)
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
    with modes_kept(module), rng_kept(example_input):
        module.eval()
        try:
            # ShapeProp prints the traceback of a failing node before raising; the error says it
            with torch.no_grad(), fused_paths_off(), redirect_stderr(io.StringIO()):
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


def direct_layer(gm: fx.GraphModule, bn_node: fx.Node) -> str | None:
    """Path of the Linear / Conv whose output goes only into this BatchNorm call, if any."""
    src = bn_node.args[0] if bn_node.args else None
    # the layer's output must feed nothing but this BatchNorm (the rule of BayesianModule's gates,
    # which act after such a BatchNorm): otherwise the zero channel also flows around the BatchNorm
    if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
        return None
    layer, bn = gm.get_submodule(src.target), gm.get_submodule(bn_node.target)
    if not has_nodes(layer):
        return None
    width = layer_spec(layer).widths(layer)[0]
    return str(src.target) if bn.num_features == width else None


def _first_tensor_arg(node: fx.Node) -> fx.Node | None:
    for a in node.args:
        if isinstance(a, fx.Node) and _tensor_meta(a) is not None:
            return a
    return None


def tensor_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n) if _tensor_meta(n) is not None else None)
    return out


class Analysis:
    """Walk the traced graphs and record channel spaces, producers, consumers and norms.

    Both the eval-mode and the training-mode graph are walked, into the same channel spaces: a
    layer met in both is treated like a layer called twice (its spaces are joined), so the plan
    holds for every branch either mode runs, auxiliary heads included.
    """

    def __init__(self, module: nn.Module, example_input: Any) -> None:
        self.module = module
        self.graphs = [trace(module, example_input, training=False)]
        try:
            self.graphs.append(trace(module, example_input, training=True))
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
        self.internal: set[str] = set()  # producers of nodes internal to a block or layer
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
        for arg in tensor_nodes((node.args, node.kwargs)):
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
        tensors = tensor_nodes(node.args)
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
            for t in tensor_nodes(node.args):
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
        groups = internal_groups(mod)
        if groups is not None:  # a block or attention: nodes of its own inside, its width kept
            self._unsupported(node, f"the input and output width of {type(mod).__name__} {path!r}")
            for g in (g.under(path) for g in groups):
                space = self.spaces.new(g.width, g.frozen)
                if g.producer in self.out_space:
                    space = self.spaces.union(self.out_space[g.producer], space, node.name)
                self.out_space[g.producer] = space
                self.in_space.update({c: _Layout.of(space) for c in g.consumers})
                self.internal.add(g.producer)
        elif has_nodes(mod):
            self._visit_layer(node, path, mod, src)
        elif isinstance(mod, NORM_TYPES):
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
            direct = direct_layer(self.gm, node)
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
        elif isinstance(mod, ZERO_PRESERVING_MODULES) and src is not None:
            self._pass_through(node, src, True, type(mod).__name__)
        elif isinstance(mod, OFFSET_MODULES) and src is not None:
            self._pass_through(node, src, False, type(mod).__name__)
        else:
            self._unsupported(node, f"module {path!r} of unsupported type {type(mod).__name__}")

    def _visit_layer(self, node: fx.Node, path: str, mod: nn.Module, src: fx.Node | None) -> None:
        in_shape = _shape(src) if src is not None else None
        lay = self.layout.get(src) if src is not None else None
        spec = layer_spec(mod)
        width, groups = spec.widths(mod)[0], getattr(mod, "groups", 1)
        problem = None
        if groups != 1:
            problem = f"grouped convolution {path!r} (groups={groups})"
        elif spec.spatial_dims == 0 and (in_shape is None or len(in_shape) != 2):
            kind = "Linear" if isinstance(mod, nn.Linear) else type(mod).__name__
            problem = f"{kind} {path!r} applied to a {len(in_shape or ())}-D input"
        elif spec.spatial_dims > 0 and lay is not None and not lay.channelwise:
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
        if target in ZERO_PRESERVING_FUNCTIONS and src is not None:
            self._pass_through(node, src, True, getattr(target, "__name__", str(target)))
        elif getattr(target, "__name__", None) in REDUCTIONS and target in REDUCE_FUNCTIONS:
            self._reduce(node, src, target.__name__)
        elif target in RESHAPES_FUNCTIONS and src is not None:
            self._regroup(node, src, getattr(target, "__name__", str(target)))
        elif target in (torch.cat, torch.concat, torch.concatenate):
            self._cat(node)
        elif target in ADDITIVE:
            self._binary(node, additive=True)
        elif target in MULTIPLICATIVE or target in (operator.truediv, torch.div):
            if target in (operator.truediv, torch.div) and (
                len(tensor_nodes(node.args)) != 1 or _tensor_meta(node.args[0]) is None
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
        if name in ZERO_PRESERVING_METHODS and src is not None:
            self._pass_through(node, src, True, name)
        elif name in REDUCTIONS and src is not None:
            self._reduce(node, src, name)
        elif name in RESHAPES_METHODS and src is not None:
            self._regroup(node, src, f".{name}()")
        elif name in ADDITIVE_METHODS:
            self._binary(node, additive=True)
        elif name in MULTIPLICATIVE_METHODS:
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


def dependency_groups(
    module: nn.Module, example_input: Any, *, graph: DependencyGraph | None = None
) -> list[ChannelGroup]:
    """The channel groups of ``module``: which layers' output units must be pruned together.

    Parameters
    ----------
    module
        A plain, ``torch.fx``-traceable network.
    example_input
        One batch (or a tuple of inputs) the network accepts; it fixes the traced shapes.
    graph
        A :class:`DependencyGraph` of the same architecture, to answer without tracing.

    Returns
    -------
    list of ChannelGroup
        One entry per channel space, in the order the producing layers appear in the graph.

    Example
    -------
    >>> from bayesprune.pruning import dependency_groups
    >>> from bayesprune.models import resnet20
    >>> import torch
    >>> groups = dependency_groups(resnet20(), torch.zeros(1, 1, 28, 28))
    >>> sorted(len(g.producers) for g in groups if g.prunable)[-1]  # stem + 3 blocks of stage 1
    4
    """
    if graph is not None:
        graph.check(module)
        return graph.groups()[0]
    return Analysis(module, example_input).groups()[0]


class DependencyGraph:
    """The dependency analysis of one architecture, traced once and asked many times.

    Tracing (eval and training mode) is the costly part of pruning. The analysis depends only on
    the architecture (module paths, types and shapes), not on the weights, so one graph serves
    every network of that architecture: :func:`bayesprune.conformal.certify` builds one and prunes
    all of its candidate levels with it (``prune(..., graph=g)``), instead of tracing each one.

    Example
    -------
    >>> import torch
    >>> from bayesprune.pruning import DependencyGraph, prune_module
    >>> from bayesprune.models import lenet5_caffe
    >>> net, x = lenet5_caffe(), torch.zeros(1, 1, 28, 28)
    >>> g = DependencyGraph(net, x)
    >>> keep = torch.arange(20) < 5
    >>> prune_module(net, {"0": keep}, x, graph=g)[0].out_channels
    5
    """

    def __init__(self, module: nn.Module, example_input: Any) -> None:
        self.analysis = Analysis(module, example_input)
        self.signature = _signature(module)
        if len(self.analysis.graphs) == 2:
            self.bn_followers = _followers(self.analysis.graphs)
        else:  # training mode failed on example_input: trace it without shapes
            self.bn_followers = bn_followers(module)

    def check(self, module: nn.Module) -> None:
        """A ``ValueError`` unless ``module`` has the architecture this graph was built on: the same
        submodule paths and classes and the same parameter and buffer shapes."""
        if _signature(module) != self.signature:
            raise ValueError(
                f"this DependencyGraph was built on another architecture than the "
                f"{type(module).__name__} it is asked about; build one per architecture: "
                "DependencyGraph(module, example_input)"
            )

    def groups(self) -> tuple[list[ChannelGroup], dict[str, list], dict[str, list]]:
        """Fresh groups (callers may set ``keep``) and the consumers' input layouts."""
        return self.analysis.groups()


def _signature(module: nn.Module) -> tuple:
    """Every submodule's path and class (the forward code that wires them) and every parameter and
    buffer's shape: what the traced graph depends on, short of tracing again. A forward whose
    control flow reads plain attributes (flags set in ``__init__``) is not covered."""
    return tuple(
        (
            name,
            f"{type(m).__module__}.{type(m).__qualname__}",
            tuple(
                (k, tuple(t.shape))
                for k, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
                if t is not None
            ),
        )
        for name, m in module.named_modules()
    )


def _followers(graphs: list[fx.GraphModule]) -> dict[str, set[str]]:
    """Layer path -> the BatchNorms that its output alone feeds, in any of ``graphs``."""
    out: dict[str, set[str]] = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), NORM_TYPES):
                layer = direct_layer(gm, node)
                if layer is not None:
                    out.setdefault(layer, set()).add(str(node.target))
    return out


def bn_followers(module: nn.Module) -> dict[str, set[str]]:
    """Layer path -> the BatchNorms fed only by that layer's output, read off the traced graphs."""
    return _followers([trace(module, None, training=t) for t in (False, True)])
