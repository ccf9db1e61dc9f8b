"""Compare the four seed baselines with our spike-and-slab and group-horseshoe pruning on Fashion-MNIST.

For each network (LeNet-300-100, LeNet-5-Caffe; ResNet-20 with ``--models resnet20``) a dense net
is trained once, then every method prunes it:

* ``magnitude`` / ``magnitude (structured)``: confident magnitude pruning (Alvarez 2024);
* ``SNACS``: adaptive conditional MI connectivity scores (Ganesh et al. 2020), single shot;
* ``gumbel``: Gumbel-softmax weight masks trained with the weights (Zhang, Tao and Zhang 2023);
  on LeNet-300-100 the paper's setting, target density 0.15% (about 400 weights);
* ``self-compression (snr)``: Gaussian BNN, iterative SNR pruning (Carannante et al. 2021);
* ``spike-and-slab`` / ``group horseshoe``: ours (``bp.bayesianize`` + ``bp.fit``; PIP >= 0.5).

Columns: the method's own decision (its default level: SNACS's upper limits, Gumbel's argmax mask,
PIP >= 0.5 for ours; the certified level for magnitude pruning, whose decision *is* the certificate),
then the Learn-then-Test certificate over the method's candidate sequence at alpha = 0.02,
delta = 0.1 (risk: accuracy drop against the dense net; against the posterior predictive for ours)
on the calibration split. Structured results are physically smaller networks (``prune_module``);
unstructured ones are counted by non-zeros (FLOPs: each layer's MACs times its weight density).
Wall time is the pruning method's own time (scores, mask training or SVI), not the dense training.
A second table runs the paper's protocol of confident magnitude pruning (alpha = 0.03,
delta = 0.05, exact binomial p-value, 0/1 loss and the unlabeled disagreement loss) on magnitude
pruning and on ours.

    python benchmarks/compare.py --device cuda                       # the recorded run
    python benchmarks/compare.py --device cuda --models resnet20     # ResNet-20 (no SNACS by default)
    python benchmarks/compare.py --quick                             # CPU smoke run, LeNet-300-100 (~3 min)
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import numpy as np
import torch

import bayesprune as bp
from bayesprune.baselines import (
    PAPER_LEVELS,
    PAPER_PROTOCOL,
    SNACS,
    GumbelPruning,
    MagnitudePruning,
    SelfCompression,
)
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.metrics import count_flops, count_nonzero, count_params, flops_by_layer
from bayesprune.train import evaluate, resolve_device, train
from models import get_model

MODELS = ("lenet_300_100", "lenet5_caffe", "resnet20")
SETTINGS = {
    "lenet_300_100": dict(epochs=20, lr=1e-3, svi_epochs=30, gumbel_density=0.0015),
    "lenet5_caffe": dict(epochs=20, lr=1e-3, svi_epochs=30, gumbel_density=0.01),
    "resnet20": dict(epochs=15, lr=2e-3, svi_epochs=20, gumbel_density=0.05),
}
ALPHA, DELTA = 0.02, 0.1
STRUCTURED_LEVELS = [round(0.05 * i, 2) for i in range(20)]
GUMBEL_LEVELS = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999]


def _flops_kept(
    module: torch.nn.Module, dense_flops: int, x: torch.Tensor, structured: bool
) -> float:
    if structured:
        return count_flops(module, x) / dense_flops
    # unstructured: each layer's MACs scaled by the density of its weight
    macs = flops_by_layer(module, x)
    total = 0.0
    for name, m in module.named_modules():
        if name in macs:
            w = getattr(m, "weight", None)
            dens = 1.0 if w is None else float((w != 0).float().mean())
            total += macs[name] * dens
    return total / dense_flops


def _row(model, method, net, dense, x, structured, wall, test, cert=None, level=None):
    net = net.eval()
    row = {
        "model": model,
        "method": method,
        "level": level,
        "acc": evaluate(net, test),
        "params": (count_params(net) if structured else count_nonzero(net)) / count_params(dense),
        "flops": _flops_kept(net, count_flops(dense, x), x, structured),
        "wall": wall,
    }
    if cert is not None:
        row["cert_level"] = cert.level
        row["cert_acc"] = evaluate(cert.model.eval(), test) if cert.index is not None else None
        row["cert_params"] = cert.params_kept if cert.index is not None else None
    return row


def _fmt(v, pct=False, digits=4):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if pct:
        return f"{100 * v:.2f}%"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if v < 1e-3 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def run_model(name: str, args, splits, device) -> tuple[list[dict], list[dict]]:
    cfg = dict(SETTINGS[name])
    if args.quick:
        cfg.update(epochs=2, svi_epochs=2)
    tr = loader(splits.train, 128, seed=args.seed)
    cal = loader(splits.cal, 1000, shuffle=False)
    test = loader(splits.test, 1000, shuffle=False)
    torch.manual_seed(args.seed)
    dense = get_model(name)
    t0 = time.perf_counter()
    train(
        dense,
        tr,
        epochs=cfg["epochs"],
        lr=cfg["lr"],
        device=device,
        progress=args.progress,
        seed=args.seed,
    )
    print(
        f"[{name}] dense trained in {time.perf_counter() - t0:.0f} s, acc {evaluate(dense, test):.4f}",
        flush=True,
    )
    dense.eval()
    x = next(iter(tr))[0][:1].to(device)
    rows, proto = [], []
    rows.append(_row(name, "dense", dense, dense, x, True, 0.0, test))
    certify_kw = dict(alpha=ALPHA, delta=DELTA, progress=False, train_loader=tr)
    quick_levels = [round(0.1 * i, 2) for i in range(10)]

    def baseline(label, method, own_level, levels, fit_kw=None):
        start = time.perf_counter()
        method.fit(dense, tr, **(fit_kw or {}))
        res = method.result(method_level(method, own_level))
        wall = time.perf_counter() - start
        cert = method.certify(cal, levels, **certify_kw)
        if own_level is None:  # the method's decision is the certificate
            own = cert.model if cert.index is not None else dense
            level = cert.level
        else:
            own, level = res.module, res.level
        rows.append(_row(name, label, own, dense, x, method.structured, wall, test, cert, level))
        print(f"[{name}] {label}: {rows[-1]}", flush=True)
        return method

    def method_level(method, own_level):
        if own_level is None:
            return 0.0
        return own_level(method) if callable(own_level) else own_level

    mag = baseline(
        "magnitude (Alvarez)",
        MagnitudePruning(),
        None,
        quick_levels if args.quick else PAPER_LEVELS,
    )
    baseline("magnitude (structured)", MagnitudePruning(structured=True), None, STRUCTURED_LEVELS)
    if name != "resnet20" or args.snacs_resnet:
        snacs = SNACS(per_class=50 if args.quick else 200, progress=args.progress)
        baseline(
            "SNACS", snacs, lambda m: m.snacs_level(),
            STRUCTURED_LEVELS,
        )  # fmt: skip
    gumbel = GumbelPruning(
        target_density=cfg["gumbel_density"],
        sparsity_weight=args.gumbel_weight,
        epochs=1 if args.quick else args.gumbel_epochs,
        device=device,
        progress=args.progress,
        seed=args.seed,
    )
    baseline("gumbel (weights)", gumbel, lambda m: m.trained_level, GUMBEL_LEVELS)
    sc = SelfCompression(
        "snr",
        epochs=cfg["svi_epochs"],
        rounds=1 if args.quick else 3,
        round_fraction=0.3,
        round_epochs=1 if args.quick else 5,
        device=device,
        progress=args.progress,
        seed=args.seed,
    )
    baseline("self-compression (snr)", sc, 0.5, STRUCTURED_LEVELS)

    # ours: node-level spike-and-slab and group horseshoe, PIP >= 0.5, certified over PIP thresholds
    for label, prior in (
        ("spike-and-slab (ours)", bp.priors.SpikeAndSlab(level="node")),
        ("group horseshoe (ours)", bp.priors.GroupHorseshoe()),
    ):
        start = time.perf_counter()
        bnet = bp.bayesianize(copy.deepcopy(dense).cpu(), prior=prior)
        bp.fit(
            bnet,
            tr,
            epochs=cfg["svi_epochs"],
            lr=1e-3,
            device=device,
            progress=args.progress,
            seed=args.seed,
        )
        small = bp.prune(bnet, threshold=0.5, example_input=x)
        wall = time.perf_counter() - start
        cert = bp.conformal.certify(bnet, cal, example_input=x, **certify_kw)
        rows.append(_row(name, label, small, dense, x, True, wall, test, cert, 0.5))
        print(f"[{name}] {label}: {rows[-1]}", flush=True)
        for risk in ("error", "disagreement"):
            c = bp.conformal.certify(
                bnet, cal, risk=risk, alpha=PAPER_PROTOCOL["alpha"], delta=PAPER_PROTOCOL["delta"],
                pvalue="binomial", example_input=x, progress=False, train_loader=tr,
            )  # fmt: skip
            proto.append(_proto_row(name, label, risk, c, test))

    alvarez = []
    for risk in ("error", "disagreement"):
        protocol = {**PAPER_PROTOCOL, "risk": risk}
        c = mag.certify(
            cal,
            quick_levels if args.quick else PAPER_LEVELS,
            progress=False,
            train_loader=tr,
            **protocol,
        )
        alvarez.append(_proto_row(name, "magnitude (Alvarez)", risk, c, test))
    return rows, alvarez + proto


def _proto_row(model, method, risk, cert, test):
    return {
        "model": model,
        "method": method,
        "risk": risk,
        "level": cert.level,
        "risk_hat": cert.risk_hat,
        "params": cert.params_kept if cert.index is not None else None,
        "acc": evaluate(cert.model.eval(), test) if cert.index is not None else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--models",
        default=None,
        help=f"comma list of {MODELS} (default: lenet_300_100,lenet5_caffe; with --quick lenet_300_100)",
    )
    p.add_argument(
        "--quick", action="store_true", help="subset of the data, 1-2 epochs (CPU smoke run)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cal-size", type=int, default=9000, help="calibration points (9,000 in Alvarez)"
    )
    p.add_argument("--gumbel-weight", type=float, default=10.0,
                   help="lambda of the density term (0.01 in the paper's tutorial; see the report)")  # fmt: skip
    p.add_argument("--gumbel-epochs", type=int, default=30)
    p.add_argument("--snacs-resnet", action="store_true", help="also run SNACS on ResNet-20 (slow)")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    device = resolve_device(args.device)
    if args.models is None:
        # LeNet-5's quick run alone takes ~7 min on a 2-core CPU: opt in with --models
        args.models = "lenet_300_100" if args.quick else "lenet_300_100,lenet5_caffe"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"unknown models {unknown}; choose from {MODELS}")
    splits = load_fashion_mnist(
        seed=args.seed,
        cal_size=2000 if args.quick else args.cal_size,
        subset=3000 if args.quick else None,
    )
    rows, proto = [], []
    for name in models:
        r, q = run_model(name, args, splits, device)
        rows += r
        proto += q
    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    print(f"\n`python benchmarks/compare.py {' '.join(__import__('sys').argv[1:])}` — device: {dev}, "
          f"torch {torch.__version__}, seed {args.seed}, {splits.sizes()}\n")  # fmt: skip
    print(f"| model | method | level | test acc | params kept | FLOPs kept | wall time | "
          f"certified level (α={ALPHA}, δ={DELTA}) | certified acc | certified params |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['method']} | {_fmt(r['level'])} | {r['acc']:.4f} | "
            f"{_fmt(r['params'], True)} | {_fmt(r['flops'], True)} | {r['wall']:.1f} s | "
            f"{_fmt(r.get('cert_level'))} | {_fmt(r.get('cert_acc'))} | {_fmt(r.get('cert_params'), True)} |"
        )
    print("\nAlvarez protocol (α=0.03, δ=0.05, exact binomial p-value, fixed sequence):\n")
    print("| model | method | loss | certified level | calibration risk | params kept | test acc |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in proto:
        print(
            f"| {r['model']} | {r['method']} | {r['risk']} | {_fmt(r['level'])} | "
            f"{_fmt(r['risk_hat'])} | {_fmt(r['params'], True)} | {_fmt(r['acc'])} |"
        )


if __name__ == "__main__":
    main()
