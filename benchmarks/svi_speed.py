"""SVI step time of bayesianized nets relative to deterministic training, and peers, in one run.

For LeNet-300-100 and ResNet-20 on Fashion-MNIST batches of 128, the median wall-clock time of one
optimisation step (forward, loss, backward, Adam update; CUDA synchronised) of

* the deterministic net (cross-entropy, ``torch.optim.Adam``),
* ``bp.fit``'s step: :class:`bayesprune.inference.LocalReparamELBO` + ``torch.optim.Adam``, with node
  spike-and-slab under each reparameterization (``"auto"`` only for nets with convolutions,
  where it differs from ``"local"``), and with the ``Gaussian`` prior (no node gates),
  each also with the rank-one sd family (``bayesianize(..., weight_sd="rank1")``) under local
  reparameterization,
* for MLPs (LeNet-300-100), the same estimator written out in a few plain torch ops (Gaussian
  prior, with and without its KL term): what the estimator itself costs in plain eager PyTorch,
* (``--trace``) the genuine ``pyro.infer.SVI`` step with ``Trace_ELBO`` on ``bnet.model`` / ``bnet.guide``,
* bayesian-torch's ``dnn_to_bnn`` (Reparameterization layers, ``get_kl_loss``), if installed,

printed as a Markdown table with the ratio to the deterministic step and the step split into its
forward pass (with the loss), backward pass and optimiser update::

    python benchmarks/svi_speed.py --device cuda --steps 200
    python benchmarks/svi_speed.py --device cpu --steps 30 --models lenet_300_100

``--predict`` times one posterior-predictive draw per batch instead (what certifying or predicting
costs), against the deterministic forward pass.

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
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from results_io import merge_rows, write_json
from torch.utils._python_dispatch import TorchDispatchMode

import bayesprune as bp
from bayesprune.data import load_fashion_mnist
from bayesprune.inference import LocalReparamELBO, make_adam
from bayesprune.models import get_model
from bayesprune.train import resolve_device

#: a method under test: (loss of minibatch i, its optimiser), or (a whole step on minibatch i, None)
Method = tuple[Callable[[int], torch.Tensor | None], torch.optim.Optimizer | None]
PHASES = ("forward", "backward", "optimizer")


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


def bench_model(
    name: str,
    dev: torch.device,
    steps: int,
    warmup: int,
    batch: int,
    trace: bool,
    ops: bool = False,
) -> list[dict]:
    xs, ys, n = _batches(dev, batch, 16)
    k = len(xs)
    methods: dict[str, Method] = {}

    net = get_model(name).to(dev)
    methods["deterministic"] = (
        lambda i: F.cross_entropy(net(xs[i % k]), ys[i % k]),
        make_adam(net.parameters(), 1e-3),
    )

    def ours(prior: bp.priors.Prior, reparam: str, weight_sd: str = "per_weight") -> Method:
        # exactly the inner loop of bp.fit
        bnet = bp.bayesianize(
            get_model(name), prior=prior, reparam=reparam, weight_sd=weight_sd
        ).to(dev)
        bnet.num_data = n
        elbo = LocalReparamELBO()
        return (
            lambda i: elbo.differentiable_loss(bnet.model, bnet.guide, xs[i % k], ys[i % k]),
            make_adam(bnet.parameters(), 1e-3),
        )

    for reparam in ("local", "shared"):
        methods[f"bayesprune SVI, node spike-and-slab, reparam='{reparam}'"] = ours(
            bp.priors.SpikeAndSlab(level="node"), reparam
        )
    if any(isinstance(m, torch.nn.Conv2d) for m in net.modules()):
        # local for the Linear layers, one weight draw per minibatch for the convolutions
        methods["bayesprune SVI, node spike-and-slab, reparam='auto'"] = ours(
            bp.priors.SpikeAndSlab(level="node"), "auto"
        )
    # the rank-one sd family: one single-output variance pass per layer instead of a full one
    methods["bayesprune SVI, node spike-and-slab, reparam='local', weight_sd='rank1'"] = ours(
        bp.priors.SpikeAndSlab(level="node"), "local", "rank1"
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
    if ops:
        for r in rows:
            r["ops_ratio"] = r["ops"] / ms["deterministic"]["ops"]
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
    """One posterior-predictive draw on a batch (``bnet.predict(x, num_samples=1)``: exact draws,
    convolution weights once per pass) against the deterministic net's forward pass, and against
    the same draw made with the training estimator (local reparameterization everywhere), all in
    eval mode without gradients: what each draw costs when certifying or predicting."""
    xs, _, _ = _batches(dev, batch, 4)
    k = len(xs)
    net = get_model(name).to(dev).eval()
    bnet = bp.bayesianize(get_model(name), prior=bp.priors.SpikeAndSlab(level="node")).to(dev)
    bnet.eval()

    def local_draw(i: int) -> None:
        with bnet.mode("sample"):
            bnet.net(xs[i % k])

    methods: dict[str, Method] = {
        "deterministic forward": (lambda i: net(xs[i % k]), None),
        "posterior draw, bnet.predict (exact draws)": (
            lambda i: bnet.predict(xs[i % k], num_samples=1),
            None,
        ),
        "posterior draw, local reparameterization everywhere": (local_draw, None),
    }
    with torch.no_grad():
        ms = _time_round_robin(methods, steps, warmup, dev)
    base = ms["deterministic forward"]["step"]
    return [
        dict(model=name, method=m, ratio=v["step"] / base, step=v["step"]) for m, v in ms.items()
    ]


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
                name, dev, args.steps, args.warmup, args.batch, args.trace, args.ops
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
    print(
        "| model | method | ms/step | forward + loss | backward | optimizer | ratio to deterministic |"
        + ops_head[0]
    )
    print("|---|---|---:|---:|---:|---:|---:|" + ops_head[1])
    for r in rows:
        if r.get("note"):
            print(f"| {r['model']} | {r['method']} | n/a | | | | {r['note']} |")
            continue
        phases = " | ".join("" if r[p] != r[p] else f"{r[p]:.2f}" for p in PHASES)
        ops_cells = f" {r['ops']} | {r['ops_ratio']:.2f}x |" if args.ops else ""
        print(
            f"| {r['model']} | {r['method']} | {r['step']:.2f} | {phases} | {r['ratio']:.2f}x |"
            + ops_cells
        )
    return rows


if __name__ == "__main__":
    main()
