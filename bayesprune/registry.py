"""The layer types bayesprune knows, written once, and :func:`register_layer` for your own.

Every part of the package asks this module what it needs to know about a layer: the pruner
(which layers have nodes, along which weight axes to slice them, which are BatchNorms), the
metrics (MACs), :func:`bayesprune.fold_batchnorm` (along which axis to scale), the saved pruned
networks (widths and hyperparameters) and :func:`bayesprune.bayesianize` (which layers get a
Bayesian twin). What it knows about a layer family is one :class:`LayerSpec`.

========================  ============================================================
family                    node (what pruning removes)
========================  ============================================================
``nn.Linear``             output feature (weight row)
``nn.Conv1d/2d/3d``       output channel (filter); Conv3d is pruned and counted but has no
                          Bayesian twin yet
``nn.BatchNorm1d/2d/3d``  the channel of the layer it follows (not a node of its own)
``nn.MultiheadAttention`` a head: its q, k, v rows and out_proj columns (registered by
                          :mod:`bayesprune.pruning.attention`, with ``nodes=``, below)
========================  ============================================================

Two extensions for transformers. A layer whose node is not one index of one weight axis gets
``LayerSpec(nodes=...)``, a :class:`NodeGroups` that zeroes, selects and scores its nodes (the
heads of an attention layer); such nodes are *internal*: the layer's output width is kept. A
container whose forward is known but not traceable (``nn.TransformerEncoderLayer``, whose fused
fast path branches on tensors) is registered with :func:`register_block`: a leaf of every trace,
whose :class:`InternalGroup` s (producer, width, consumers; e.g. the feed-forward units of
``linear1`` read by ``linear2`` alone) the pruner removes (:mod:`bayesprune.pruning.transformer`).

Two ways to add a layer type:

* ``register_layer(cls, like=nn.Linear)``: ``cls`` subclasses a known family and computes what
  its base computes (a different initialisation, extra buffers). An unregistered subclass is not
  assumed to, so :func:`bayesprune.bayesianize` leaves it deterministic; once registered it gets
  its base's Bayesian twin and is treated as its base everywhere.
* ``register_layer(cls, LayerSpec(...))``: a new family, with its own weight layout (e.g.
  ``nn.ConvTranspose2d``, whose weight is ``[in, out, kH, kW]``: node axis 1, input axis 0).
  Its output must be linear in ``(weight, bias)``, with one output node per index of the
  weight's node axis and per entry of ``bias``. With ``forward=`` it gets a generic Bayesian twin
  (:class:`bayesprune.layers.BayesianSpecLayer`: the weights are kept node-first inside, and the
  local reparameterization is ``mean = forward(x, mu)``, ``var = forward(x**2, sigma**2)``).
  The pruner slices ``weight`` along ``node_axis`` / ``input_axis`` and ``bias`` along its only
  axis, then sets the two ``width_attrs``; its exactness check runs on every prune. Grouped
  layers (``groups != 1``) are kept whole, and a new family is never replaced by the
  placeholders of a removed branch (``prune(..., min_nodes=0)`` keeps one node instead).

Lookups (:func:`layer_spec`) follow the class hierarchy, as ``isinstance`` does: a subclass of a
registered type is pruned and counted like it; only :func:`bayesprune.bayesianize` asks for the
exact type (:func:`layer_family`).

Example
-------
>>> import torch
>>> import torch.nn.functional as F
>>> from torch import nn
>>> import bayesprune as bp
>>> class ScaledInit(nn.Linear):  # a Linear with its own initialisation: same function
...     def reset_parameters(self):
...         super().reset_parameters()
...         with torch.no_grad():
...             self.weight.mul_(0.5)
>>> bp.register_layer(ScaledInit, like=nn.Linear)
>>> net = nn.Sequential(ScaledInit(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> sorted(bp.bayesianize(net).bayesian_layers)
['0', '2']

A layer with another weight layout: a Linear that stores its weight ``[in, out]``.

>>> class InOutLinear(nn.Module):
...     def __init__(self, n_in, n_out):
...         super().__init__()
...         self.in_features, self.out_features = n_in, n_out
...         self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
...         self.bias = nn.Parameter(torch.zeros(n_out))
...     def forward(self, x):
...         return x @ self.weight + self.bias
>>> spec = bp.LayerSpec(
...     node_axis=1, input_axis=0, width_attrs=("out_features", "in_features"),
...     forward=lambda m, x, w, b: x @ w + (0 if b is None else b),
...     macs=lambda m, x, out: m.in_features * m.out_features + m.out_features)
>>> bp.register_layer(InOutLinear, spec)
>>> net = nn.Sequential(InOutLinear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> small = bp.prune_module(net, {"0": torch.arange(8) < 3}, torch.zeros(1, 4))
>>> tuple(small[0].weight.shape), small[2].in_features, bp.count_flops(small, torch.zeros(1, 4))
((4, 3), 3, 27)
>>> type(bp.bayesianize(net).net[0]).__name__
'BayesianSpecLayer'
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "CONV_TYPES",
    "LAYER_TYPES",
    "NORM_TYPES",
    "BlockSpec",
    "InternalGroup",
    "LayerSpec",
    "NodeGroups",
    "block_spec",
    "fused_paths_off",
    "has_nodes",
    "internal_groups",
    "layer_family",
    "layer_spec",
    "prepare_blocks",
    "register_block",
    "register_layer",
    "registered_layers",
    "symbolic_trace",
]

#: the built-in layers with nodes: Linear (output features) and convolutions (output channels)
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: the convolutions among them
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: BatchNorms: per-channel, pruned with the layer that feeds them
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: the MACs function of a spec: (module, input, output) of one call -> MACs per example
MacsFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], int]
#: the forward function of a spec: (module, x, weight, bias) -> output, linear in (weight, bias)
ForwardFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class NodeGroups:
    """How a layer's nodes map onto its tensors when a node is not one index along one axis of
    ``weight``: an attention head is rows of the packed query/key/value projection *and* columns
    of the output projection (:mod:`bayesprune.pruning.attention`).

    A layer whose :class:`LayerSpec` has ``nodes=`` has *internal* nodes: they are produced and
    consumed inside the layer, so its output width stays what it is and pruning them changes no
    other layer (the pruner's dependency graph gives them a channel group of their own and keeps
    the layer's inputs and outputs whole). The pruner asks the spec's ``nodes`` instead of slicing
    ``weight`` / ``bias``. Subclass it and implement the three methods.
    """

    #: the class :meth:`select` returns (a dense ``nn.MultiheadAttention`` cannot express fewer
    #: heads of the same width, so its pruned version is another class); ``None`` = the same class
    pruned_type: type[nn.Module] | None = None

    def rows(self, module: nn.Module) -> torch.Tensor:
        """``[nodes, group size]``: each node's parameters (its default pruning score is their norm)."""
        raise NotImplementedError

    def zero(self, module: nn.Module, drop: torch.Tensor) -> None:
        """Zero, in place, every parameter of the nodes where the bool vector ``drop`` is True."""
        raise NotImplementedError

    def select(self, module: nn.Module, keep: torch.Tensor) -> nn.Module:
        """A copy of ``module`` with only the nodes of the index vector ``keep``, in that order."""
        raise NotImplementedError

    def problem(self, module: nn.Module) -> str | None:
        """Why the nodes of this instance cannot be pruned (a configuration the methods above do
        not handle), or ``None``."""
        return None


@dataclass(frozen=True)
class LayerSpec:
    """What bayesprune needs to know about a layer family (see the module docstring).

    Attributes
    ----------
    node_axis, input_axis
        Axes of the layer's ``weight`` that index its output nodes (what pruning removes) and its
        inputs (what pruning an earlier layer removes): ``0, 1`` for ``nn.Linear`` and ``nn.Conv*``,
        ``1, 0`` for ``nn.ConvTranspose*``.
    width_attrs
        Names of the attributes holding the (output, input) widths, e.g.
        ``("out_channels", "in_channels")``; the pruner sets them on the smaller copy.
    macs
        ``macs(module, x, out) -> int``: multiply-accumulates per example of one call with input
        ``x`` and output ``out`` (batch axis first), bias included.
    forward
        ``forward(module, x, weight, bias) -> out``: the layer's function of its input and of a
        weight and bias in its own layout (reading only hyperparameters such as ``stride`` from
        ``module``). Optional: without it the layer is pruned and counted but has no Bayesian twin.
    spatial_dims
        ``0`` for a layer on ``[batch, ..., features]`` (features last, like ``nn.Linear``), ``k``
        for one on ``[batch, channels, *k spatial axes]`` (like ``nn.Conv{k}d``).
    hyperparameters
        Names of the attributes that fix what the layer computes besides its widths (kernel size,
        stride, ...): :func:`bayesprune.save_pruned` records them and ``load_pruned`` checks them.
    norm
        A per-channel normalisation (the built-in BatchNorms): no nodes of its own.
    nodes
        A :class:`NodeGroups` for a layer whose nodes are groups of slices of several tensors
        (attention heads); ``node_axis`` / ``input_axis`` are then unused. Such nodes are internal
        to the layer (see :class:`NodeGroups`).
    """

    node_axis: int
    input_axis: int
    width_attrs: tuple[str, str]
    macs: MacsFn
    forward: ForwardFn | None = None
    spatial_dims: int = 0
    hyperparameters: tuple[str, ...] = ()
    norm: bool = False
    nodes: NodeGroups | None = None

    def __post_init__(self) -> None:
        for name in ("node_axis", "input_axis", "spatial_dims"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TypeError(f"LayerSpec({name}=...) must be an integer >= 0, got {v!r}")
        if self.node_axis == self.input_axis and not self.norm:
            raise ValueError(
                f"LayerSpec has node_axis == input_axis == {self.node_axis}; give the weight axis "
                "of the output nodes and the one of the inputs (for nn.Linear: node_axis=0, "
                "input_axis=1)"
            )
        attrs = self.width_attrs
        if not (
            isinstance(attrs, tuple) and len(attrs) == 2 and all(isinstance(a, str) for a in attrs)
        ):
            raise TypeError(
                "LayerSpec(width_attrs=...) must be a tuple of two attribute names (output width, "
                f"input width), e.g. ('out_features', 'in_features'); got {attrs!r}"
            )
        if not isinstance(self.hyperparameters, tuple) or not all(
            isinstance(a, str) for a in self.hyperparameters
        ):
            raise TypeError(
                "LayerSpec(hyperparameters=...) must be a tuple of attribute names, e.g. "
                f"('kernel_size', 'stride'); got {self.hyperparameters!r}"
            )
        if not callable(self.macs):
            raise TypeError(
                "LayerSpec(macs=...) must be a function (module, x, out) -> MACs per example, "
                f"got {self.macs!r}"
            )
        if self.nodes is not None and not isinstance(self.nodes, NodeGroups):
            raise TypeError(f"LayerSpec(nodes=...) must be a NodeGroups, got {self.nodes!r}")
        if self.forward is not None and not callable(self.forward):
            raise TypeError(
                "LayerSpec(forward=...) must be a function (module, x, weight, bias) -> output "
                f"(or None), got {self.forward!r}"
            )

    def widths(self, module: nn.Module) -> tuple[int, int]:
        """(output width, input width) of ``module``."""
        out_attr, in_attr = self.width_attrs
        return int(getattr(module, out_attr)), int(getattr(module, in_attr))

    def resize(self, module: nn.Module, out_width: int, in_width: int) -> None:
        """Set the width attributes of ``module`` (after its tensors were sliced)."""
        out_attr, in_attr = self.width_attrs
        setattr(module, out_attr, int(out_width))
        if in_attr != out_attr:
            setattr(module, in_attr, int(in_width))


def _per_example(out: torch.Tensor) -> int:
    return out[0].numel() if out.dim() > 1 else out.numel()


def _linear_macs(layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    per_example = _per_example(out)
    return per_example * layer.in_features + (per_example if layer.bias is not None else 0)


def _conv_macs(layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    per_example = _per_example(out)
    macs = per_example * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
    return macs + (per_example if layer.bias is not None else 0)


def _norm_macs(layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    return _per_example(out)  # one fused multiply-add per element at inference


def _linear_forward(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    return F.linear(x, w, b)


def _conv_forward(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    return layer._conv_forward(x, w, b)


_CONV_HYPERPARAMETERS = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")

_SPECS: dict[type[nn.Module], LayerSpec] = {
    nn.Linear: LayerSpec(0, 1, ("out_features", "in_features"), _linear_macs, _linear_forward),
    **{
        t: LayerSpec(
            0,
            1,
            ("out_channels", "in_channels"),
            _conv_macs,
            _conv_forward,
            spatial_dims=k,
            hyperparameters=_CONV_HYPERPARAMETERS,
        )
        for k, t in enumerate(CONV_TYPES, start=1)
    },
    **{
        t: LayerSpec(0, 0, ("num_features", "num_features"), _norm_macs, norm=True, spatial_dims=k)
        for k, t in enumerate(NORM_TYPES, start=1)
    },
}
_BUILT_IN = frozenset(_SPECS)
#: registered type -> the family (a key of _SPECS) it computes like
_FAMILY: dict[type[nn.Module], type[nn.Module]] = {t: t for t in _SPECS}


def register_layer(
    cls: type[nn.Module],
    spec: LayerSpec | None = None,
    *,
    like: type[nn.Module] | None = None,
) -> None:
    """Teach bayesprune a layer type: a new family (``spec``) or a subclass of a known one (``like``).

    ``register_layer(cls, spec)``: ``cls`` is a new layer family described by ``spec`` (a
    :class:`LayerSpec`). ``register_layer(cls, like=base)``: ``cls`` subclasses ``base`` (a
    built-in or registered family) and keeps its function of the same parameters (``weight``,
    ``bias``, the same hyperparameters): a different initialisation, extra buffers or methods are
    fine; a different ``forward`` is not, since the Bayesian twin and the pruner compute
    ``base``'s function. The pruner's exactness check runs on every prune. Registering a class
    again the same way does nothing.

    Raises
    ------
    TypeError
        Neither or both of ``spec`` and ``like``; ``spec`` is not a :class:`LayerSpec`; ``cls``
        is not a subclass of ``like``, or ``like`` is not a known family.
    ValueError
        ``cls`` is already registered otherwise, is a built-in family, or ``spec`` is a
        normalisation.
    """
    name = getattr(cls, "__name__", repr(cls))
    if (spec is None) == (like is None):
        raise TypeError(
            f"register_layer({name}, ...) needs exactly one of a LayerSpec (a new kind of layer: "
            f"register_layer({name}, bp.LayerSpec(...))) or like= (a subclass computing what its "
            f"base computes: register_layer({name}, like=nn.Linear))"
        )
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_layer needs an nn.Module subclass, got {cls!r}")
    if like is not None:
        if like not in _SPECS:
            known = [t.__name__ for t in _SPECS]
            raise TypeError(
                f"like= must be one of the layer types bayesprune knows {known}, got {like!r}"
            )
        if not issubclass(cls, like):
            raise TypeError(
                f"register_layer({name!r}, like={like.__name__}) needs a subclass of "
                f"{like.__name__}; a layer of another kind needs its own pruning rules: "
                f"register_layer({name}, bp.LayerSpec(...))"
            )
        family = like
    else:
        if not isinstance(spec, LayerSpec):
            raise TypeError(
                f"register_layer({name}, spec) needs a bayesprune.LayerSpec, got "
                f"{type(spec).__name__}"
            )
        if spec.norm:
            raise ValueError(
                "register_layer does not take new normalisation families; register a BatchNorm "
                f"subclass with register_layer({name}, like=nn.BatchNorm2d)"
            )
        if cls in _BUILT_IN:
            raise ValueError(f"{name} is built in; its LayerSpec cannot be replaced")
        if _SPECS.get(cls, spec) != spec:
            raise ValueError(
                f"{name} is already registered with another LayerSpec ({_SPECS[cls]}); a layer "
                "type has one spec: register a subclass for a different one"
            )
        family = cls
    known = _FAMILY.get(cls)
    if known is not None and known is not family:
        how = f"like {known.__name__}" if known is not cls else "with a LayerSpec of its own"
        fix = "its own LayerSpec" if like is None else f"like={family.__name__}"
        raise ValueError(
            f"{name} is already registered {how}; it cannot also be registered with {fix} "
            "(register a subclass instead)"
        )
    if spec is not None:
        _SPECS[cls] = spec
    _FAMILY[cls] = family


def layer_family(module: nn.Module | type[nn.Module]) -> type[nn.Module] | None:
    """The known layer type that ``module`` (or a type) computes like, or ``None``.

    Exact types only: a subclass counts once it is registered (:func:`register_layer`).
    """
    cls = module if isinstance(module, type) else type(module)
    return _FAMILY.get(cls)


def layer_spec(module: nn.Module | type[nn.Module]) -> LayerSpec | None:
    """The :class:`LayerSpec` of ``module`` (or a type), or ``None`` for a layer bayesprune does
    not know. Like ``isinstance``: the nearest registered class in the type's hierarchy counts."""
    cls = module if isinstance(module, type) else type(module)
    for t in cls.__mro__:
        family = _FAMILY.get(t)
        if family is not None:
            return _SPECS[family]
    return None


def has_nodes(module: nn.Module | type[nn.Module]) -> bool:
    """Whether ``module`` is a layer with nodes (a Linear, a convolution or a registered family)."""
    spec = layer_spec(module)
    return spec is not None and not spec.norm


def registered_layers() -> dict[type[nn.Module], type[nn.Module]]:
    """A copy of the registry: layer type -> the family it computes like (itself for a family)."""
    return dict(_FAMILY)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with registered layers as leaves: fx keeps only ``torch.nn``'s own
    modules whole, so a user's registered subclass would otherwise dissolve into the functions
    its forward calls, and the pruner would not see a layer there."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if layer_family(m) is not None or block_spec(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(module)``, keeping registered layers (:func:`register_layer`) as
    single ``call_module`` nodes. Every trace of the package goes through this."""
    tracer = _Tracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


# -- blocks: modules whose inside the pruner knows without tracing it ---------------------------
@dataclass(frozen=True)
class InternalGroup:
    """Nodes produced and consumed inside a block (or inside a layer with :class:`NodeGroups`).

    Attributes
    ----------
    producer
        Path, relative to the block, of the layer whose nodes these are (``""``: the layer itself).
    width
        Number of nodes.
    consumers
        Relative paths of the layers that read them, and nothing else does (sliced along their
        input axis with the producer).
    frozen
        Why they must be kept whole, or ``None``.
    """

    producer: str
    width: int
    consumers: tuple[str, ...] = ()
    frozen: str | None = None

    def under(self, prefix: str) -> InternalGroup:
        """The same group, its paths relative to the module ``prefix`` levels up."""

        def join(p: str) -> str:
            return f"{prefix}.{p}" if prefix and p else prefix or p

        return replace(
            self, producer=join(self.producer), consumers=tuple(join(c) for c in self.consumers)
        )


@dataclass(frozen=True)
class BlockSpec:
    """A container whose forward the package knows (e.g. ``nn.TransformerEncoderLayer``, whose
    own forward has a fused fast path with control flow that ``torch.fx`` cannot trace).

    A registered block is one opaque node of every trace (its input and output widths are kept
    whole); what the pruner may remove inside it is listed by ``groups``. Layers with
    :class:`NodeGroups` and registered blocks nested in it are found by :func:`internal_groups`
    on their own.

    Attributes
    ----------
    groups
        ``groups(block) -> list[InternalGroup]``: the block's own internal node groups.
    prepare
        ``prepare(block)``, optional: called after the package replaced layers inside the block
        (the Bayesian twins of :func:`bayesprune.bayesianize`, the pruned layers of
        :func:`bayesprune.prune`), to turn off fused paths that read the original layers' tensors.
    """

    groups: Callable[[nn.Module], list[InternalGroup]]
    prepare: Callable[[nn.Module], None] | None = None


_BLOCKS: dict[type[nn.Module] | str, BlockSpec] = {}


def register_block(cls: type[nn.Module] | str, spec: BlockSpec) -> None:
    """Register a container type whose inside the pruner knows (exact type, see :class:`BlockSpec`).

    ``cls`` may also be the dotted name of a class (``"package.module.Class"``), matched against
    ``f"{type.__module__}.{type.__qualname__}"``: a block of another library is then registered
    without importing it (torchvision's ``EncoderBlock``, :mod:`bayesprune.pruning.transformer`).
    """
    if isinstance(cls, str):
        name = cls
    elif isinstance(cls, type) and issubclass(cls, nn.Module):
        name = cls.__name__
    else:
        raise TypeError(f"register_block needs an nn.Module subclass, got {cls!r}")
    if not isinstance(spec, BlockSpec):
        raise TypeError(f"register_block({name}, spec) needs a BlockSpec, got {spec!r}")
    if _BLOCKS.get(cls, spec) != spec:
        raise ValueError(f"{name} is already registered with another BlockSpec")
    _BLOCKS[cls] = spec


def block_spec(module: nn.Module | type[nn.Module]) -> BlockSpec | None:
    """The :class:`BlockSpec` of ``module``'s exact type (or of its dotted name), or ``None``."""
    cls = module if isinstance(module, type) else type(module)
    spec = _BLOCKS.get(cls)
    return spec if spec is not None else _BLOCKS.get(f"{cls.__module__}.{cls.__qualname__}")


def internal_groups(module: nn.Module) -> list[InternalGroup] | None:
    """The internal node groups of a registered block (its own, and those of the blocks and
    :class:`NodeGroups` layers inside it, paths relative to ``module``) or of a layer with
    :class:`NodeGroups` (one group, producer ``""``); ``None`` for any other module."""
    spec = layer_spec(module)
    if spec is not None and spec.nodes is not None:
        width = spec.widths(module)[0]
        return [InternalGroup("", width, (), spec.nodes.problem(module))]
    block = block_spec(module)
    if block is None:
        return None
    out = list(block.groups(module))

    def nested(m: nn.Module, prefix: str) -> None:
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            inner = internal_groups(child)
            if inner is not None:
                out.extend(g.under(path) for g in inner)
            else:
                nested(child, path)

    nested(module, "")
    return out


def prepare_blocks(module: nn.Module) -> None:
    """Call the ``prepare`` of every registered block in ``module`` (see :class:`BlockSpec`)."""
    for m in module.modules():
        spec = block_spec(m)
        if spec is not None and spec.prepare is not None:
            spec.prepare(m)


@contextlib.contextmanager
def fused_paths_off() -> Iterator[None]:
    """Turn off PyTorch's fused transformer fast paths for a while (``torch.backends.mha``): they
    compute a whole ``nn.TransformerEncoderLayer`` in one kernel, so the layers inside it are not
    called as modules, and the forward hooks of :func:`bayesprune.count_flops` would miss them."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # pragma: no cover - old torch
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)
