"""Surgery: zero the masked nodes (:func:`zero_masked`, the reference of the exactness contract),
slice the layers to a physically smaller network, and check that it computes exactly the zeroed one."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._utils import modes_kept
from ..registry import fused_paths_off, layer_spec, prepare_blocks
from .graph import bn_followers, rng_kept
from .layers import ConstantLayer, RemovedLayer, layer_widths, node_axis, slice_tensors
from .plan import PruningPlan, check_masks, prunable_layers

__all__ = [
    "apply_plan",
    "check_exact",
    "zero_in_place",
    "zero_masked",
]


@torch.no_grad()
def zero_in_place(
    module: nn.Module, masks: Mapping[str, torch.Tensor], followers: Mapping[str, set[str]]
) -> None:
    for name, m in masks.items():
        drop = ~m
        if not drop.any():
            continue
        layer = module.get_submodule(name)
        nodes = layer_spec(layer).nodes
        if nodes is not None:  # attention heads: slices of several tensors
            nodes.zero(layer, drop)
            continue
        # a view with the nodes first: the rows of a Linear / Conv, axis 1 of a ConvTranspose
        layer.weight.movedim(node_axis(layer), 0)[drop.to(layer.weight.device)] = 0
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
    >>> from bayesprune.pruning import zero_masked
    >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> zero_masked(net, {"0": torch.tensor([True, False])})[0].weight[1].abs().sum().item()
    0.0
    """
    out = copy.deepcopy(module)
    checked = check_masks(prunable_layers(out), masks)
    zero_in_place(out, checked, bn_followers(out))
    return out


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


def apply_plan(
    module: nn.Module, plan: PruningPlan, followers: dict[str, set[str]] | None = None
) -> nn.Module:
    """A sliced copy of ``module``; ``followers`` (:func:`bn_followers`) saves tracing it."""
    small = copy.deepcopy(module)
    zero_in_place(small, plan.masks, bn_followers(small) if followers is None else followers)
    for g in plan.groups:
        if bool(g.keep.all()):
            continue
        idx = g.keep.nonzero().flatten()
        for p in g.producers:
            layer = small.get_submodule(p)
            spec = layer_spec(layer)
            if spec.nodes is not None:  # e.g. nn.MultiheadAttention -> PrunedMultiheadAttention
                small.set_submodule(p, spec.nodes.select(layer, idx))
                continue
            slice_tensors(layer, ("weight",), idx, spec.node_axis)
            slice_tensors(layer, ("bias",), idx, 0)
            spec.resize(layer, len(idx), spec.widths(layer)[1])
    for p, segments in plan.inputs.items():
        cols = _kept_columns(plan, segments)
        if cols is None:
            continue
        layer = small.get_submodule(p)
        spec = layer_spec(layer)
        slice_tensors(layer, ("weight",), cols, spec.input_axis)
        # convolutions read whole channels (repeat 1), a Linear after a flatten reads columns
        spec.resize(layer, spec.widths(layer)[0], len(cols))
    for p, segments in plan.norm_inputs.items():
        cols = _kept_columns(plan, segments)
        if cols is not None:
            bn = small.get_submodule(p)
            slice_tensors(bn, ("weight", "bias", "running_mean", "running_var"), cols, 0)
            bn.num_features = len(cols)
    _replace_branches(small, plan)
    prepare_blocks(small)
    return small


@torch.no_grad()
def _replace_branches(small: nn.Module, plan: PruningPlan) -> None:
    """Swap emptied layers for :class:`RemovedLayer` and the layers they fed for constants."""
    for p, norms in plan.removed.items():
        layer = small.get_submodule(p)
        small.set_submodule(p, RemovedLayer(layer, layer_widths(layer)[1], norms))
        for bn in norms:
            small.set_submodule(bn, nn.Identity())
    for c, norms in plan.constant.items():
        layer = small.get_submodule(c)
        w = layer.weight
        value = layer.bias if layer.bias is not None else w.new_zeros(layer_widths(layer)[0])
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
            with torch.no_grad(), rng_kept(probe):
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


def check_exact(dense: nn.Module, small: nn.Module, example_input: Any) -> None:
    """Guard against silent errors: the pruned net must compute the zeroed net's function."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    gen = torch.Generator().manual_seed(0)
    probe = tuple(
        torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        if torch.is_tensor(x) and x.is_floating_point()
        else x
        for x in inputs
    )
    with modes_kept(dense), modes_kept(small):
        dense.eval(), small.eval()
        # PyTorch's fused transformer paths compute padded positions differently (as zeros)
        with torch.no_grad(), fused_paths_off():
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
