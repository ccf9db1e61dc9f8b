"""Batched posterior draws of :meth:`bayesprune.BayesianModule.predict` (private).

Where every Bayesian layer draws what it draws independently per example
(:meth:`bayesprune.layers.BayesianLayer.draws_per_example`), ``S`` copies of a batch in one
forward pass are ``S`` independent posterior draws for each example: one pass over ``S x B``
rows instead of ``S`` passes over ``B``, in chunks of at most a given number of rows. With a
seed, each pass is one whole posterior draw from the guide instead.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._utils import check_seed, modes_kept
from .data import input_errors, output_tensor

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


def predictive(
    bnet: BayesianModule,
    x: Any,
    num_samples: int,
    seed: int | None,
    rows: int,
    reduce: Callable[[torch.Tensor], Any],
) -> Any:
    """``reduce`` of the ``[num_samples, examples, ...]`` outputs, chunk by chunk of ``x`` (a
    batch, or an iterable of batches), concatenated; no pass reads more than ``rows`` rows."""
    if isinstance(rows, bool) or not isinstance(rows, numbers.Integral) or rows < 1:
        raise ValueError(f"batch_size must be a positive integer, got {rows!r}")
    rows = int(rows)
    if isinstance(x, list | tuple) and x and torch.is_tensor(x[0]):
        x = inputs_of(x)  # one batch of a loader, (x, y) or (x,)
    if not torch.is_tensor(x) and not hasattr(x, "__array__") and isinstance(x, Iterable):
        parts = [predictive(bnet, inputs_of(b), num_samples, seed, rows, reduce) for b in x]
        if not parts:
            raise ValueError("predict got an empty iterable of batches")
        return concat(parts)
    bnet._check_batch(x)
    if len(x) == 0:
        raise ValueError(
            f"predict got a batch of 0 examples (inputs of shape {tuple(x.shape)}): pass at "
            "least one example"
        )
    # chunks go to the device one at a time, so that device memory stays bounded too
    per_example = seed is None and draws_per_example(bnet, x[:1].to(bnet.device))
    # examples per chunk: with batched draws, each example takes up to num_samples rows
    step = max(1, rows // num_samples) if per_example else rows
    parts = [
        reduce(
            sample_outputs(
                bnet, x[i : i + step].to(bnet.device), num_samples, seed, rows, per_example
            )
        )
        for i in range(0, len(x), step)
    ]
    return concat(parts)


def sample_outputs(
    bnet: BayesianModule,
    x: torch.Tensor,
    num_samples: int,
    seed: int | None,
    rows: int,
    per_example: bool,
) -> torch.Tensor:
    """``[num_samples, len(x), ...]`` outputs: batched draws (``per_example``, at most ``rows``
    rows per pass), one pass per draw, or the guide's draws of ``seed``."""
    exact = {layer: layer.exact_draws for layer in bnet.bayesian_layers.values()}
    for layer in exact:
        layer.exact_draws = True
    try:
        with modes_kept(bnet):
            bnet.eval()
            fix = "inputs of the shape the wrapped network expects, with the batch first"
            with (
                bnet.mode("sample"),
                input_errors(type(bnet.net).__name__, "inputs", x.shape, fix),
            ):
                if seed is not None:
                    return torch.stack(
                        [bnet._frozen_pass(x, s) for s in draw_seeds(seed, num_samples)]
                    )
                if not per_example:
                    return torch.stack(
                        [output_tensor(bnet.net(x), bnet.net) for _ in range(num_samples)]
                    )
                return batched_draws(bnet.net, x, num_samples, rows)
    finally:
        for layer, value in exact.items():
            layer.exact_draws = value


def concat(parts: list) -> Any:
    """Predictions of consecutive chunks, concatenated (field by field for a named tuple, the
    regression's prediction)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple) and hasattr(parts[0], "_fields"):
        return type(parts[0])(*(torch.cat(f) for f in zip(*parts, strict=True)))
    return torch.cat(parts)


def draw_seeds(seed: int, num_samples: int) -> list[int]:
    """``num_samples`` seeds derived from ``seed``: the posterior draws of ``predict(seed=...)``."""
    gen = torch.Generator().manual_seed(check_seed(seed))
    return torch.randint(2**62, (num_samples,), generator=gen).tolist()
