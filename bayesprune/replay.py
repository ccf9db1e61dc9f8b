r"""Forward passes that start where a change enters the network.

:mod:`bayesprune.gate_tests` evaluates the same examples many times in a row, each time with one
node gate switched. A node gate of a :class:`~bayesprune.layers.BayesianLayer` acts only on that
layer's output (:meth:`~bayesprune.layers.BayesianLayer.gate_output`), so every module the pass
calls before that layer sees the same inputs as before, and gives the same outputs.
:class:`ForwardReplay` records the outputs of one pass and, in the next ones, hands them back
instead of computing them again, up to the first call of the layer whose gate changed; from
there on the pass is computed.

What is handed back is the output of every call of a Bayesian layer (the modules of types
``keep``): for those with the standard forward, the output before the node multiplier (the
multiplier itself is always drawn again, so a changed gate takes effect and the BatchNorm hook
that applies it later reads the new one); for those with a forward of their own (attention),
the output of ``forward``. The other modules (BatchNorm, activations, pooling) run again on
what is handed back, except the few whose outputs are worth their memory: a share of the bytes
of the layers' outputs (``others``) goes to the calls that cost at least as much per byte of
output as the layers, the costliest first, as timed in the last whole pass. On a CPU that is
mostly max-pooling, which costs far more per byte of output than a ReLU or the convolution
before it (``docs/fit-cost.md``). The Python code between module calls (additions of residual
branches, reshapes) runs again on what is handed back. The module hooks run as usual, on the handed-back
output of ``forward``; a kept module whose output is its input writes the recorded output into
its input, as it would have. A handed-back output is the same tensor that the call gave in the
recorded pass, so the numbers are those of the whole pass.

Outputs are recorded and handed back as they are, not copied. An output that something changes
in place after it was recorded or handed back moves its tensor's version counter; the record is
then dropped from that call on (the pass itself was right: it used the tensor as a fresh pass
would have), and that module's outputs are copied from then on, on the way in and on the way
out. Copying every output instead costs about as much as computing them again on a CPU, so
the other modules are not copied: one whose output something changes in place (a BatchNorm
before ``nn.ReLU(inplace=True)``), or whose output is its input, runs again in every pass.

So that the modules that run see the same random draws whatever was skipped before them, the
random generators (CPU and the network's device) are seeded at the start of every pass, before
and after every module call, and before a Bayesian layer draws its node multiplier, from the
call's index in the pass; the
caller's random state is put back after each pass. Changes that bypass the version counter
(``tensor.data.mul_()``) are not seen. Replays do not nest.

Outputs are recorded in call order until ``budget`` bytes are held, the layers' first; calls
after that are always computed. A pass whose calls differ from the record (other modules, or in
another order) computes from the first difference on.

Example
-------
>>> import torch
>>> from bayesprune.replay import ForwardReplay
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> x = torch.randn(16, 4)
>>> with torch.no_grad(), ForwardReplay(net, device=x.device, keep=(torch.nn.Linear,)) as replay:
...     first = replay.run(lambda: net(x))
...     replay.commit()
...     again = replay.run(lambda: net(x), start=net[2])  # Linear(4, 8) handed back, ReLU run
>>> replay.reused, bool(torch.equal(first, again))
(1, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .layers import BayesianLayer

__all__ = ["ForwardReplay"]

#: bytes of recorded outputs held at most (calls beyond are computed every time)
DEFAULT_BUDGET = 256 * 2**20
#: the other modules' outputs are held up to this multiple of the bytes of the layers' outputs
#: (``ForwardReplay(others=...)``)
OTHERS_SHARE = 0.25


def _splits_at_gate(module: nn.Module) -> bool:
    """Whether the module's node gates act after the rest of its forward (reusable before)."""
    return (
        isinstance(module, BayesianLayer)
        and type(module).forward is BayesianLayer.forward
        and not module.prior.weight_level
    )


