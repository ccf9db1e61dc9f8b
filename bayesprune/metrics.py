"""Size and speed of a network: parameters, FLOPs and wall-clock latency.

FLOPs are counted as multiply-accumulate operations (MACs) per input example, the convention of the
pruning literature (e.g. "158K FLOPs" for a pruned LeNet-5). Counted layers:

========================  ============================================================
layer                     MACs per example
========================  ============================================================
``nn.Linear``             ``in * out`` (+ ``out`` for the bias)
``nn.Conv1d/2d/3d``       ``out_elements * in_channels / groups * prod(kernel)``
                          (+ ``out_elements`` for the bias)
``nn.BatchNorm1d/2d/3d``  ``elements`` (one fused multiply-add per element at inference)
``nn.MultiheadAttention`` self-attention on ``L`` positions, ``E`` wide, ``D = heads *
                          head_dim``: ``3*L*E*D + L*D*E`` (projections) + ``2*L*L*D``
                          (``QK^T`` and ``AV``) (+ ``3*L*D + L*E`` for the biases); the same
                          for :class:`bayesprune.PrunedMultiheadAttention`
========================  ============================================================

The counted types are :mod:`bayesprune.registry`'s: the built-in ones above, their subclasses, and
every layer family registered with a :class:`~bayesprune.registry.LayerSpec` (its ``macs``).

Activations, softmax, pooling, additions and LayerNorm are not counted (they are cheap and the same before and
after pruning up to the width change).

Example
-------
>>> import torch
>>> from torch import nn
>>> from bayesprune.metrics import count_flops, count_params
>>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False))
>>> count_params(net), count_flops(net, torch.zeros(1, 4))
(21, 21)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ._utils import modes_kept, resolve_device
from .data import input_errors, input_tensor
from .registry import fused_paths_off, layer_spec

__all__ = ["count_flops", "count_nonzero", "count_params", "flops_by_layer", "measure_latency"]


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_nonzero(module: nn.Module) -> int:
    """Number of non-zero parameter elements: the size of an unstructured (masked) pruning result."""
    return sum(int(torch.count_nonzero(p.detach())) for p in module.parameters())


def flops_by_layer(module: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs per example of each counted layer, keyed by module name, from one forward pass.

    ``example_input`` is one batch (its batch size does not matter). The module is run in eval mode
    without gradients and restored to its previous mode.
    """
    return macs_by_layer(module, example_input, type(module).__name__)


def macs_by_layer(module: nn.Module, example_input: torch.Tensor, what: str) -> dict[str, int]:
    """:func:`flops_by_layer`, with ``what`` naming the module in a wrong-input error."""
    input_tensor(example_input, "example_input is")
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(name: str) -> Callable:
        spec = layer_spec(module.get_submodule(name))

        def hook(layer: nn.Module, inp, out) -> None:
            x = inp[0] if isinstance(inp, tuple) and inp else inp
            counts[name] = counts.get(name, 0) + int(spec.macs(layer, x, out))

        return hook

    for name, layer in module.named_modules():
        if layer_spec(layer) is not None:
            hooks.append(layer.register_forward_hook(make_hook(name)))
    try:
        with (
            modes_kept(module),
            torch.no_grad(),
            fused_paths_off(),  # a fused transformer layer would not call its layers' hooks
            input_errors(what, "example_input", tuple(example_input.shape)),
        ):
            module.eval()
            module(example_input)
    finally:
        for h in hooks:
            h.remove()
    return counts


def count_flops(module: nn.Module, example_input: torch.Tensor) -> int:
    """Total MACs per example of the counted layers (see the module docstring)."""
    return sum(flops_by_layer(module, example_input).values())


def measure_latency(
    module: nn.Module,
    example_input: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    repeats: int = 50,
    warmup: int = 10,
) -> float:
    """Median wall-clock seconds of one forward pass of ``example_input`` (its batch size included).

    The module is copied to ``device`` in eval mode; ``warmup`` passes are discarded, then the median
    of ``repeats`` timed passes is returned (CUDA is synchronised around each pass).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = resolve_device(device)
    x = input_tensor(example_input, "example_input is").to(device)
    original_device = next(module.parameters()).device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    try:
        with modes_kept(module):
            module.eval()
            module.to(device)  # outside inference_mode: the parameters must stay trainable
            with torch.inference_mode():
                for i in range(warmup + repeats):
                    sync()
                    start = time.perf_counter()
                    module(x)
                    sync()
                    if i >= warmup:
                        times.append(time.perf_counter() - start)
    finally:
        module.to(original_device)
    return statistics.median(times)
