"""Probes of how the default fit decides the node gates (issue "Posteriors that prune well").

Each probe runs cells of ``benchmarks/robustness.py`` (same data, nets, dense references and
``bp.fit`` call) with one change to the fit or the prior, and records the cell's row plus what
the probe measures. Nothing here is a default; the probes are the evidence for the notes in
``docs/notes/gate-decisions.md``.

Probes (``--probe NAME``; ``reset``, ``ghs_scale``, ``init``, ``ramp`` and ``leaky`` take a value,
``--value``):

* ``default``: the fit as it is, with the ELBO terms at the start and the end, the training
  accuracy of the pruned net, and how often each gate logit changed sign (per quarter of the fit).
* ``natural_only``: the fit without the exact tests of the gate switches
  (``bp.fit(gate_tests=None)``: the natural step alone, the default before
  :mod:`bayesprune.gate_tests`). Every probe below also runs with ``gate_tests=None``: each is a
  change to the natural step alone.
* ``clear_frozen``: the gate gradients of the steps frozen by ``structure_delay`` are cleared, so
  the first natural step after the freeze does not get their sum.
* ``antiwindup``: a gate clamped at ``max_logit`` keeps no summed gradient pushing it further out.
* ``reset``: the gates' summed gradients are cleared every ``value`` (a fraction) of the steps.
* ``theory``: ``SpikeAndSlab(prior_inclusion="theory")`` instead of 0.1.
* ``tests_size``: the default fit with ``gate_tests=value`` (examples per test) instead of 256.
* ``theory_tests``: ``theory`` with the exact tests of the gate switches (the default fit with
  ``prior_inclusion="theory"``).
* ``flip``: after the default fit, a greedy pass (``value`` rounds, default 1) over the hidden
  nodes: each gate in turn is flipped to the other bound, and the flip is kept when it lowers the
  objective NLL + KL with every other gate and the weights as they are (the NLL of the
  posterior-mean network on up to 1,024 training examples, scaled to N): the exact conditional
  decision of one gate, instead of the first-order estimate of the natural step.
* ``ghs_scale``: ``GroupHorseshoe(global_scale=value)``; ``value`` 0 means :math:`1/\\sqrt{n}`.
* ``ghs_point_ml`` and ``ghs_point_map``: the group horseshoe with point standardised weights
  :math:`\\beta` (global scale ``value``, default 1), as the default spike-and-slab has point
  weights: :math:`q` covers the node scales alone, and the KL of the mean-field Gaussian
  :math:`\\beta` (what dominates the horseshoe's objective, point 6) is gone. ``ml``: no term for
  :math:`\\beta` (type-II maximum likelihood); ``map``: the :math:`\\mathcal N(0, 1)` prior's
  :math:`\\tfrac12 \\lVert\\beta\\rVert^2` in its place (a MAP estimate). The PIPs are the
  horseshoe's, :math:`P_q(\\tilde s_j > \\rho r_l / b_j)`.
* ``leaky``: the gates' summed gradients decay by :math:`e^{-1/T}` after every step, :math:`T` the
  steps of ``value`` epochs: a leaky integral that bounds the summed pressure of early steps.
* ``init_clear``: ``init`` (``value`` the initial inclusion) and ``clear_frozen`` together.
* ``ramp``: the structure schedules (the gates' natural step; the default prior has no other
  structure parameter) grow linearly from 0 after the ``structure_delay`` freeze, reaching their
  schedule after ``value`` (a fraction) of the steps; the summed gradients are kept as they are.
* ``init``: ``SpikeAndSlab(init_inclusion=value)`` instead of 0.95 (the gates start nearer on, so
  that fewer channels are dropped at random in the first steps of a dense start).
* ``verify``: every sign change that a natural step proposes is tested exactly before it is taken,
  one gate at a time in order of the step's strength, each against the state left by the tests
  before it: the objective NLL + beta KL of the median model (every gate at its sign; NLL of the
  training-mode network on up to ``value`` training examples, default 512, scaled to N) with the
  gate flipped against without. A passed test puts the gate at the bound of its new side, a failed
  one at the bound of its old side; either way its summed gradient is cleared. Iterated
  conditional modes on the gates, with the natural step as the proposal.
* ``verify_cap``: ``verify`` on 256 examples, with at most ``value`` tests per step: the strongest
  proposals are tested, the others go back to their old logits with their sums kept (so they
  propose again at the next step); a bound on what the tests cost.
* ``verify_cavi``: ``verify_cap``, but a tested gate's logit is set to its exact coordinate-ascent
  value :math:`\\operatorname{logit}\\gamma + \\Delta_j/\\beta` (clamped to the bounds), with
  :math:`\\Delta_j` the measured NLL(off) - NLL(on): the PIP of that gate given the others.
* ``verify_hold``: ``verify`` on ``value`` examples, with every proposal tested, but a gate whose
  proposal failed is held (its logit at the bound, its gradients cleared) for one epoch after its
  first failure, two after its second, four after its third...: the natural step's estimate of a
  kept node's worth at a PIP near 1 sees almost no draws with the node off, so without the hold
  the prior's pull proposes the same switch again within a few steps.

Usage::

    python benchmarks/gate_probes.py --probe default --cells 2 5 9 10 --threads 1
    python benchmarks/gate_probes.py --probe ghs_scale --value 0.01 --cells 3 7 13 18 19
    python benchmarks/gate_probes.py --probe ghs_point_ml --cells 3 7 13 18

Rows are merged into ``benchmarks/results/gate_probes.json`` by (probe, value, cell).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import robustness as R
from results_io import write_json

import bayesprune as bp
from bayesprune import inference
from bayesprune.natural import BernoulliNaturalGradient

RESULTS = Path(__file__).resolve().parent / "results" / "gate_probes.json"
PROBES = (
    "default",
    "natural_only",
    "clear_frozen",
    "antiwindup",
    "reset",
    "theory",
    "ghs_scale",
    "flip",
    "init",
    "ramp",
    "leaky",
    "init_clear",
    "verify",
    "verify_cap",
    "verify_cavi",
    "verify_hold",
    "theory_tests",
    "tests_size",
    "ghs_point_ml",
    "ghs_point_map",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PointHorseshoe(bp.priors.GroupHorseshoe):
    """The probes ``ghs_point_ml`` / ``ghs_point_map``: point standardised weights under the
    group horseshoe's node scales (a probe, not a prior of the package)."""

    map_penalty: bool = False
    point_weights = True  # the layers then use weight_loc as it is, and do not fit its sds
    uses_row_stats = False  # its KL reads no row statistics of the weights

    def kl(self, layer):
        kl = self.scales.kl(layer)
        if self.map_penalty:  # -log N(beta; 0, 1) up to a constant
            kl = kl + 0.5 * layer.weight_loc.pow(2).sum()
            if layer.bias_loc is not None:
                kl = kl + 0.5 * layer.bias_loc.pow(2).sum()
        return kl


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _Recorder:
    """Wraps ``BernoulliNaturalGradient.step``: applies the probe's change to the summed gate
    gradients after each step and counts the sign changes of the gate logits."""

    def __init__(self, probe: str, period: float | None) -> None:
        self.probe, self.period = probe, period
        self.t, self.prev, self.flips, self.per_step = 0, None, None, []
        self.verifier = None  # set by run() for the ``verify`` probe

    def __call__(self, original):
        rec = self

        @torch.no_grad()
        def step(opt, closure=None):
            before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
            strength = [
                None if p.grad is None else (p.grad / (torch.sigmoid(p) * (1 - torch.sigmoid(p)))
                                             .clamp_min(1e-12)).abs()
                for g in opt.param_groups for p in g["params"]
            ]  # fmt: skip
            out = original(opt, closure)
            if rec.verifier is not None:
                rec.verifier(opt, before, strength)
            rec.t += 1
            params = [p for g in opt.param_groups for p in g["params"]]
            frozen = all(g["lr"] == 0 for g in opt.param_groups)
            for g in opt.param_groups:
                bound = g["max_logit"]
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    if rec.probe in ("clear_frozen", "init_clear") and frozen:
                        p.grad = None
                    elif rec.probe == "antiwindup":
                        out_up = (p >= bound) & (p.grad < 0)
                        out_down = (p <= -bound) & (p.grad > 0)
                        p.grad[out_up | out_down] = 0
                    elif rec.probe == "reset" and rec.t % rec.period == 0:
                        p.grad = None
                    elif rec.probe == "leaky":
                        p.grad.mul_(rec.period)
            sign = torch.cat([p.detach().flatten() > 0 for p in params])
            if rec.prev is not None:
                changed = (sign != rec.prev).long()
                rec.flips = changed if rec.flips is None else rec.flips + changed
                rec.per_step.append(int(changed.sum()))
            rec.prev = sign
            return out

        return step