def _tensors(value: Any) -> list[torch.Tensor] | None:
    """The tensors of a module output; ``None`` for outputs it does not record."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and all(
        v is None or isinstance(v, torch.Tensor) for v in value
    ):
        return [v for v in value if v is not None]
    return None


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    copies = [None if v is None else v.clone() for v in value]
    return type(value)(*copies) if hasattr(value, "_fields") else type(value)(copies)


class _Record:
    """One module call of a pass: which module, what it gave, and that output's versions."""

    __slots__ = ("in_place", "kept", "module", "mult", "output", "primary", "size", "versions")

    def __init__(
        self,
        module: nn.Module,
        output: Any = None,
        mult: Any = None,
        in_place: bool = False,
        tensors: list | None = None,
        *,
        primary: bool = True,
    ) -> None:
        self.module, self.output, self.mult, self.in_place = module, output, mult, in_place
        self.kept = tensors is not None  # else: a call computed again in every pass
        self.primary = primary  # a module of the types ``keep`` (else: one of the others)
        tensors = tensors or []
        self.size = _nbytes(tensors)
        self.versions = [t._version for t in tensors]

    def intact(self) -> bool:
        """Whether nothing changed the output in place since it was recorded."""
        if not self.kept:
            return True
        tensors = _tensors(self.output)
        return [t._version for t in tensors] == self.versions


