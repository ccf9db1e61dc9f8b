"""The loss of one SVI step, eager or compiled with ``torch.compile`` (private).

:func:`bayesprune.fit` with ``compile=True`` compiles the forward pass and the loss of
:class:`~bayesprune.inference.LocalReparamELBO` (``differentiable_loss``: the network's sampled
pass, the NLL and the KL; AOTAutograd compiles its backward too). The optimizers stay eager: the
learning-rate schedules and the fused Adam are not traceable (``torch.compile`` skips them).
Per-step and end-to-end times: ``docs/compiled-step.md``.

Inductor is told to draw its random numbers as eager PyTorch does (``fallback_random``), so a
seeded compiled step draws the same gates and noise as the eager one and their losses and
gradients agree to float tolerance (``tests/test_compiled.py``).

Compilation can fail where eager works (no C++ compiler, an unsupported platform or layer),
in the forward call or, for the backward graph, at the first ``backward()``. Then the same batch
is run eagerly, with the random state from before the compiled attempt (and, in the first step,
its buffers and gradients): if that works, the fit goes on eager with one warning that says why;
if it fails too, the error is the model's and is raised. A recompilation that fails in a later
step (a new input shape) falls back the same way but cannot undo what the failed attempt may
have done to BatchNorm's running statistics in that step.
"""

from __future__ import annotations

import time
import types
import warnings
from typing import Any

import torch


class LossStep:
    """``loss = step(x, y)``: the ELBO loss of ``bnet`` on a batch, compiled or eager.

    ``compiled`` says which path the last step took, ``compile_seconds`` the wall time of the
    first compiled step, forward and backward, compilation included (a later recompilation, for
    example when the KL warm-up changes the KL weight, is not counted), ``fallback`` why
    compilation was given up (or ``None``).
    """

    def __init__(self, elbo: Any, bnet: Any, *, compile: bool) -> None:
        # bound here, outside the traced function: inside it, dynamo does not see a bound
        # method's __self__, which LocalReparamELBO reads to find the BayesianModule
        model, guide = bnet.model, bnet.guide

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return elbo.differentiable_loss(model, guide, x, y)

        self._eager = loss
        self._fn = loss
        self._bnet = bnet
        self._before: tuple | None = None  # the first compiled step's starting state
        self._started: float | None = None
        self._first = compile
        self.compiled = False
        self.compile_seconds = 0.0
        self.fallback: str | None = None
        if compile:
            # a code object of its own: dynamo keeps its compiled graphs (and counts recompiles
            # against its limit) per code object, and every fit's graphs are its own
            own = types.FunctionType(
                loss.__code__.replace(), loss.__globals__, loss.__name__, None, loss.__closure__
            )
            try:
                self._fn = torch.compile(own, options={"fallback_random": True})
                self.compiled = True
            except Exception as exc:
                self._give_up(exc)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            return self._eager(x, y)
        state = _rng_state(x.device)
        if self._first:
            # what a failed first step must put back: the random state, the buffers (BatchNorm
            # statistics a partly run step may have moved) and the gradients (the gates' sums)
            buffers = [(b, b.detach().clone()) for b in self._bnet.buffers()]
            grads = [
                (p, None if p.grad is None else p.grad.clone()) for p in self._bnet.parameters()
            ]
            self._before = (state, buffers, grads)
            self._started = time.perf_counter()
        # the batch size may change (the last batch of an epoch): one graph for every size
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(y, 0)
        try:
            return self._fn(x, y)
        except Exception as exc:
            return self._eager_instead(exc, x, y, state)

    def backward(self, loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``loss.backward()``, and the loss that was differentiated. AOTAutograd compiles the
        backward graph at its first call: if that fails, the step is run again eagerly from its
        starting state. The first compiled step's wall time, forward and backward, is
        ``compile_seconds``."""
        if not (self._first and self.compiled and self._before is not None):
            loss.backward()
            return loss
        try:
            loss.backward()
        except Exception as exc:
            loss = self._eager_instead(exc, x, y, self._before[0])
            loss.backward()  # a model error is raised here, as without compile
            return loss
        self._first, self._before = False, None
        self.compile_seconds = time.perf_counter() - (self._started or 0.0)
        return loss

    def _eager_instead(
        self, exc: Exception, x: torch.Tensor, y: torch.Tensor, state
    ) -> torch.Tensor:
        """The step's loss computed eagerly from where the failed compiled attempt started."""
        _set_rng_state(state, x.device)
        if self._before is not None:
            with torch.no_grad():
                for b, value in self._before[1]:
                    b.copy_(value)
            for p, grad in self._before[2]:
                p.grad = grad
        out = self._eager(x, y)  # a model error is raised here, as without compile
        self._give_up(exc)
        self._first, self._before = False, None
        return out

    def _give_up(self, exc: BaseException) -> None:
        self.compiled = False
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        self.fallback = f"{type(exc).__name__}: {first}"[:300]
        warnings.warn(
            f"fit(compile=True): torch.compile failed ({self.fallback}); the fit goes on with "
            "the eager step, which computes the same loss. Pass compile=False to skip the attempt",
            stacklevel=2,
        )


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