def _ramped(fraction: float, total: int):
    """``_lr_factor`` of ``bp.fit`` times a linear ramp from the end of the freeze over
    ``fraction`` of the ``total`` steps (the ``ramp`` probe)."""
    base = inference._lr_factor
    length = max(1, int(fraction * total))

    def lr_factor(schedule: str, steps: int | None, start: int):
        inner = base(schedule, steps, start)
        if start == 0:  # the weights' schedule (the structure schedules start after the freeze)
            return inner

        def factor(step: int) -> float:
            return inner(step) * min(1.0, max(0, step - start + 1) / length)

        return factor

    return lr_factor


@torch.no_grad()
def _flip_pass(bnet, train, hidden: list[str], rounds: int) -> dict:
    """Greedy exact flips of the decided gates (see the ``flip`` probe); returns the counts."""
    xs, ys, seen_n = [], [], 0
    for x, y in R.loader(train.dataset, 256, shuffle=False):
        xs.append(x)
        ys.append(y)
        seen_n += len(y)
        if seen_n >= 1024:
            break
    n = bnet.num_data
    layers = {k: v for k, v in bnet.bayesian_layers.items() if k in hidden}
    # The median-probability model: every gate at a bound. Mean mode leaves the gates out (it is
    # the network given inclusion), so the gates are drawn as in training, with the logits at
    # +-30 so that the draws are deterministic; the KL is that of the stored logits, +-8.
    bound, sure = 8.0, 30.0
    training = bnet.training
    bnet.eval()

    def objective() -> float:
        nll = sum(
            float(torch.nn.functional.cross_entropy(bnet.net(x), y, reduction="sum"))
            for x, y in zip(xs, ys, strict=True)
        )
        kl = sum(
            float(layer.prior.kl_gates(layer, layer.gate_logit.sign() * bound).sum())
            for layer in layers.values()
        )
        return nll * n / seen_n + kl

    counts = {"on": 0, "off": 0, "tried": 0}
    for layer in layers.values():  # decide every gate first: the pass starts from the median model
        layer.gate_logit.copy_(torch.where(layer.gate_logit >= 0, sure, -sure))
    best = objective()
    start = best
    for _ in range(rounds):
        for layer in layers.values():
            logit = layer.gate_logit
            for j in range(logit.numel()):
                old = float(logit.view(-1)[j])
                logit.view(-1)[j] = -old
                value = objective()
                counts["tried"] += 1
                if value < best:
                    best = value
                    counts["on" if old < 0 else "off"] += 1
                else:
                    logit.view(-1)[j] = old
    for layer in layers.values():
        layer.gate_logit.copy_(layer.gate_logit.sign() * bound)
    bnet.train(training)
    return {"switched_on": counts["on"], "switched_off": counts["off"], "tried": counts["tried"],
            "objective_before": round(start, 1), "objective_after": round(best, 1)}  # fmt: skip


