r"""Exact tests of the gate switches that the natural step proposes.

:func:`bayesprune.fit` moves the gates of point-weight layers with the natural step of
:mod:`bayesprune.natural`, which estimates a node's worth

.. math:: \Delta_j = \mathrm{NLL}(z_j{=}0) - \mathrm{NLL}(z_j{=}1)

from the gradient of the loss in the gate draws. That estimate is first-order. At a gate near 1 it
sees almost no draw with the node off, only the derivative along the node's scale, which is zero
at a trained network's optimum; and many gates move in the same step, each on evidence gathered
while the others were on. On a trained ResNet-20 the first gate steps then switch off hundreds of
channels at once and the fit never recovers (``docs/notes/gate-decisions.md``, points 3 and 9).

So no gate changes side on the natural step's word alone. After every natural step, each gate
whose logit changed sign is tested, strongest proposal first, each against the state that the
tests before it left. With every gate of these layers at its sign (the median-probability model,
weights as they are), the test compares the tempered objective

.. math:: \mathrm{NLL}(z) + \beta\, \mathrm{KL}\big(q(z) \,\|\, p(z)\big)

with the gate switched against without: the NLL of the training-mode network on the first ``size``
training examples that the fit sees (the ones seen so far, until there are that many; at most
the training set), in one batch, scaled to the full data; the KL at the
logits' bounds. A switch that lowers it is taken (the logit goes to the bound of its new side),
one that does not is refused (the logit goes back to the bound of its old side) and the gate is
held there, its gradients cleared, for the rest of the epoch and one more; for the rest of the
epoch and two more after a second refusal, four after a third, and so on. Either way the gate's
summed gradient is cleared, so that its next proposal rests on new evidence. Without the hold,
the prior's pull proposes the same switch again within a few steps.

This is iterated conditional modes on the gates (Besag 1986), with the natural step as the
proposal: every switch taken lowers the objective of the median model, and decisions are
revisited whenever the natural step proposes them again. The PIPs it leaves are those of
:mod:`bayesprune.natural` with these decisions; they are not the mean-field optimum.

The tests run in the training mode of the network with the random state of the fit set aside
and fixed seeds, so that both sides of a test see the same draws of anything else that is
random (Bayesian weights, dropout); the BatchNorm running statistics are restored after each
evaluation, and the gates are put back as they were before the step if a test is interrupted.
A test does not compute the whole pass again: :class:`~bayesprune.replay.ForwardReplay` hands
back the outputs of the modules called before the tested layer (and that layer's output before
its node multiplier), which the switch cannot change, as far as its memory budget goes (the
layers' outputs, and those of the few other modules that cost more to compute again, such as
max-pooling), and seeds the random generators around every module call from its place in the
pass. The numbers are those of the whole pass; a test of a gate near the output costs little.
With every tested gate at a bound, a draw of those layers' node multipliers is decided (a gate
at :math:`+\infty` is on in every draw): they are drawn without random numbers
(:attr:`~bayesprune.layers.BayesianLayer.gates_decided`; the same values), where the replay
seeds the generators around that draw alone, so that every other draw stays as it was.
A switch taken clears the gate's summed gradient too, so that a gate switched off drifts from
its bound toward the natural step's target (the prior inclusion, moved by the evidence): PIPs of
switched-off nodes can end between the bound and the prior inclusion (the column "PIPs in
[0.1, 0.9]" of the robustness table counts them).

In a distributed fit every process tests on its own examples and the NLL is summed over the
processes, so that all of them take the same decisions. A distributed fit resumed from a
checkpoint tests on process 0's examples on every process (the checkpoint holds those alone), so
it goes on, but not exactly as it would have.

Measured on the cells of ``benchmarks/robustness.py``: ``benchmarks/README.md#robustness`` and
the ``verify_hold`` rows of ``docs/notes/gate-decisions.md``.

Example
-------
>>> import torch
>>> import bayesprune as bp
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> x = torch.randn(512, 4)
>>> data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
>>> loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
>>> bnet = bp.bayesianize(torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
...                                           torch.nn.Linear(16, 2)))
>>> result = bp.fit(bnet, loader, epochs=30, lr=1e-2, progress=False, seed=0)
>>> sorted(result.gate_tests)
['held', 'refused', 'seconds', 'switched_off', 'switched_on', 'tests']
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable

import torch

from .replay import ForwardReplay

__all__ = ["GateTests"]

#: training examples each test evaluates, the default of ``bp.fit(gate_tests=...)``
DEFAULT_SIZE = 256


class GateTests:
    r"""The tests of :mod:`bayesprune.gate_tests` for one fit.

    Parameters
    ----------
    bnet
        The :class:`~bayesprune.BayesianModule` being fitted.
    gates
        The gate logits that the natural step moves (``bnet.gate_parameters()``).
    size
        How many training examples every test evaluates: the first ``size`` that the fit sees
        (:meth:`collect`).
    reduce
        Sums a tensor over the processes of a distributed fit (in place); ``None`` alone.
    """

    def __init__(
        self,
        bnet,
        gates: list[torch.nn.Parameter],
        size: int,
        *,
        reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        owners = {
            id(logit): layer
            for layer in bnet.bayesian_layers.values()
            if (logit := getattr(layer, "gate_logit", None)) is not None
        }
        unknown = [p for p in gates if id(p) not in owners]
        if unknown:
            raise ValueError("every tested gate must be the gate_logit of a Bayesian layer")
        self.bnet, self.gates, self.size, self.reduce = bnet, gates, size, reduce
        self.layers = [owners[id(p)] for p in gates]
        #: where each gate's logits start in the gates concatenated
        *self._starts, self._size = [0, *itertools.accumulate(p.numel() for p in gates)]
        self.examples: list[tuple[torch.Tensor, torch.Tensor]] = []  # as collected
        self.count = 0
        self.held_until = [torch.zeros_like(p, dtype=torch.long) for p in gates]
        self.refusals = [torch.zeros_like(p, dtype=torch.long) for p in gates]
        self.epoch = 0
        self.counts = dict.fromkeys(("tests", "switched_off", "switched_on", "refused"), 0)
        self.seconds = 0.0
        #: the passes of the tests, each from the tested layer on (kept: it learns which outputs
        #: the network changes in place)
        self.replay = ForwardReplay(bnet.net, device=bnet.device)

    @classmethod
    def for_natural(
        cls,
        bnet,
        natural,
        size: int,
        *,
        reduce: Callable[[torch.Tensor], None] | None = None,
    ) -> GateTests:
        """The tests of the gates that ``natural`` (a
        :class:`~bayesprune.natural.BernoulliNaturalGradient`) moves."""
        gates = [p for group in natural.param_groups for p in group["params"]]
        return cls(bnet, gates, size, reduce=reduce)

    def collect(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep examples of a training batch until there are ``size`` (the fit calls it with
        each batch it sees, before its step, for its first pass over the data only: the tests
        use the first examples of the fit, the ones collected so far until there are enough).
        They are kept as one batch, so that a BatchNorm layer sees all of them at once."""
        take = min(len(y), self.size - self.count)
        if take > 0:
            self.examples.append((x[:take].detach().clone(), y[:take].detach().clone()))
            self.count += take
            if len(self.examples) > 1:
                xs, ys = zip(*self.examples, strict=True)
                self.examples = [(torch.cat(xs), torch.cat(ys))]

    # -- around the natural step ---------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The fit's epoch (0-based): holds are counted in epochs."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = value
        self.holding = any(bool((h > value).any()) for h in self.held_until)

    @torch.no_grad()
    def before_step(self) -> torch.Tensor:
        """The logits before the natural step: one copy of all of them, concatenated (what
        :meth:`after_step` takes)."""
        return self._flat(self.gates)

    @torch.no_grad()
    def after_step(self, natural, old: torch.Tensor) -> None:
        """Hold the held gates, then test every sign change the natural step proposed (one
        device sync when it proposed none). All gates at once: a few operators whatever the
        number of layers, on the gates concatenated. ``old`` is :meth:`before_step`'s copy."""
        start = time.perf_counter()
        new = self._flat(self.gates)
        if self.holding:
            held = self._flat(self.held_until) > self.epoch
            new = torch.where(held, old, new)
            torch._foreach_copy_(self.gates, self._split(new))
            grads = [p.grad for p in self.gates if p.grad is not None]
            if len(grads) < len(self.gates):  # the held flags of the gates with a gradient
                flags = self._split(held)
                held = self._flat(
                    [h for h, p in zip(flags, self.gates, strict=True) if p.grad is not None]
                )
            if grads:
                flat = self._flat(grads)
                flat.masked_fill_(held, 0)
                torch._foreach_copy_(grads, self._split(flat, grads))
        # on: PIP >= 1/2, as the median-probability model (bayesprune.diagnostics)
        flips = (new >= 0) != (old >= 0)
        if flips.any():
            q = torch.sigmoid(old)
            grad = self._flat([p.grad if p.grad is not None else p.new_zeros(()).expand_as(p)
                               for p in self.gates])  # fmt: skip
            # the size of the step each gate took, before the clamp: the strongest first
            strength = (grad / (q * (1 - q)).clamp_min(1e-12)).abs()
            index = flips.nonzero().flatten()
            proposals = []
            for v, k in zip(strength[index].tolist(), index.tolist(), strict=True):
                i = bisect.bisect_right(self._starts, k) - 1  # gate k of the flat is (i, j)
                if self.gates[i].grad is not None:
                    proposals.append((v, i, k - self._starts[i]))
            bound_of = {id(p): g["max_logit"] for g in natural.param_groups for p in g["params"]}
            bounds = [bound_of[id(p)] for p in self.gates]
            self._test(sorted(proposals, reverse=True), old, new, bounds, natural.beta)
        self.seconds += time.perf_counter() - start

    @staticmethod
    def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
        """``tensors`` flattened into one (a copy)."""
        if len(tensors) == 1:
            return tensors[0].reshape(-1).clone()
        return torch.cat([t.reshape(-1) for t in tensors])

    def _split(self, flat: torch.Tensor, like: list[torch.Tensor] | None = None) -> list:
        """Views of ``flat`` shaped as ``like`` (the gates by default)."""
        like = self.gates if like is None else like
        parts = flat.split([t.numel() for t in like])
        return [part.view(t.shape) for part, t in zip(parts, like, strict=True)]

    def _test(self, proposals, old, stepped, bounds, beta: float) -> None:
        """Test ``proposals``; ``old`` and ``stepped``: the gates before and after the natural
        step, concatenated."""
        try:
            self._run_tests(proposals, old, stepped, bounds, beta)
        except BaseException:  # (Ctrl-C included) the gates as before the untested step
            torch._foreach_copy_(self.gates, self._split(old))
            raise

    def _run_tests(self, proposals, old, stepped, bounds, beta: float) -> None:
        median = torch.where(old >= 0, math.inf, -math.inf)  # the median model before the step
        torch._foreach_copy_(self.gates, self._split(median))
        # every pass leaves the buffers (BatchNorm's statistics) as they are now
        buffers = list(self.bnet.buffers())
        saved = (buffers, [b.detach().clone() for b in buffers])
        try:
            with self.replay as replay:
                for layer in self.layers:  # every gate at +-inf: no random numbers to draw them
                    layer.gates_decided = replay.multiplier_seeded(layer)
                copied = len(replay.copied)
                current = self._nll(replay, saved)
                replay.commit()
                if len(replay.copied) > copied:  # an output changed in place: record it again
                    current = self._nll(replay, saved)
                    replay.commit()
                tested = self._test_each(proposals, bounds, beta, current, replay, saved)
        finally:
            for layer in self.layers:
                layer.gates_decided = False
        if len(set(bounds)) == 1:
            bound = bounds[0]
        else:
            bound = self._flat(
                [torch.full_like(p, b) for p, b in zip(self.gates, bounds, strict=True)]
            )
        now = self._flat(self.gates)  # untested gates keep their step
        torch._foreach_copy_(
            self.gates, self._split(torch.where(tested, now.sign() * bound, stepped))
        )

    def _test_each(
        self, proposals, bounds, beta: float, current: float, replay, saved
    ) -> torch.Tensor:
        tested = torch.zeros(self._size, dtype=torch.bool, device=self.gates[0].device)
        for _, i, j in proposals:
            p, layer, bound = self.gates[i], self.layers[i], bounds[i]
            flat = p.view(-1)
            on = bool(flat[j] >= 0)
            kl_switch = self._kl_change(layer, p, j, bound)
            flat[j] = -flat[j]
            value = self._nll(replay, saved, start=layer)  # the modules before it handed back
            self.counts["tests"] += 1
            if value + beta * kl_switch < current:
                current = value
                replay.commit()
                self.counts["switched_off" if on else "switched_on"] += 1
            else:
                flat[j] = -flat[j]
                self.counts["refused"] += 1
                refusals = int(self.refusals[i].view(-1)[j]) + 1
                self.refusals[i].view(-1)[j] = refusals
                self.held_until[i].view(-1)[j] = self.epoch + 2 ** (refusals - 1) + 1
                self.holding = True
            tested[self._starts[i] + j] = True
            if p.grad is not None:
                p.grad.view(-1)[j] = 0  # the next proposal rests on new evidence
        return tested

    def _kl_change(self, layer, p: torch.Tensor, j: int, bound: float) -> float:
        """KL of the layer with gate ``j`` switched minus without, the logits at their bounds.

        The natural step's gates have a KL that is a sum over the gates (point-weight node
        spike-and-slab), so the change is measured with the other gates off: the sum is then one
        gate's term, which float32 keeps to about 1e-4 nats even where a gate on costs thousands
        of nats (``prior_log_odds``), instead of a whole layer's."""
        saved = p.detach().clone()
        side = saved.view(-1)[j].sign()
        p.fill_(-bound)
        p.view(-1)[j] = side * bound
        before = layer.kl()
        p.view(-1)[j] = -p.view(-1)[j]
        after = layer.kl()
        p.copy_(saved)
        before, after = torch.stack((before, after)).tolist()  # one read of the device
        return after - before

    def _nll(self, replay: ForwardReplay, saved: tuple, *, start=None) -> float:
        """NLL (nats, full-data scale) of the network as it is on the test examples (the
        outputs of the modules called before ``start`` handed back by ``replay``); the buffers
        are put back after the pass (``saved``: the buffers and their values before)."""
        bnet = self.bnet
        total = torch.zeros(2, dtype=torch.float64, device=bnet.device)

        def nll() -> torch.Tensor:
            return sum(bnet.log_likelihood(bnet(x), y).double().sum() for x, y in self.examples)

        try:  # seeded by the replay, on this fit's generators only, the same on both sides
            total[0] -= replay.run(nll, start=start)
        finally:
            buffers, values = saved
            if buffers:
                torch._foreach_copy_(buffers, values)
        total[1] = self.count
        if self.reduce is not None:
            self.reduce(total)
        nll, count = total.tolist()
        return nll * bnet.num_data / count

    # -- bookkeeping ---------------------------------------------------------------------------
    def summary(self) -> dict[str, float]:
        """What the tests did: counts, gates held now, seconds spent."""
        held = sum(int((h > self.epoch).sum()) for h in self.held_until)
        return {**self.counts, "held": held, "seconds": round(self.seconds, 3)}

    def state_dict(self) -> dict:
        """The examples, holds, refusals and counts (what a resumed fit needs to go on exactly)."""
        return {"epoch": self.epoch, "held_until": self.held_until, "refusals": self.refusals,
                "counts": dict(self.counts), "seconds": self.seconds,
                "examples": [[x, y] for x, y in self.examples]}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Put back what :meth:`state_dict` saved."""
        device = self.bnet.device
        self.held_until = [
            t.to(p.device) for t, p in zip(state["held_until"], self.gates, strict=True)
        ]
        self.refusals = [t.to(p.device) for t, p in zip(state["refusals"], self.gates, strict=True)]
        self.counts = dict(state["counts"])
        self.seconds = float(state["seconds"])
        self.examples = [(x.to(device), y.to(device)) for x, y in state["examples"]]
        self.count = sum(len(y) for _, y in self.examples)
        self.epoch = int(state["epoch"])