class ForwardReplay:
    """Record a network's forward pass, then replay it from a given module on.

    A context manager: on entry it wraps the ``forward`` of the network's modules (on the
    instances), on exit it puts them back and drops the record (what it learnt about outputs
    changed in place is kept for the next entry). Use it under :func:`torch.no_grad`: the record
    holds no autograd history.

    Parameters
    ----------
    net
        The network whose passes are replayed.
    device
        The device whose random generator is seeded with the CPU's around every module call.
    budget
        Bytes of recorded outputs held at most (:data:`DEFAULT_BUDGET`, 256 MiB).
    keep
        The module types whose outputs are recorded first and handed back (copied where
        something changes them in place).
    others
        Also record and hand back outputs of the other modules (BatchNorm, activations,
        pooling), up to this multiple of the bytes of the layers' outputs (:data:`OTHERS_SHARE`;
        ``0``: they run again in every pass) and within ``budget``: the calls that cost most
        per byte of output, as timed in the last whole pass (``start=None``; until one has
        run, none). An output of theirs that something changes in place is computed again in
        every pass instead (a copy would cost about as much).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        device: torch.device,
        budget: int = DEFAULT_BUDGET,
        keep: tuple[type[nn.Module], ...] = (BayesianLayer,),
        others: float = OTHERS_SHARE,
    ) -> None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0 bytes, got {budget}")
        if not others >= 0:
            raise ValueError(f"others must be >= 0 (a multiple of the layers' bytes), got {others}")
        self.net, self.device, self.budget, self.keep = net, torch.device(device), budget, keep
        self.others = others
        self.modules = self._units(net)
        self.own_forwards: dict[int, Any] = {}  # forwards set on the instances before entry
        # modules whose outputs something changes in place: of ``keep`` (copied), others (run)
        self.copied: set[int] = set()
        self.computed: set[int] = set()
        #: the other modules' calls whose outputs are recorded (by call index), chosen after
        #: the last whole pass (:meth:`_choose`)
        self.chosen: set[int] = set()
        self.costs: dict[int, tuple[float, int]] = {}  # call index: (seconds per byte, bytes)
        self.whole, self.layer_bytes, self.layer_seconds = False, 0, 0.0  # of the last pass
        self.record: dict[int, _Record] = {}  # the committed pass, by call index
        self.pending: dict[int, _Record | None] = {}  # what the last pass computed
        self.handed: list[int] = []  # the calls the last pass handed back
        self.index = 0
        self.reuse_below = 0
        self.reused = 0  # module calls handed back in the last pass
        self.entered = False

    @staticmethod
    def _units(net: nn.Module) -> list[nn.Module]:
        """The modules whose calls are recorded: Bayesian layers and modules without children,
        none inside another one."""
        units: list[nn.Module] = []
        inside: list[str] = []
        for name, module in net.named_modules():
            if any(name.startswith(prefix) for prefix in inside):
                continue
            if isinstance(module, BayesianLayer) or not any(True for _ in module.children()):
                units.append(module)
                inside.append(f"{name}." if name else "")
        return units

    # -- entering and leaving ------------------------------------------------------------------
    def __enter__(self) -> ForwardReplay:
        if self.entered or any(
            getattr(m.__dict__.get("forward"), "_replay", None) is not None for m in self.modules
        ):
            raise RuntimeError(
                "this network's forwards are already wrapped by a ForwardReplay; leave that one "
                "first (replays do not nest)"
            )
        self.own_forwards = {
            id(m): m.__dict__["forward"] for m in self.modules if "forward" in m.__dict__
        }
        self.entered = True
        try:
            for module in self.modules:
                module.forward = self._wrap(module)
        except BaseException:
            self._unwrap()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._unwrap()
        self.entered = False
        self.record, self.pending, self.handed = {}, {}, []

    def _unwrap(self) -> None:
        for module in self.modules:
            if id(module) in self.own_forwards:
                module.forward = self.own_forwards[id(module)]
            else:
                module.__dict__.pop("forward", None)

    def multiplier_seeded(self, module: nn.Module) -> bool:
        """Whether the passes (while entered) seed the generators right before ``module``'s node
        multiplier is drawn and again right after the call, with nothing else drawn between: a
        Bayesian layer with the standard forward and node gates, its forward not replaced on the
        instance. Drawing that multiplier differently then changes no other draw of the pass."""
        return _splits_at_gate(module) and id(module) not in self.own_forwards

    # -- passes --------------------------------------------------------------------------------
    def run(self, fn: Callable[[], Any], *, start: nn.Module | None = None) -> Any:
        """Run ``fn`` (a forward pass of the network), handing back the recorded outputs of the
        calls made before the first call of ``start`` (``None``: no call is handed back; a
        Bayesian layer whose gates act after its forward is handed back itself, its multiplier
        drawn again). What it computes is kept for :meth:`commit`."""
        self.index, self.pending, self.handed, self.reused = 0, {}, [], 0
        self.reuse_below = self._reuse_limit(start)
        # the others' costs are measured in whole passes (which of them to record: ``chosen``)
        self.whole, self.layer_bytes, self.layer_seconds = start is None, 0, 0.0
        if self.whole:
            self.costs = {}
        accel = self.device.type != "cpu"
        try:
            with torch.random.fork_rng(
                devices=[self.device] if accel else [],
                device_type=self.device.type if accel else "cuda",
            ):  # the seeds of the module calls do not leak into the caller's random state
                self._seed(0)  # what runs before the first module call: the same in every pass
                return fn()
        finally:  # (also after an exception) outputs changed in place are not handed back again
            for k in self.handed:
                rec = self.record.get(k)
                if rec is not None and not rec.intact():
                    self._changed(k, rec, self.record)
            for k, rec in self.pending.items():
                if rec is not None and not rec.intact():
                    self._changed(k, rec, self.pending)

    def _changed(self, k: int, rec: _Record, records: dict) -> None:
        """Call ``k``'s output ``rec`` in ``records`` was changed in place: a module of ``keep``
        is copied from then on (the record dropped from ``k`` on, or ``k``'s left pending), one
        of the others computed in every pass."""
        if not rec.primary:
            self.computed.add(id(rec.module))
            records[k] = _Record(rec.module)
        elif records is self.pending:
            self.copied.add(id(rec.module))
            records[k] = None
        else:
            self.copied.add(id(rec.module))
            self._drop_from(k)

    def commit(self) -> None:
        """Make the last pass the record (its reused calls kept, its computed calls replacing
        the recorded ones), as far as the budget and the intact outputs go: the outputs of
        ``keep`` first, then the others' in call order with what the budget leaves."""
        if self.whole:
            self._choose()
        for k, rec in self.pending.items():
            if rec is None:
                self.record.pop(k, None)
            else:
                self.record[k] = rec
        used, k = 0, 0
        while k in self.record and k < self.index:
            rec = self.record[k]
            if rec.primary:
                if used + rec.size > self.budget:
                    break
                used += rec.size
            k += 1
        self._drop_from(k)
        for j in sorted(self.record):
            rec = self.record[j]
            if rec.kept and not rec.primary:
                if used + rec.size > self.budget:
                    used = self.budget + 1  # and the later ones: the record stays a prefix
                    self.record[j] = _Record(rec.module)
                else:
                    used += rec.size
        self.pending = {}

    def _choose(self) -> None:
        """The other modules' calls whose outputs the next passes record: those that cost at
        least as much per byte of output as the layers' calls, the costliest first, up to
        ``others`` times the bytes of the layers' outputs. On a CPU the costs are the times of
        the last whole pass (a max-pool costs far more per byte than a ReLU); elsewhere, where
        a call costs its launch, one per call (the smallest outputs first)."""
        room, chosen = self.others * self.layer_bytes, set()
        floor = self.layer_seconds / max(self.layer_bytes, 1)  # what a layer's record saves
        for k, (cost, size) in sorted(self.costs.items(), key=lambda item: -item[1][0]):
            if cost >= floor and size <= room:
                room -= size
                chosen.add(k)
        self.chosen = chosen

    def _drop_from(self, k: int) -> None:
        for j in [j for j in self.record if j >= k]:
            del self.record[j]

    def _reuse_limit(self, start: nn.Module | None) -> int:
        if start is None:
            return 0
        k = 0
        while k in self.record:
            if self.record[k].module is start:
                return k + 1 if _splits_at_gate(start) else k
            k += 1
        return k

    def _seed(self, value: int) -> None:
        torch.random.default_generator.manual_seed(value)
        if self.device.type == "cuda":
            torch.cuda.default_generators[self.device.index or 0].manual_seed(value)
        elif self.device.type != "cpu":
            getattr(torch, self.device.type).manual_seed(value)

    def _wrap(self, module: nn.Module) -> Callable[..., Any]:
        # an instance forward (a user's patch, an accelerate hook) is called as it is
        splits = self.multiplier_seeded(module)
        compute = module.forward_pre_gate if splits else module.forward

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            k = self.index
            self.index += 1
            self._seed(3 * k + 1)
            rec = self.record.get(k) if k < self.reuse_below else None
            if rec is not None and rec.kept and not rec.intact():  # changed since: not reused
                self._changed(k, rec, self.record)
                rec = self.record.get(k)
            if rec is not None and rec.module is module and not rec.kept:
                result = self._compute(module, compute, splits, args, kwargs, k)  # as recorded
            elif rec is not None and rec.module is module:
                self.reused += 1
                self.handed.append(k)
                result = self._hand_back(rec, args, k, splits)
            else:
                if k < self.reuse_below:  # the pass left the record: compute from here on
                    self.reuse_below = k
                result = self._compute(module, compute, splits, args, kwargs, k)
            self._seed(3 * k + 3)
            return result

        wrapped._replay = self  # type: ignore[attr-defined]
        return wrapped

    def _compute(self, module, compute, splits: bool, args, kwargs, k: int) -> Any:
        copy = id(module) in self.copied
        began = time.perf_counter()
        result = compute(*args, **kwargs)
        # what the call cost: its time on a CPU, elsewhere (a call costs its launch) one per call
        cost = time.perf_counter() - began if self.device.type == "cpu" else 1.0
        out, mult = result if splits else (result, None)
        tensors = _tensors(out)
        if not isinstance(module, self.keep):
            rec = _Record(module)  # computed again in every pass, unless chosen
            in_place = bool(args) and any(t is args[0] for t in tensors or ())
            if (
                self.others
                and tensors is not None
                and not in_place
                and id(module) not in self.computed
            ):
                size = _nbytes(tensors)
                if self.whole and size > 0:
                    self.costs[k] = (cost / size, size)
                if k in self.chosen:
                    rec = _Record(module, out, mult, False, tensors, primary=False)
            self.pending[k] = rec
        elif tensors is None:
            self.pending[k] = None
        else:
            kept = _copy(out) if copy else out
            in_place = not splits and bool(args) and out is args[0]
            self.pending[k] = _Record(module, kept, mult, in_place, _tensors(kept))
            self.layer_bytes += self.pending[k].size
            self.layer_seconds += cost
        if not splits:
            return result
        self._seed(3 * k + 2)  # the multiplier's draws, the same when handed back
        return module.gate_output(out, mult)

    def _hand_back(self, rec: _Record, args: tuple, k: int, splits: bool) -> Any:
        out = _copy(rec.output) if id(rec.module) in self.copied else rec.output
        if splits:
            self._seed(3 * k + 2)
            return rec.module.gate_output(out, rec.mult)
        if rec.in_place and args and isinstance(args[0], torch.Tensor):
            return args[0] if args[0] is out else args[0].copy_(out)
        return out