class _Verifier:
    """The ``verify`` probe: exact tests of the sign changes a natural step proposes."""

    def __init__(
        self, bnet, train, n_eval: int, cap: int | None = None, cavi: bool = False,
        hold: int | None = None,
    ) -> None:  # fmt: skip
        self.cap, self.cavi, self.hold, self.t = cap, cavi, hold, 0
        self.held = self.rejections = None
        xs, ys, seen_n = [], [], 0
        for x, y in R.loader(train.dataset, 256, shuffle=False):
            xs.append(x)
            ys.append(y)
            seen_n += len(y)
            if seen_n >= n_eval:
                break
        self.bnet, self.xs, self.ys, self.seen_n = bnet, xs, ys, seen_n
        self.layers = {id(layer.gate_logit): layer for layer in bnet.bayesian_layers.values()
                       if isinstance(getattr(layer, "gate_logit", None), torch.nn.Parameter)}  # fmt: skip
        self.counts = {"tests": 0, "off": 0, "on": 0, "rejected": 0, "seconds": 0.0}

    def _nll(self) -> float:
        buffers = [b.clone() for b in self.bnet.net.buffers()]  # BatchNorm running statistics
        nll = sum(
            float(torch.nn.functional.cross_entropy(self.bnet.net(x), y, reduction="sum"))
            for x, y in zip(self.xs, self.ys, strict=True)
        )
        for b, old in zip(self.bnet.net.buffers(), buffers, strict=True):
            b.copy_(old)
        return nll * self.bnet.num_data / self.seen_n

    @torch.no_grad()
    def __call__(self, opt, before, strength) -> None:
        t0 = time.perf_counter()
        params = [p for g in opt.param_groups for p in g["params"]]
        bounds = [g["max_logit"] for g in opt.param_groups for _ in g["params"]]
        self.t += 1
        if self.hold is not None:
            if self.held is None:
                self.held = [torch.zeros_like(p, dtype=torch.long) for p in params]
                self.rejections = [torch.zeros_like(p, dtype=torch.long) for p in params]
            for p, old, held in zip(params, before, self.held, strict=True):
                keep = held > self.t
                p.copy_(torch.where(keep, old, p))
                if p.grad is not None:
                    p.grad.masked_fill_(keep, 0)
        proposals = []
        for i, (p, old) in enumerate(zip(params, before, strict=True)):
            if strength[i] is None or id(p) not in self.layers:
                continue
            changed = ((p > 0) != (old > 0)).view(-1).nonzero().flatten().tolist()
            proposals += [(float(strength[i].view(-1)[j]), i, j) for j in changed]
        if not proposals:
            return
        proposals.sort(reverse=True)
        deferred = proposals[self.cap :] if self.cap is not None else []
        proposals = proposals[: self.cap] if self.cap is not None else proposals
        self.counts["deferred"] = self.counts.get("deferred", 0) + len(deferred)
        # the tests run on the median model: every gate at its (old) sign, drawn as in training
        # with the logits at +-30 so that the draws are deterministic
        sure, beta = 30.0, opt.beta
        new = [p.detach().clone() for p in params]
        for _, i, j in deferred:  # back to the old side, the sum kept: proposed again next step
            new[i].view(-1)[j] = before[i].view(-1)[j]
        cavi = [torch.full_like(p, float("nan")) for p in params]
        for p, old in zip(params, before, strict=True):
            p.copy_(torch.where(old > 0, sure, -sure))
        base = self._nll()
        tested = [torch.zeros_like(p, dtype=torch.bool) for p in params]
        for _, i, j in proposals:
            tested[i].view(-1)[j] = True
            p, bound = params[i], bounds[i]
            layer = self.layers[id(p)]
            on = float(p.view(-1)[j]) > 0
            flat = torch.tensor([bound, -bound]) if on else torch.tensor([-bound, bound])
            kl_old, kl_new = (float(layer.prior.kl_gates(layer, v).sum()) for v in flat)
            p.view(-1)[j] = -p.view(-1)[j]
            value = self._nll()
            self.counts["tests"] += 1
            worth = (value - base) if on else (base - value)  # NLL(off) - NLL(on)
            cavi[i].view(-1)[j] = layer.prior.log_odds(layer) + worth / beta
            if value + beta * kl_new < base + beta * kl_old:
                base = value
                self.counts["off" if on else "on"] += 1
            else:
                p.view(-1)[j] = -p.view(-1)[j]
                self.counts["rejected"] += 1
                if self.hold is not None:
                    r = int(self.rejections[i].view(-1)[j]) + 1
                    self.rejections[i].view(-1)[j] = r
                    self.held[i].view(-1)[j] = self.t + self.hold * 2 ** (r - 1)
            if p.grad is not None:
                p.grad.view(-1)[j] = 0  # the decision starts a fresh sum
        for p, n, bound, done, c in zip(params, new, bounds, tested, cavi, strict=True):
            decided = c.clamp(-bound, bound) if self.cavi else p.sign() * bound
            p.copy_(torch.where(done, decided, n))  # untested gates keep the step's value
        self.counts["seconds"] += time.perf_counter() - t0


