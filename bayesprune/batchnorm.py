r"""BatchNorm after pruning: re-estimate its statistics, then fold it into the layer before it.

Two steps between a pruned network and its deployment:

* :func:`recalibrate_batchnorm` re-estimates the running statistics that pruning made stale (the
  activations a BatchNorm saw during training are not those of the smaller network);
* :func:`fold_batchnorm` removes every BatchNorm that directly follows a convolution or Linear
  layer by folding it into that layer's weight and bias (eval mode),

  .. math:: W' = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}\, W, \qquad
            b' = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}\,(b - \mu) + \beta,

  per output channel, so inference runs one operation where it ran two. Folding is exact in eval
  mode; it is the last step, after fine-tuning (the folded network has no BatchNorm left to train).

Example
-------
>>> import torch
>>> from torch import nn
>>> from bayesprune.batchnorm import fold_batchnorm
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
>>> x = torch.randn(2, 1, 6, 6)
>>> folded = fold_batchnorm(net, example_input=x)
>>> type(folded[1]).__name__, torch.allclose(folded(x), net(x), atol=1e-6)
('Identity', True)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_eval

from ._utils import resolve_device
from .data import input_errors, input_tensor
from .registry import CONV_TYPES, LAYER_TYPES, has_nodes, layer_spec, symbolic_trace

__all__ = ["fold_batchnorm", "recalibrate_batchnorm"]

_BatchNorm = nn.modules.batchnorm._BatchNorm
# the layouts a BatchNorm of each kind can be folded into (its channel axis is theirs): the
# spatial_dims of the layer's LayerSpec (0: [batch, features], like a Linear)
_FOLDS_INTO: dict[type, tuple[int, ...]] = {
    nn.BatchNorm1d: (0, 1),
    nn.BatchNorm2d: (2,),
    nn.BatchNorm3d: (3,),
}


def _folds_into(layer: nn.Module | None, bn: nn.Module) -> bool:
    if not has_nodes(layer) or layer_spec(layer).spatial_dims not in _FOLDS_INTO.get(type(bn), ()):
        return False
    # a registered family is folded along its node axis: one entry there per channel (no groups)
    spec = layer_spec(layer)
    return isinstance(layer, LAYER_TYPES) or layer.weight.shape[spec.node_axis] == bn.num_features


def _fuse(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """``layer`` with ``bn`` (eval mode) folded in: torch's fusions for Linear and convolutions,
    the same per-node scaling along the registered node axis for another layer family."""
    if isinstance(layer, nn.Linear):
        return fuse_linear_bn_eval(layer, bn)
    if isinstance(layer, CONV_TYPES):
        return fuse_conv_bn_eval(layer, bn)
    axis = layer_spec(layer).node_axis
    fused = copy.deepcopy(layer)
    bias = layer.bias if layer.bias is not None else bn.running_mean.new_zeros(bn.num_features)
    weight, bias = fuse_conv_bn_weights(
        layer.weight.movedim(axis, 0),
        bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
    )
    fused.weight = nn.Parameter(
        weight.detach().movedim(0, axis).contiguous(), layer.weight.requires_grad
    )
    fused.bias = nn.Parameter(bias.detach(), layer.weight.requires_grad)
    return fused


def _norms(net: nn.Module, what: str) -> dict[str, nn.Module]:
    norms = {n: m for n, m in net.named_modules() if isinstance(m, _BatchNorm)}
    if not norms:
        raise ValueError(
            f"{type(net).__name__} has no BatchNorm layer, so there is nothing to {what}"
        )
    untracked = [n for n, m in norms.items() if not m.track_running_stats]
    if untracked:
        raise ValueError(
            f"BatchNorm {untracked[0]!r} of {type(net).__name__} has track_running_stats=False: it "
            f"normalises with batch statistics in eval mode, so there is nothing to {what}"
        )
    return norms


def recalibrate_batchnorm(
    net: nn.Module,
    loader: Iterable,
    *,
    num_batches: int = 100,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> nn.Module:
    r"""Re-estimate every BatchNorm's running mean and variance on training data, in place.

    A pruned network inherits running statistics that were collected while the (Bayesian or
    dense) network it came from was trained; once nodes are gone and weights are posterior means,
    the activations they describe have moved and the network can fall far below its potential
    accuracy. Recalibration (as in Yu and Huang's slimmable networks) resets the statistics and
    recomputes them as the cumulative average over ``num_batches`` batches,

    .. math:: \hat\mu = \frac1B \sum_{b=1}^{B} \bar x_b, \qquad
              \hat\sigma^2 = \frac1B \sum_{b=1}^{B} s_b^2,

    with :math:`\bar x_b` and :math:`s_b^2` the per-channel mean and unbiased variance of batch
    :math:`b` (``momentum=None`` in torch). No weight changes and no gradient is taken; other
    layers (dropout) stay in eval mode. The network is left in eval mode.

    It does not always help: it lowered the test accuracy of some pruned ResNet-20s before
    fine-tuning and raised others' (``docs/notes/benchmark-history.md``, the ResNet-20 compression
    runs), so compare the network before and after on validation data.

    Parameters
    ----------
    net
        Any module with at least one BatchNorm layer (e.g. the output of :func:`bayesprune.prune`).
    loader
        Training batches, ``(inputs, targets)`` or inputs alone.
    num_batches
        How many batches to average over (fewer if the loader ends first).
    device
        Where to run; defaults to the device of the network's parameters.
    progress
        Show a tqdm progress bar.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> from bayesprune.batchnorm import recalibrate_batchnorm
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    >>> batches = [(torch.randn(8, 1, 6, 6) + 3, None) for _ in range(4)]
    >>> _ = recalibrate_batchnorm(net, batches, progress=False)
    >>> bool(net[1].num_batches_tracked == 4), net.training
    (True, False)
    """
    from tqdm.auto import tqdm

    norms = list(_norms(net, "recalibrate").values())
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    if device is None:
        first = next(net.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = resolve_device(device)
    net.to(device).eval()
    momenta = [m.momentum for m in norms]
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in norms
    ]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
        m.train()
    seen, done = 0, False
    try:
        with torch.no_grad():
            bar = tqdm(total=num_batches, desc="recalibrate BN", disable=not progress, leave=False)
            for batch in loader:
                if seen == num_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
                if not torch.is_tensor(x):
                    raise TypeError(
                        "loader must yield input tensors or (inputs, labels) pairs of tensors; "
                        f"got {'inputs of type ' if x is not batch else 'a '}"
                        f"{type(x).__name__}. Convert arrays with torch.from_numpy(x).float() "
                        "(or wrap them in a TensorDataset)"
                    )
                with input_errors(type(net).__name__, "a loader batch", tuple(x.shape)):
                    net(x.to(device))
                seen += 1
                bar.update()
            bar.close()
        if seen == 0:
            raise ValueError("the loader yielded no batch; pass the training loader")
        done = True
    finally:
        for m, momentum, stats in zip(norms, momenta, saved, strict=True):
            m.momentum = momentum
            if not done:  # a failed call leaves the statistics it found
                m.running_mean.copy_(stats[0])
                m.running_var.copy_(stats[1])
                m.num_batches_tracked.copy_(stats[2])
        net.eval()
    return net


def fold_batchnorm(
    net: nn.Module,
    *,
    example_input: Any = None,
    inplace: bool = False,
    atol: float = 1e-4,
) -> nn.Module:
    r"""Fold each BatchNorm into the Conv or Linear layer that feeds it, for inference.

    A BatchNorm ``bn`` is folded into layer ``f`` when, in the :mod:`torch.fx` graph of ``net``,
    ``bn`` is applied to the output of ``f`` and to nothing else, that output goes nowhere else,
    and each of the two modules is called once. Then, in eval mode,
    :math:`\mathrm{bn}(f(x)) = f'(x)` with the rescaled weight and shifted bias of the module
    docstring (torch's ``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``), ``f`` becomes
    :math:`f'` (it gains a bias if it had none) and ``bn`` becomes ``nn.Identity``, so module
    paths are unchanged. Other BatchNorms (one after a ReLU or an addition, as in pre-activation
    ResNets) stay, and a warning names them.

    Parameters
    ----------
    net
        A ``torch.fx``-traceable network with BatchNorm layers (e.g. the output of
        :func:`bayesprune.prune` after fine-tuning).
    example_input
        One input batch. With it, a BatchNorm1d after a Linear is folded too (only when the
        Linear's output is ``[batch, features]``, which the shapes of this batch show), and the
        folded network is checked against ``net`` on it (max absolute difference at most
        ``atol * (1 + max |output|)``).
    inplace
        Modify ``net`` instead of a deep copy.

    Returns
    -------
    nn.Module
        The folded network, in eval mode.

    Example
    -------
    >>> import torch
    >>> from bayesprune.batchnorm import fold_batchnorm
    >>> from bayesprune.models import resnet20
    >>> net = resnet20().eval()
    >>> small = fold_batchnorm(net, example_input=torch.randn(2, 1, 28, 28))
    >>> sum(isinstance(m, torch.nn.BatchNorm2d) for m in small.modules())
    0
    """
    _norms(net, "fold")
    out = net if inplace else copy.deepcopy(net)
    out.eval()
    try:
        gm = symbolic_trace(out)
    except Exception as exc:
        raise ValueError(
            f"fold_batchnorm traces {type(net).__name__} with torch.fx and could not ({exc}); "
            "make its forward traceable (no data-dependent control flow)"
        ) from exc
    if example_input is not None:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        input_tensor(args[0], "example_input is")
        fix = "one input batch of the shape the network expects"
        with torch.no_grad(), input_errors(type(net).__name__, "example_input", args[0].shape, fix):
            reference = out(*args)
        ShapeProp(gm).propagate(*args)
    modules = dict(out.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    left = []
    for node in gm.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm):
            continue
        prev = node.args[0] if node.args else None
        layer = (
            modules.get(prev.target)
            if isinstance(prev, fx.Node) and prev.op == "call_module"
            else None
        )
        ok = (
            _folds_into(layer, bn)
            and len(prev.users) == 1
            and len(node.args) == 1
            and calls[prev.target] == 1
            and calls[node.target] == 1
        )
        if ok and layer_spec(layer).spatial_dims == 0:
            meta = prev.meta.get("tensor_meta")
            ok = meta is not None and len(meta.shape) == 2
        if not ok:
            left.append(node.target)
            continue
        out.set_submodule(prev.target, _fuse(layer, bn))
        out.set_submodule(node.target, nn.Identity())
    if left:
        hint = "" if example_input is not None else " (pass example_input= to fold Linear pairs)"
        names = ", ".join(repr(n) for n in left[:5]) + (
            f" and {len(left) - 5} more" * (len(left) > 5)
        )
        warnings.warn(
            f"fold_batchnorm: {len(left)} BatchNorm layer(s) do not directly follow a Conv/Linear "
            f"whose output only they use, and stay: {names}{hint}",
            stacklevel=2,
        )
    if example_input is not None:
        with torch.no_grad():
            pairs = zip(_tensors(reference), _tensors(out(*args)), strict=True)
            for before, after in pairs:
                diff = float((after - before).abs().max())
                # float32 rounding grows with the output's scale
                if diff > atol * (1.0 + float(before.abs().max())):
                    raise RuntimeError(
                        f"fold_batchnorm: the folded network differs from the original by "
                        f"{diff:.3g} on example_input (tolerance atol={atol:g} times "
                        "1 + max |output|); this is a bug, please report it"
                    )
    return out


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a network output (a tensor, or a tuple / list / dict of tensors)."""
    if torch.is_tensor(output):
        return [output]
    items = output.values() if isinstance(output, dict) else output
    if isinstance(items, (tuple, list, type({}.values()))) and all(
        torch.is_tensor(t) for t in items
    ):
        return list(items)
    raise TypeError(
        f"fold_batchnorm checks the folded network on example_input but cannot compare an output "
        f"of type {type(output).__name__}; pass example_input=None to skip the check"
    )
