"""Batched posterior draws of :meth:`bayesprune.BayesianModule.predict` (private).

Where every Bayesian layer draws what it draws independently per example
(:meth:`bayesprune.layers.BayesianLayer.draws_per_example`), ``S`` copies of a batch in one
forward pass are ``S`` independent posterior draws for each example: one pass over ``S x B``
rows instead of ``S`` passes over ``B``, in chunks of at most a given number of rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._utils import modes_kept
from .data import output_tensor

if TYPE_CHECKING:
    from .module import BayesianModule


def draws_per_example(bnet: BayesianModule, x: torch.Tensor) -> bool:
    """Whether every Bayesian layer of ``bnet`` draws independently per example on inputs like
    ``x`` in ``predict`` (``exact_draws`` on), each layer asked about its own input, traced by one
    posterior-mean pass on one example (which draws nothing, so the random stream is untouched).
    The answer is remembered per input shape, estimator and prior object."""
    layers = list(bnet.bayesian_layers.values())
    key = (tuple(x.shape[1:]), tuple((m.local_reparam, id(m.prior)) for m in layers))
    cache = bnet.__dict__.setdefault("_per_example", {})  # (absent from older pickles)
    if key in cache:
        return cache[key]
    verdicts: list[bool] = []
    exact = {m: m.exact_draws for m in layers}
    handles = [
        m.register_forward_pre_hook(lambda m, a: verdicts.append(m.draws_per_example(a[0])))
        for m in layers
    ]
    try:
        for m in layers:
            m.exact_draws = True
        with modes_kept(bnet), bnet.mode("mean"):
            bnet.eval()
            bnet.net(x[:1])
    except Exception:  # the sampling passes that follow report the error
        verdicts.append(False)
    finally:
        for h in handles:
            h.remove()
        for m, value in exact.items():
            m.exact_draws = value
    cache[key] = all(verdicts)
    return cache[key]


def inputs_of(batch: Any) -> Any:
    """The inputs of a batch given to :meth:`~bayesprune.BayesianModule.predict`: it, or ``x`` of
    ``(x, y)`` / ``(x,)``."""
    return batch[0] if isinstance(batch, list | tuple) and batch else batch


def batched_draws(net: nn.Module, x: torch.Tensor, num_samples: int, rows: int) -> torch.Tensor:
    """``[num_samples, len(x), ...]`` outputs of ``net`` (in ``"sample"`` mode, layers drawing per
    example), the draws made ``rows // len(x)`` at a time on the batch repeated along its first
    axis (row ``s * len(x) + i`` is draw ``s`` of example ``i``)."""
    n, outs, done = len(x), [], 0
    group = max(1, min(num_samples, rows // max(n, 1)))
    while done < num_samples:
        d = min(group, num_samples - done)
        out = output_tensor(net(x.expand(d, *x.shape).reshape(d * n, *x.shape[1:])), net)
        outs.append(out.view(d, n, *out.shape[1:]))
        done += d
    return outs[0] if len(outs) == 1 else torch.cat(outs)
