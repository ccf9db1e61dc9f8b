"""SVI step time of bayesianized nets relative to deterministic training, and peers, in one run.

For LeNet-300-100 and ResNet-20 on Fashion-MNIST batches of 128, the median wall-clock time of one
optimisation step (forward, loss, backward, Adam update; CUDA synchronised) of

* the deterministic net (cross-entropy, ``torch.optim.Adam``),
* ``bp.fit``'s whole step with the defaults (node spike-and-slab with point weights): the very
  ``fit_step`` of ``bp.fit`` (ELBO, Adam, the natural-gradient step of the gates, the schedules,
  the history it records), and the ELBO + Adam part of it alone,
* ``bp.fit`` end to end with the defaults, ``progress=False``, one epoch over the same batches
  (its end-of-epoch summaries included), against a deterministic epoch over them, and ten
  epochs of a fresh net against ten deterministic epochs,
* the same step with the older model, mean-field Gaussian weights under the spike-and-slab
  (``weights="gaussian"``, ``reparam="local"``, and ``"auto"`` for nets with convolutions), and
  with the ``Gaussian`` prior (no node gates), also with the rank-one sd family
  (``weight_sd="rank1"``); with point weights ``reparam`` and ``weight_sd`` change nothing,
* for MLPs (LeNet-300-100), the same estimator written out in a few plain torch ops (Gaussian
  prior, with and without its KL term): what the estimator itself costs in plain eager PyTorch,
* (``--trace``) the genuine ``pyro.infer.SVI`` step with ``Trace_ELBO`` on ``bnet.model`` / ``bnet.guide``,
* bayesian-torch's ``dnn_to_bnn`` (Reparameterization layers, ``get_kl_loss``), if installed,

printed as a Markdown table with the ratio to the deterministic step and the step split into its
forward pass (with the loss), backward pass and optimiser update::

    python benchmarks/svi_speed.py --device cuda --steps 200
    python benchmarks/svi_speed.py --device cpu --steps 30 --models lenet_300_100

``--predict`` times ``bnet.predict`` instead (what certifying or predicting costs), against the
deterministic forward pass: one draw per batch, and 32 draws (made in one batched pass), whose
ratio is given per draw, next to the 32 separate passes that ``predict`` made before.

``--memory`` also measures the peak memory of a step above what the process held before it,
the highest of :data:`MEMORY_STEPS` consecutive steps (the default step's tests differ from step
to step: a test of an early layer holds a whole pass beside the outputs it hands back; CPU: the C heap's bytes in use, glibc's ``mallinfo2``, read after every ATen operator, since
``tracemalloc`` does not see torch's allocations and the resident set's peak counts freed blocks
that ``malloc`` keeps; run it with ``--threads 1``, other threads' arenas are not read; CUDA:
``torch.cuda.max_memory_allocated``).

``--json PATH`` also writes the rows there (atomically), each with the command, device and torch
version: step timings are merged into the file by (model, method), so that runs of different
models add up; ``--predict`` rows replace the file. The tables of ``benchmarks/README.md#svi-speed``
are generated from ``benchmarks/results/svi_speed.json`` and ``svi_predict.json``.

``--ops`` also counts the ATen operators one step dispatches (forward, backward and optimiser;
views, aliases such as ``detach``, and profiler markers left out). A small net's GPU step is bound by launching its kernels rather than
by arithmetic, so the ratio of operator counts, which does not depend on the device, predicts the
GPU time ratio of such a net better than a CPU time ratio does.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from results_io import merge_rows, write_json
from torch.utils._python_dispatch import TorchDispatchMode

import bayesprune as bp
from bayesprune._compiled import LossStep
from bayesprune._fit_phases import Progress, fit_step
from bayesprune.data import load_fashion_mnist
from bayesprune.gate_tests import DEFAULT_SIZE as DEFAULT_TEST_SIZE
from bayesprune.gate_tests import GateTests
from bayesprune.inference import FitResult, LocalReparamELBO, _build_optimizers, make_adam
from bayesprune.models import get_model
from bayesprune.module import PREDICT_ROWS, PREDICT_ROWS_GPU
from bayesprune.train import resolve_device

#: the row of bp.fit's whole step with its defaults
FIT_STEP = "bp.fit step, defaults (node spike-and-slab, point weights)"
#: the same step without the exact tests of the gate switches (``bp.fit(gate_tests=None)``)
FIT_STEP_UNTESTED = "bp.fit step, defaults but gate_tests=None (no tests of the gate switches)"
#: the row of whole bp.fit epochs with their defaults
FIT_EPOCH = "bp.fit end to end, defaults, 1 epoch of the same batches (per step)"
#: a longer fit, where the gates' first proposals (and their tests) are a smaller share
FIT_EPOCHS = "bp.fit end to end, defaults, 10 epochs of the same batches (per step)"

#: posterior draws of the batched predict rows
DRAWS = 32

#: a method under test: (loss of minibatch i, its optimiser), or (a whole step on minibatch i, None)
Method = tuple[Callable[[int], torch.Tensor | None], torch.optim.Optimizer | None]
PHASES = ("forward", "backward", "optimizer")
#: consecutive steps whose highest peak ``--memory`` reports
MEMORY_STEPS = 5


def _time_round_robin(
    methods: dict[str, Method], steps: int, warmup: int, dev: torch.device
) -> dict[str, dict[str, float]]:
    """Median milliseconds per step of each method, and of its phases (forward pass and loss,
    backward pass, optimiser update), timed in turn (step i of every method, then step i + 1...),
    so that load from other processes affects all methods alike."""

    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    times: dict[str, list[tuple[float, ...]]] = {k: [] for k in methods}
    for i in range(warmup + steps):
        for name, (loss_of, opt) in methods.items():
            t0 = now()
            loss = loss_of(i)
            t1 = t2 = t3 = now()
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t2 = now()
                opt.step()
                t3 = now()
            if i >= warmup:
                times[name].append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
    out = {}
    for name, rows in times.items():
        cols = [1000 * statistics.median(c) for c in zip(*rows, strict=True)]
        out[name] = dict(zip(("step", *PHASES), cols, strict=True))
    return out


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it (backward ones included) that compute
    something: views and aliases (``view``, ``t``, ``detach``...) and profiler markers launch no
    kernel and are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        if not func.is_view and func.namespace == "aten" and "lift_fresh" not in func.name():
            self.count += 1
        return func(*args, **(kwargs or {}))


def default_fit_step(
    model: str, dev, num_data: int, total: int, *, compile: bool = False, gate_tests: bool = True
):
    """The whole step of ``bp.fit`` with its defaults (cosine schedules, the structure freeze
    over, the loss step ``bp.fit`` installs, compiled or not, the exact tests of the gate
    switches that its natural step proposes) on a fresh bayesianized ``model``:
    ``(step(x, y), bnet, optimizers)`` (also used by ``compile_speed.py``)."""
    bnet = bp.bayesianize(get_model(model)).to(dev)
    bnet.num_data = num_data
    optimizers = _build_optimizers(
        bnet, None, lr=1e-3, structure_lr=None, structure_delay=0.0, gate_step=0.01,
        lr_schedule="cosine", total_steps=total, steps_per_epoch=total,
    )  # fmt: skip
    optimizers.loss_step = LossStep(optimizers.elbo, bnet, compile=compile)
    if gate_tests and optimizers.natural is not None:  # bp.fit's tests of the gate switches
        optimizers.gate_tests = GateTests.for_natural(bnet, optimizers.natural, DEFAULT_TEST_SIZE)
    result, run, kind = FitResult(num_data=num_data), Progress(step=1), type(bnet.net).__name__
    bnet.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        fit_step(bnet, optimizers, result, run, x, y, 1.0, kind)

    return step, bnet, optimizers


def _count_ops(methods: dict[str, Method], i: int) -> dict[str, int]:
    """Computing ATen operators of one whole step (minibatch ``i``) of each method."""
    counts = {}
    for name, (loss_of, opt) in methods.items():
        counter = _OpCounter()
        with counter:
            loss = loss_of(i)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        counts[name] = counter.count
    return counts


class _MallInfo(ctypes.Structure):
    _fields_ = [
        (f, ctypes.c_size_t)
        for f in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _malloc_in_use() -> int | None:
    """Bytes the C heap hands out now (glibc's ``mallinfo2``: main arena plus mapped blocks),
    ``None`` without glibc >= 2.33."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo
    info = fn()
    return info.uordblks + info.hblkhd


class _PeakMemory(TorchDispatchMode):
    """The most C-heap bytes in use after any ATen operator dispatched inside it (backward ones
    included): torch's CPU tensors, unlike Python objects, are invisible to ``tracemalloc``.
    Scratch space that an operator frees before it returns is not seen."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = _malloc_in_use() or 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _malloc_in_use() or 0)
        return out


def _peak_memory(
    methods: dict[str, Method],
    owners: dict[str, tuple[list[torch.Tensor], list[torch.optim.Optimizer]]],
    i: int,
    dev: torch.device,
) -> dict[str, float]:
    """MiB of one whole step (minibatch ``i``) of each method at its peak: its parameters and
    optimiser state (``owners``), plus the most that the step allocates on top of them
    (activations, gradients, temporaries), from a start without gradients (except those that the
    method carries from step to step: the gate logits' running sums of ``bp.fit``)."""
    peaks = {}
    for name, (loss_of, opt) in methods.items():
        default = ([p for g in opt.param_groups for p in g["params"]], [opt]) if opt else ([], [])
        params, opts = owners.get(name, default)
        carried = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
        carried -= {
            id(p)
            for o in opts
            if isinstance(o, torch.optim.Adam)
            for g in o.param_groups
            for p in g["params"]
        }
        for p in params:
            if id(p) not in carried:
                p.grad = None
        static = sum(p.numel() * p.element_size() for p in params)
        static += sum(
            t.numel() * t.element_size()
            for o in opts
            for state in o.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
        static += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            context = contextlib.nullcontext()
        else:
            base = _malloc_in_use() or 0
            context = _PeakMemory()
        with context:
            loss = loss_of(i)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            del loss
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            peaks[name] = (static + torch.cuda.max_memory_allocated(dev) - base) / 2**20
        else:
            peaks[name] = (static + context.peak - base) / 2**20
    return peaks


def _batches(
    dev: torch.device, batch: int, n: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    splits = load_fashion_mnist(seed=0, subset=batch * n)
    x, y = splits.train.tensors
    xs = [x[i * batch : (i + 1) * batch].to(dev) for i in range(len(x) // batch)]
    ys = [y[i * batch : (i + 1) * batch].to(dev) for i in range(len(y) // batch)]
    return xs, ys, 60000


def _plain_mlp(net: torch.nn.Module) -> bool:
    """A ``Sequential`` of Linear layers and parameter-free modules (the floor rows need one)."""
    if not isinstance(net, torch.nn.Sequential):
        return False
    return all(isinstance(m, torch.nn.Linear) or not any(True for _ in m.parameters()) for m in net)


def _floor_method(
    net: torch.nn.Sequential,
    dev: torch.device,
    n: int,
    with_kl: bool,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
) -> Method:
    """The local-reparameterization step written out in a few plain torch ops (Gaussian prior,
    no gates, no framework): what the estimator itself costs in eager PyTorch on this device. Without
    the KL it is only the four matmuls per layer, the noise and Adam on twice the parameters."""
    layers = []
    for m in net:
        if isinstance(m, torch.nn.Linear):
            mu = m.weight.detach().clone().to(dev).requires_grad_()
            ls = torch.full_like(mu, -4.0).requires_grad_()
            b = m.bias.detach().clone().to(dev).requires_grad_()
            layers.append((mu, ls, b))
        else:
            layers.append(m)
    params = [p for layer in layers if isinstance(layer, tuple) for p in layer]
    k = len(xs)

    def loss_of(i: int) -> torch.Tensor:
        h, kl = xs[i % k], 0.0
        for layer in layers:
            if not isinstance(layer, tuple):
                h = layer(h)
                continue
            mu, ls, b = layer
            var = torch.exp(2 * ls)
            mean = F.linear(h, mu, b)
            h = mean + F.linear(h * h, var).sqrt() * torch.randn_like(mean)
            if with_kl:  # KL from N(0, 1), up to a constant
                kl = kl + 0.5 * (var.sum() + mu.pow(2).sum()) - ls.sum()
        return F.cross_entropy(h, ys[i % k]) + kl / n

    return loss_of, make_adam(params, 1e-3)


def _fit_end_to_end(
    name: str,
    dev: torch.device,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    n: int,
    rounds: int,
    ms: dict[str, dict[str, float]],
    *,
    epochs: int = 1,
    warm_up: bool = True,
) -> dict[str, float]:
    """``bp.fit(bnet, batches, epochs=epochs, progress=False)`` as a user runs it (end-of-epoch
    summaries and end-of-fit checks included), on a fresh net, against deterministic epochs over
    the same batches, alternated ``rounds`` times after one warm-up round (if ``warm_up``): the
    median time of a fit, per step, scaled to the deterministic step of the main round (as the
    ratio of the two medians)."""
    net = get_model(name).to(dev)
    opt = make_adam(net.parameters(), 1e-3)
    batches = list(zip(xs, ys, strict=True))
    fits, dets = [], []
    for r in range(rounds + 1) if warm_up else range(1, rounds + 1):
        bnet = bp.bayesianize(get_model(name)).to(dev)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bp.fit(bnet, batches, epochs=epochs, num_data=n, progress=False)
        t1 = time.perf_counter()
        for _ in range(epochs):
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t2 = time.perf_counter()
        if r:
            fits.append(t1 - t0)
            dets.append(t2 - t1)
    ratio = statistics.median(fits) / statistics.median(dets)
    return dict(
        step=ratio * ms["deterministic"]["step"], **{phase: float("nan") for phase in PHASES}
    )


def bench_model(
    name: str,
    dev: torch.device,
    steps: int,
    warmup: int,
    batch: int,
    trace: bool,
    ops: bool = False,
    memory: bool = False,
) -> list[dict]:
    xs, ys, n = _batches(dev, batch, 16)
    k = len(xs)
    methods: dict[str, Method] = {}

    net = get_model(name).to(dev)
    #: what a method's memory holds besides its step (when not its optimiser's parameters)
    owners: dict[str, tuple[list[torch.Tensor], list[torch.optim.Optimizer]]] = {}
    methods["deterministic"] = (
        lambda i: F.cross_entropy(net(xs[i % k]), ys[i % k]),
        make_adam(net.parameters(), 1e-3),
    )

    def ours(prior: bp.priors.Prior, reparam: str, weight_sd: str = "per_weight") -> Method:
        # the ELBO and Adam of bp.fit's inner loop
        bnet = bp.bayesianize(
            get_model(name), prior=prior, reparam=reparam, weight_sd=weight_sd
        ).to(dev)
        bnet.num_data = n
        elbo = LocalReparamELBO()
        return (
            lambda i: elbo.differentiable_loss(bnet.model, bnet.guide, xs[i % k], ys[i % k]),
            make_adam(bnet.parameters(), 1e-3),
        )

    def fit_default_step(label: str, gate_tests: bool = True) -> Method:
        total = 10 * (warmup + steps + 2)
        step, bnet, optimizers = default_fit_step(name, dev, n, total, gate_tests=gate_tests)
        owners[label] = (list(bnet.parameters()), [optimizers.opt, optimizers.natural])
        return (lambda i: step(xs[i % k], ys[i % k])), None

    methods[FIT_STEP] = fit_default_step(FIT_STEP)
    methods[FIT_STEP_UNTESTED] = fit_default_step(FIT_STEP_UNTESTED, gate_tests=False)
    methods["bayesprune SVI, defaults (point weights): ELBO + Adam only"] = ours(
        bp.priors.SpikeAndSlab(level="node"), "local"
    )
    # the older model: mean-field Gaussian weights under the gates, where reparam matters
    gaussian_weights = bp.priors.SpikeAndSlab(level="node", weights="gaussian")
    methods["bayesprune SVI, node spike-and-slab, weights='gaussian', reparam='local'"] = ours(
        gaussian_weights, "local"
    )
    if any(isinstance(m, torch.nn.Conv2d) for m in net.modules()):
        # local for the Linear layers, one weight draw per minibatch for the convolutions
        methods["bayesprune SVI, node spike-and-slab, weights='gaussian', reparam='auto'"] = ours(
            gaussian_weights, "auto"
        )
    # the same without node gates: what the gates cost
    methods["bayesprune SVI, Gaussian prior (no gates), reparam='local'"] = ours(
        bp.priors.Gaussian(), "local"
    )
    methods["bayesprune SVI, Gaussian prior (no gates), reparam='local', weight_sd='rank1'"] = ours(
        bp.priors.Gaussian(), "local", "rank1"
    )

    floor_net = get_model(name)
    if _plain_mlp(floor_net):
        for with_kl in (True, False):
            label = "Gaussian KL" if with_kl else "no KL term"
            methods[f"plain torch, hand-written local reparam., {label}"] = _floor_method(
                floor_net, dev, n, with_kl, xs, ys
            )

    try:
        from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss
    except ImportError:
        bt_missing = True
    else:
        bt_missing = False
        bt = copy.deepcopy(get_model(name))
        dnn_to_bnn(
            bt,
            {
                "prior_mu": 0.0,
                "prior_sigma": 1.0,
                "posterior_mu_init": 0.0,
                "posterior_rho_init": -3.0,
                "type": "Reparameterization",
                "moped_enable": False,
            },
        )
        bt.to(dev)
        methods["bayesian-torch dnn_to_bnn (Reparameterization)"] = (
            lambda i: F.cross_entropy(bt(xs[i % k]), ys[i % k]) + get_kl_loss(bt) / n,
            make_adam(bt.parameters(), 1e-3),
        )

    ms = _time_round_robin(methods, steps, warmup, dev)
    if ops:
        for m, n_ops in _count_ops(methods, warmup + steps).items():
            ms[m]["ops"] = n_ops
    if memory:
        for i in range(warmup + steps + 1, warmup + steps + 1 + MEMORY_STEPS):
            for m, mib in _peak_memory(methods, owners, i, dev).items():
                ms[m]["peak_mib"] = max(mib, ms[m].get("peak_mib", 0.0))
                ms[m]["peak_steps"] = MEMORY_STEPS
    ms[FIT_EPOCH] = _fit_end_to_end(name, dev, xs, ys, n, max(steps // 10, 3), ms)
    ms[FIT_EPOCHS] = _fit_end_to_end(name, dev, xs, ys, n, 1, ms, epochs=10, warm_up=False)
    if trace:
        tnet = bp.bayesianize(get_model(name), prior=bp.priors.SpikeAndSlab(level="node")).to(dev)
        tnet.num_data = n
        svi = pyro.infer.SVI(
            tnet.model, tnet.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO()
        )
        both_methods: dict[str, Method] = {
            "det": methods["deterministic"],
            "trace": (lambda i: svi.step(xs[i % k], ys[i % k]), None),
        }
        both = _time_round_robin(
            both_methods,
            max(steps // 4, 5),
            3,
            dev,
        )
        # timed in its own (shorter) round: scaled to this run's deterministic step
        scale = ms["deterministic"]["step"] / both["det"]["step"]
        ms["bayesprune model/guide + pyro Trace_ELBO (SVI, pyro.optim.Adam)"] = dict(
            step=both["trace"]["step"] * scale,
            **{phase: float("nan") for phase in PHASES},
        )
        if ops:
            ms["bayesprune model/guide + pyro Trace_ELBO (SVI, pyro.optim.Adam)"]["ops"] = (
                _count_ops({"trace": both_methods["trace"]}, 0)["trace"]
            )
    rows = [
        dict(model=name, method=m, ratio=v["step"] / ms["deterministic"]["step"], **v)
        for m, v in ms.items()
    ]
    for r in rows:
        if "ops" in r:
            r["ops_ratio"] = r["ops"] / ms["deterministic"]["ops"]
        if "peak_mib" in r:
            r["peak_ratio"] = r["peak_mib"] / ms["deterministic"]["peak_mib"]
    if bt_missing:
        rows.append(
            dict(
                model=name,
                method="bayesian-torch dnn_to_bnn",
                step=float("nan"),
                note="not installed",
            )
        )
    return rows


def bench_predict(name: str, dev: torch.device, steps: int, warmup: int, batch: int) -> list[dict]:
    """``bnet.predict`` with the defaults (node spike-and-slab, point weights) on a batch against
    the deterministic net's forward pass, all in eval mode without gradients: one draw
    (``num_samples=1``), and :data:`DRAWS` draws in one batched pass, whose time is given per
    draw, next to the same draws in as many separate passes (what ``predict`` did before)."""
    xs, _, _ = _batches(dev, batch, 4)
    k = len(xs)
    rows = PREDICT_ROWS_GPU if dev.type == "cuda" else PREDICT_ROWS  # predict's default
    net = get_model(name).to(dev).eval()
    bnet = bp.bayesianize(get_model(name)).to(dev)
    bnet.eval()

    def separate_passes(i: int) -> torch.Tensor:
        with bnet.mode("sample"):
            return torch.stack([torch.softmax(bnet.net(xs[i % k]), -1) for _ in range(DRAWS)])

    methods: dict[str, Method] = {
        "deterministic forward": (lambda i: net(xs[i % k]), None),
        "posterior draw, bnet.predict, 1 draw": (
            lambda i: bnet.predict(xs[i % k], num_samples=1),
            None,
        ),
        f"posterior draw, bnet.predict, {DRAWS} draws, batched passes of at most {rows} rows (per draw)": (
            lambda i: bnet.predict(xs[i % k], num_samples=DRAWS),
            None,
        ),
        f"posterior draw, {DRAWS} separate passes (predict before, per draw)": (
            separate_passes,
            None,
        ),
    }
    with torch.no_grad():
        ms = _time_round_robin(methods, steps, warmup, dev)
    base = ms["deterministic forward"]["step"]
    rows = []
    for m, v in ms.items():
        per = DRAWS if f"{DRAWS} " in m else 1
        rows.append(dict(model=name, method=m, ratio=v["step"] / per / base, step=v["step"] / per))
    return rows


def _write_json(args: argparse.Namespace, rows: list[dict], device: str) -> None:
    """The rows with their provenance: predictive draws replace ``args.json``, step timings are
    merged into it by (model, method)."""
    command = "python benchmarks/svi_speed.py " + " ".join(sys.argv[1:])
    rows = [dict(r, command=command, device=device, torch=torch.__version__) for r in rows]
    if args.predict:
        meta = {"command": command, "device": device, "torch": torch.__version__}
        write_json(args.json, {"meta": meta, "rows": rows})
    else:
        merge_rows(args.json, rows, key=lambda r: (r["model"], r["method"]))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["lenet_300_100", "resnet20"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--trace", action="store_true", help="also time the Trace_ELBO path")
    parser.add_argument(
        "--ops",
        action="store_true",
        help="also count the ATen operators one step dispatches (forward, backward, optimiser)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure the peak memory of a step above what the process held before it "
        f"(the highest of {MEMORY_STEPS} steps)",
    )
    parser.add_argument(
        "--predict",
        action="store_true",
        help="time one posterior-predictive draw against a deterministic forward pass instead",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the rows there (written atomically)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        if args.predict:
            rows += bench_predict(name, dev, args.steps, args.warmup, args.batch)
        else:
            rows += bench_model(
                name, dev, args.steps, args.warmup, args.batch, args.trace, args.ops, args.memory
            )
    where = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} thread(s)"
    )
    print(
        f"device: {dev} ({where}); torch {torch.__version__}; pyro {pyro.__version__}; batch {args.batch}; median of {args.steps} steps\n"
    )
    if args.json is not None:
        _write_json(args, rows, f"{where}, batch {args.batch}, median of {args.steps} steps")
    if args.predict:
        print("| model | method | ms/batch | ratio to deterministic forward |")
        print("|---|---|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['method']} | {r['step']:.2f} | {r['ratio']:.2f}x |")
        return rows
    print("All optimisers: Adam (fused kernel where available), same settings for every method.\n")
    ops_head = (" ATen ops/step | ops ratio |", "---:|---:|") if args.ops else ("", "")
    mem_head = (" peak MiB | peak ratio |", "---:|---:|") if args.memory else ("", "")
    print(
        "| model | method | ms/step | forward + loss | backward | optimizer | ratio to deterministic |"
        + ops_head[0]
        + mem_head[0]
    )
    print("|---|---|---:|---:|---:|---:|---:|" + ops_head[1] + mem_head[1])
    for r in rows:
        if r.get("note"):
            print(f"| {r['model']} | {r['method']} | n/a | | | | {r['note']} |")
            continue
        phases = " | ".join("" if r[p] != r[p] else f"{r[p]:.2f}" for p in PHASES)
        cells = ""
        if args.ops:
            cells += f" {r['ops']} | {r['ops_ratio']:.2f}x |" if "ops" in r else " | |"
        if args.memory:
            cells += (
                f" {r['peak_mib']:.1f} | {r['peak_ratio']:.2f}x |" if "peak_mib" in r else " | |"
            )
        print(
            f"| {r['model']} | {r['method']} | {r['step']:.2f} | {phases} | {r['ratio']:.2f}x |"
            + cells
        )
    return rows


if __name__ == "__main__":
    main()