@torch.no_grad()
def _nll(net: torch.nn.Module, batches) -> float:
    """Summed negative log-likelihood (nats) of a deterministic classifier over ``batches``."""
    net.eval()
    return sum(
        float(torch.nn.functional.cross_entropy(net(x), y, reduction="sum")) for x, y in batches
    )


def run(probe: str, value: float | None, cell: int, seed: int = 0) -> dict:
    data, n, *_, epochs, _prior = R.CELLS[cell]
    n_train = 898 if data == "digits" else n
    total = epochs * math.ceil(n_train / R.BATCH)
    period = max(1, int(value * total)) if probe == "reset" else None
    if probe == "leaky":  # (the decay factor per step travels in the same slot)
        period = math.exp(-1.0 / max(1.0, value * total / epochs))
    rec = _Recorder(probe, period)
    seen: dict = {}
    fit, prune = bp.fit, bp.prune

    def fit_and_keep(bnet, *args, **kwargs):
        if probe == "tests_size":
            kwargs["gate_tests"] = int(value)
        elif probe not in ("default", "theory_tests"):
            kwargs.setdefault("gate_tests", None)
        if probe == "verify":
            rec.verifier = _Verifier(bnet, args[0], int(value or 512))
        elif probe in ("verify_cap", "verify_cavi"):
            rec.verifier = _Verifier(bnet, args[0], 256, int(value), probe == "verify_cavi")
        elif probe == "verify_hold":
            epoch = math.ceil(n_train / R.BATCH)
            rec.verifier = _Verifier(bnet, args[0], int(value), hold=epoch)
        seen["fit"] = fit(bnet, *args, **kwargs)
        seen["train"] = args[0]
        if probe == "flip":
            hidden = list(seen["fit"].nodes_off)
            seen["flips"] = _flip_pass(bnet, args[0], hidden, int(value or 1))
        return seen["fit"]

    train_dense = bp.train

    def train_and_keep(net, *args, **kwargs):
        seen["dense"] = net
        return train_dense(net, *args, **kwargs)

    def prune_and_keep(bnet, *args, **kwargs):
        seen["small"] = prune(bnet, *args, **kwargs)
        return seen["small"]

    priors = dict(R.PRIORS)
    if probe in ("theory", "theory_tests"):
        priors["ss"] = lambda: bp.priors.SpikeAndSlab(level="node", prior_inclusion="theory")
    if probe == "ghs_scale":
        scale = value if value else 1 / math.sqrt(n_train)
        priors["ghs"] = lambda: bp.priors.GroupHorseshoe(global_scale=scale)
    if probe in ("ghs_point_ml", "ghs_point_map"):
        scale = 1.0 if value is None else value
        options = {"global_scale": scale, "map_penalty": probe == "ghs_point_map"}
        priors["ghs"] = lambda: _PointHorseshoe(**options)
    if probe in ("init", "init_clear"):
        priors["ss"] = lambda: bp.priors.SpikeAndSlab(level="node", init_inclusion=value)
    with contextlib.ExitStack() as stack:
        if probe == "ramp":
            stack.enter_context(_patched(inference, "_lr_factor", _ramped(value, total)))
        stack.enter_context(
            _patched(BernoulliNaturalGradient, "step", rec(BernoulliNaturalGradient.step))
        )
        stack.enter_context(_patched(bp, "fit", fit_and_keep))
        stack.enter_context(_patched(bp, "prune", prune_and_keep))
        stack.enter_context(_patched(bp, "train", train_and_keep))
        stack.enter_context(_patched(R, "PRIORS", priors))
        row = R.run_cell(cell, seed=seed)
    res = seen["fit"]
    k = max(1, len(res.nll) // 20)  # the first and last 5% of the steps
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    train_eval = R.loader(seen["train"].dataset, 512, shuffle=False)
    row.update(
        probe=probe,
        value=value,
        nll_start=round(mean(res.nll[:k]), 1) if res.nll else None,
        kl_start=round(mean(res.kl[:k]), 1) if res.kl else None,
        nll_end=round(mean(res.nll[-k:]), 1) if res.nll else None,
        kl_end=round(mean(res.kl[-k:]), 1) if res.kl else None,
        pruned_train=round(bp.evaluate(seen["small"], train_eval), 4),
        dense_train=round(bp.evaluate(seen["dense"], train_eval), 4),
        dense_train_nll=round(_nll(seen["dense"], train_eval), 1),
    )
    if "flips" in seen:
        row["flip_pass"] = seen["flips"]
    if rec.verifier is not None:
        row["verify"] = {k: round(v, 1) for k, v in rec.verifier.counts.items()}
    if rec.flips is not None:
        steps = len(rec.per_step)
        row["gate_sign_changes"] = {
            "gates": int(rec.flips.numel()),
            "never": int((rec.flips == 0).sum()),
            "once": int((rec.flips == 1).sum()),
            "twice_or_more": int((rec.flips >= 2).sum()),
            "per_quarter": [
                sum(rec.per_step[i * steps // 4 : (i + 1) * steps // 4]) for i in range(4)
            ],
        }
    row.pop("fit_warnings", None)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probe", choices=PROBES, required=True)
    p.add_argument("--value", type=float, default=None)
    p.add_argument("--cells", nargs="+", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if (
        args.probe
        in (
            "reset",
            "ghs_scale",
            "init",
            "ramp",
            "leaky",
            "init_clear",
            "verify_cap",
            "verify_cavi",
            "verify_hold",
            "tests_size",
        )
        and args.value is None
    ):
        p.error(f"--probe {args.probe} needs --value")
    torch.set_num_threads(args.threads)
    for cell in args.cells:
        row = run(args.probe, args.value, cell)
        row["command"] = (
            f"python benchmarks/gate_probes.py --probe {args.probe}"
            + (f" --value {args.value:g}" if args.value is not None else "")
            + f" --cells {cell} --threads {args.threads}"
        )
        # read just before writing: several probes may run at once, each adding its rows
        payload = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
        rows = {(r["probe"], r["value"], r["cell"]): r for r in payload["rows"]}
        rows[(args.probe, args.value, cell)] = row
        meta = {
            "command": "python benchmarks/gate_probes.py --probe P [--value V] --cells C "
            "(each row records its own)",
            "device": f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__,
            "bayesprune": bp.__version__,
            "probes": list(PROBES),  # the order of the table (benchmarks/tables.py)
        }
        write_json(RESULTS, {"meta": meta, "rows": list(rows.values())})
        keys = ("probe", "value", "cell", "dense", "dense_train", "dense_train_nll", "predictive", "pruned", "pruned_train",
                "params", "hidden_off", "uncertain", "a", "b", "c", "nll_start", "kl_start",
                "nll_end", "kl_end", "gate_sign_changes", "flip_pass", "verify", "fit_seconds")  # fmt: skip
        print(json.dumps({k: row.get(k) for k in keys}), flush=True)


if __name__ == "__main__":
    main()
