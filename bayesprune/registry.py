"""The layer types bayesprune knows, written once, and :func:`register_layer` for your own.

Every part of the package asks this module which layer types it handles: the pruner (which
layers have nodes, which are BatchNorms), the metrics (which layers count MACs),
:func:`bayesprune.bayesianize` (which layers get a Bayesian twin, through
:func:`layer_family`) and the baselines.

========================  ============================================================
family                    node (what pruning removes)
========================  ============================================================
``nn.Linear``             output feature (weight row)
``nn.Conv1d/2d/3d``       output channel (filter); Conv3d is pruned and counted but has no
                          Bayesian twin yet
``nn.BatchNorm1d/2d/3d``  the channel of the layer it follows (not a node of its own)
========================  ============================================================

A subclass of one of these (your ``nn.Linear`` with a custom ``__init__`` or extra buffers) is
not assumed to compute what its base computes, so :func:`bayesprune.bayesianize` leaves it
deterministic. :func:`register_layer` declares that it does: it then gets its base's Bayesian
twin and is treated as its base everywhere.

Example
-------
>>> import torch
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
"""

from __future__ import annotations

from torch import fx, nn

__all__ = [
    "CONV_TYPES",
    "LAYER_TYPES",
    "NORM_TYPES",
    "layer_family",
    "register_layer",
    "registered_layers",
    "symbolic_trace",
]

#: layers with nodes: Linear (output features) and convolutions (output channels)
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: the convolutions among them
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: BatchNorms: per-channel, pruned with the layer that feeds them
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_FAMILY: dict[type[nn.Module], type[nn.Module]] = {t: t for t in LAYER_TYPES + NORM_TYPES}


def register_layer(cls: type[nn.Module], *, like: type[nn.Module]) -> None:
    """Declare that layers of type ``cls`` compute what layers of type ``like`` compute.

    ``cls`` must subclass ``like`` (one of :data:`LAYER_TYPES` or :data:`NORM_TYPES`) and keep its
    function of the same parameters (``weight``, ``bias``, the same hyperparameters): a different
    initialisation, extra buffers or methods are fine; a different ``forward`` is not, since the
    Bayesian twin and the pruner compute ``like``'s function. The pruner's exactness check still
    runs on every prune. Registering a class again with the same ``like`` does nothing.

    Raises
    ------
    TypeError
        ``cls`` is not a subclass of ``like``, or ``like`` is not a known family.
    ValueError
        ``cls`` is already registered with another family.
    """
    if like not in LAYER_TYPES + NORM_TYPES:
        raise TypeError(
            f"like= must be one of the layer types bayesprune knows "
            f"{[t.__name__ for t in LAYER_TYPES + NORM_TYPES]}, got {like!r}"
        )
    if not (isinstance(cls, type) and issubclass(cls, like)):
        raise TypeError(
            f"register_layer({getattr(cls, '__name__', cls)!r}, like={like.__name__}) needs a "
            f"subclass of {like.__name__}; a layer of another kind needs its own pruning rules"
        )
    known = _FAMILY.get(cls)
    if known is not None and known is not like:
        raise ValueError(f"{cls.__name__} is already registered like {known.__name__}")
    _FAMILY[cls] = like


def layer_family(module: nn.Module | type[nn.Module]) -> type[nn.Module] | None:
    """The known layer type that ``module`` (or a type) computes like, or ``None``.

    Exact types only: a subclass counts once it is registered (:func:`register_layer`).
    """
    cls = module if isinstance(module, type) else type(module)
    return _FAMILY.get(cls)


def registered_layers() -> dict[type[nn.Module], type[nn.Module]]:
    """A copy of the registry: layer type -> the family it computes like."""
    return dict(_FAMILY)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with registered layers as leaves: fx keeps only ``torch.nn``'s own
    modules whole, so a user's registered subclass would otherwise dissolve into the functions
    its forward calls, and the pruner would not see a layer there."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return layer_family(m) is not None or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(module)``, keeping registered layers (:func:`register_layer`) as
    single ``call_module`` nodes. Every trace of the package goes through this."""
    tracer = _Tracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)
