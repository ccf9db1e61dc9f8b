"""SVI step time of bayesianized nets relative to deterministic training, and peers, in one run.

For LeNet-300-100 and ResNet-20 on Fashion-MNIST batches of 128, the median wall-clock time of one
optimisation step (forward, loss, backward, Adam update; CUDA synchronised) of

* the deterministic net (cross-entropy, ``torch.optim.Adam``),
* ``bp.fit``'s step: :class:`bayesprune.inference.LocalReparamELBO` + ``torch.optim.Adam``,
* (``--trace``) the genuine ``pyro.infer.SVI`` step with ``Trace_ELBO`` on ``bnet.model`` / ``bnet.guide``,
* bayesian-torch's ``dnn_to_bnn`` (Reparameterization layers, ``get_kl_loss``), if installed,

printed as a Markdown table with the ratio to the deterministic step::

    python benchmarks/svi_speed.py --device cuda --steps 200
    python benchmarks/svi_speed.py --device cpu --steps 30 --models lenet_300_100
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import pyro
import torch
import torch.nn.functional as F

import bayesprune as bp
from bayesprune.data import load_fashion_mnist
from bayesprune.inference import LocalReparamELBO, make_adam
from bayesprune.train import resolve_device
from models import get_model


def _time_round_robin(
    steps_by_name: dict[str, Callable[[int], None]], steps: int, warmup: int, dev: torch.device
) -> dict[str, float]:
    """Median milliseconds per step of each method, timed in turn (step i of every method, then
    step i + 1...), so that load from other processes affects all methods alike."""
    times: dict[str, list[float]] = {k: [] for k in steps_by_name}
    for i in range(warmup + steps):
        for name, step in steps_by_name.items():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            step(i)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def _batches(
    dev: torch.device, batch: int, n: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    splits = load_fashion_mnist(seed=0, subset=batch * n)
    x, y = splits.train.tensors
    xs = [x[i * batch : (i + 1) * batch].to(dev) for i in range(len(x) // batch)]
    ys = [y[i * batch : (i + 1) * batch].to(dev) for i in range(len(y) // batch)]
    return xs, ys, 60000


def bench_model(
    name: str, dev: torch.device, steps: int, warmup: int, batch: int, trace: bool
) -> list[dict]:
    xs, ys, n = _batches(dev, batch, 16)
    k = len(xs)
    methods: dict[str, Callable[[int], None]] = {}

    net = get_model(name).to(dev)
    opt = make_adam(net.parameters(), 1e-3)

    def det_step(i: int) -> None:
        loss = F.cross_entropy(net(xs[i % k]), ys[i % k])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    methods["deterministic"] = det_step

    def ours(reparam: str) -> Callable[[int], None]:
        # exactly the inner loop of bp.fit
        bnet = bp.bayesianize(
            get_model(name), prior=bp.priors.SpikeAndSlab(level="node"), reparam=reparam
        ).to(dev)
        bnet.num_data = n
        elbo = LocalReparamELBO()
        bopt = make_adam(bnet.parameters(), 1e-3)

        def step(i: int) -> None:
            loss = elbo.differentiable_loss(bnet.model, bnet.guide, xs[i % k], ys[i % k])
            bopt.zero_grad(set_to_none=True)
            loss.backward()
            bopt.step()

        return step

    methods["bayesprune SVI, node spike-and-slab, reparam='local'"] = ours("local")
    methods["bayesprune SVI, node spike-and-slab, reparam='shared'"] = ours("shared")

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
        topt = make_adam(bt.parameters(), 1e-3)

        def bt_step(i: int) -> None:
            out = bt(xs[i % k])
            loss = F.cross_entropy(out, ys[i % k]) + get_kl_loss(bt) / n
            topt.zero_grad(set_to_none=True)
            loss.backward()
            topt.step()

        methods["bayesian-torch dnn_to_bnn (Reparameterization)"] = bt_step

    ms = _time_round_robin(methods, steps, warmup, dev)
    if trace:
        tnet = bp.bayesianize(get_model(name), prior=bp.priors.SpikeAndSlab(level="node")).to(dev)
        tnet.num_data = n
        svi = pyro.infer.SVI(
            tnet.model, tnet.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO()
        )
        both = _time_round_robin(
            {"det": det_step, "trace": lambda i: svi.step(xs[i % k], ys[i % k])},
            max(steps // 4, 5),
            3,
            dev,
        )
        ms["bayesprune model/guide + pyro Trace_ELBO (SVI, pyro.optim.Adam)"] = (
            both["trace"] * ms["deterministic"] / both["det"]
        )
    rows = [dict(model=name, method=m, ms=v, ratio=v / ms["deterministic"]) for m, v in ms.items()]
    if bt_missing:
        rows.append(
            dict(
                model=name,
                method="bayesian-torch dnn_to_bnn",
                ms=float("nan"),
                note="not installed",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["lenet_300_100", "resnet20"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--trace", action="store_true", help="also time the Trace_ELBO path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        rows += bench_model(name, dev, args.steps, args.warmup, args.batch, args.trace)
    where = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} thread(s)"
    )
    print(
        f"device: {dev} ({where}); torch {torch.__version__}; pyro {pyro.__version__}; batch {args.batch}; median of {args.steps} steps\n"
    )
    print("All optimisers: Adam (fused kernel where available), same settings for every method.\n")
    print("| model | method | ms/step | ratio to deterministic |")
    print("|---|---|---:|---:|")
    for r in rows:
        ms = "n/a" if r["ms"] != r["ms"] else f"{r['ms']:.2f}"
        ratio = r.get("note") or f"{r['ratio']:.2f}x"
        print(f"| {r['model']} | {r['method']} | {ms} | {ratio} |")
    return rows


if __name__ == "__main__":
    main()
