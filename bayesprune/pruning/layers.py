"""What the pruner knows about layer types: which layers have nodes, their widths and geometry,
and the two modules that surgery puts in place of a removed layer (:class:`RemovedLayer`,
:class:`ConstantLayer`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import CONV_TYPES, LAYER_TYPES, NORM_TYPES, layer_spec

__all__ = [
    "CONV_TYPES",
    "LAYER_TYPES",
    "NORM_TYPES",
    "REPLACED_TYPES",
    "ConstantLayer",
    "RemovedLayer",
    "check_layout",
    "conv_config",
    "geometry",
    "layer_widths",
    "node_axis",
    "node_rows",
    "replaceable",
    "set_tensor",
    "slice_tensors",
    "to_module_device",
]


# the layer types, written once in bayesprune.registry: everything below asks it (layer_spec)


def replaceable(layer: nn.Module) -> bool:
    """Whether :class:`RemovedLayer` / :class:`ConstantLayer` can stand in for ``layer``: they
    know the output positions of the built-in Linear and convolutions only."""
    return isinstance(layer, LAYER_TYPES)


def node_axis(layer: nn.Module) -> int:
    """The axis of ``layer.weight`` indexing its output nodes (0 for Linear and convolutions)."""
    return layer_spec(layer).node_axis


def node_rows(layer: nn.Module) -> torch.Tensor:
    """``[nodes, ...]``: each output node's parameters (its weight row / filter, or the slices of a
    layer with :class:`~bayesprune.registry.NodeGroups`, e.g. an attention head)."""
    spec = layer_spec(layer)
    if spec.nodes is not None:
        return spec.nodes.rows(layer)
    return layer.weight.detach().movedim(spec.node_axis, 0).flatten(1)


def to_module_device(example_input: Any, module: nn.Module) -> Any:
    """Tracing runs the network once, so its input must live where its weights do."""
    param = next(module.parameters(), None)
    if param is None:
        return example_input
    if torch.is_tensor(example_input):
        return example_input.to(param.device)
    if isinstance(example_input, tuple):
        return tuple(x.to(param.device) if torch.is_tensor(x) else x for x in example_input)
    return example_input


def check_layout(name: str, layer: nn.Module) -> None:
    """A ``ValueError`` when a registered layer's tensors do not have the layout its
    :class:`~bayesprune.registry.LayerSpec` declares (one output node per index of the node
    axis and per bias entry, one input per index of the input axis)."""
    spec = layer_spec(layer)
    if spec is None or spec.norm or spec.nodes is not None or isinstance(layer, LAYER_TYPES):
        return
    out_w, in_w = spec.widths(layer)
    w, b = getattr(layer, "weight", None), getattr(layer, "bias", None)
    shape = None if w is None else tuple(w.shape)
    problem = None
    if w is None or w.dim() <= max(spec.node_axis, spec.input_axis):
        problem = f"its weight has shape {shape}"
    elif shape[spec.node_axis] != out_w:
        problem = (
            f"its weight {shape} has {shape[spec.node_axis]} entries along node_axis="
            f"{spec.node_axis}, not its {out_w} output nodes ({spec.width_attrs[0]})"
        )
    elif shape[spec.input_axis] != in_w and getattr(layer, "groups", 1) == 1:
        problem = (
            f"its weight {shape} has {shape[spec.input_axis]} entries along input_axis="
            f"{spec.input_axis}, not its {in_w} inputs ({spec.width_attrs[1]})"
        )
    elif b is not None and tuple(b.shape) != (out_w,):
        problem = f"its bias has shape {tuple(b.shape)}, not ({out_w},)"
    if problem is not None:
        raise ValueError(
            f"layer {name!r} ({type(layer).__name__}) does not fit its registered LayerSpec: "
            f"{problem}. Fix the spec's node_axis / input_axis / width_attrs "
            "(bp.register_layer)"
        )


def geometry(layer: nn.Module) -> tuple[tuple[int, int, int, int], ...] | None:
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
        self.geometry = geometry(layer)

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
        self.geometry = geometry(layer)
        self.value = nn.Parameter(value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = _positions(x, self.geometry)
        if self.geometry is None:
            return pos + self.value
        return pos + self.value.view(-1, *([1] * len(self.geometry)))

    def extra_repr(self) -> str:
        return f"{self.kind}, 0 -> {self.value.numel()}"


REPLACED_TYPES = (RemovedLayer, ConstantLayer)


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    elif old is None and name in module._parameters:  # an empty slot, e.g. a bias=False conv
        setattr(module, name, nn.Parameter(value))
    else:
        setattr(module, name, value)


@torch.no_grad()
def slice_tensors(module: nn.Module, names: Iterable[str], idx: torch.Tensor, dim: int) -> None:
    for n in names:
        t = getattr(module, n, None)
        if t is not None:
            set_tensor(module, n, t.index_select(dim, idx.to(t.device)).clone())


def layer_widths(m: nn.Module) -> tuple[int, int]:
    """(output width, input width) of a counted layer."""
    if isinstance(m, RemovedLayer):
        return 0, m.in_width
    if isinstance(m, ConstantLayer):
        return m.value.numel(), 0
    return layer_spec(m).widths(m)


def conv_config(m: nn.Module) -> dict[str, Any]:
    """What a layer computes besides its widths (its spec's ``hyperparameters``: kernel, stride,
    ... of a convolution; empty for Linear and BatchNorm), JSON-able."""
    spec = layer_spec(m)
    keys = () if spec is None else spec.hyperparameters
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(m, k)) for k in keys)
    }
