"""Compare the four seed baselines with our spike-and-slab and group-horseshoe pruning on Fashion-MNIST.

For each network (LeNet-300-100, LeNet-5-Caffe; ResNet-20 with ``--models resnet20``) a dense net
is trained once on the training split (cached per model, seed and calibration size, so the
calibration points are never training points), then every method prunes it:

* ``magnitude`` / ``magnitude_structured``: confident magnitude pruning (Alvarez 2024);
* ``snacs``: adaptive conditional MI connectivity scores (Ganesh et al. 2020), single shot;
* ``mint``: SNACS's predecessor (geometric conditional dependence, Ganesh, Corso and Sekeh 2020),
  with as many activations per class as SNACS, so that their wall times compare the two estimators
  (SNACS claims to be over 17x faster); it has no level of its own, so its decision is the
  certified level, as for magnitude pruning;
* ``gumbel``: Gumbel-softmax weight masks trained with the weights (Zhang, Tao and Zhang 2023);
  on LeNet-300-100 the paper's setting, target density 0.15% (about 400 weights);
* ``self_compression``: Gaussian BNN, iterative SNR pruning (Carannante et al. 2021);
* ``spike_slab`` / ``group_horseshoe``: ours (``bp.bayesianize`` + ``bp.fit``; PIP >= 0.5).

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

Every (model, method) result is saved to ``<out>/<model>/<method>.json`` as soon as it exists, so a
long comparison can be run method by method (``--methods``) and printed at the end (``--table``)::

    python benchmarks/compare.py --device cuda                       # everything, both LeNets
    python benchmarks/compare.py --models lenet5_caffe --methods spike_slab --svi-epochs 5
    python benchmarks/compare.py --table                             # print the saved rows
    python benchmarks/compare.py --quick                             # CPU smoke run, LeNet-300-100

``--json PATH`` merges the results (of this run, or with ``--table`` the saved ones) into the JSON
at ``PATH`` by (model, method, settings), written atomically: the table of
``benchmarks/README.md#baselines`` is generated from ``benchmarks/results/baselines.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from results_io import merge_rows
from safetensors.torch import load_file, save_file

import bayesprune as bp
from bayesprune.baselines import (
    MINT,
    PAPER_LEVELS,
    PAPER_PROTOCOL,
    SNACS,
    GumbelPruning,
    MagnitudePruning,
    SelfCompression,
)
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.metrics import count_flops, count_nonzero, count_params, flops_by_layer
from bayesprune.models import get_model
from bayesprune.train import evaluate, resolve_device, train

MODELS = ("lenet_300_100", "lenet5_caffe", "resnet20")
METHODS = (
    "magnitude",
    "magnitude_structured",
    "snacs",
    "mint",
    "gumbel",
    "self_compression",
    "spike_slab",
    "group_horseshoe",
)
LABELS = {
    "dense": "dense",
    "magnitude": "magnitude (Alvarez, unstructured)",
    "magnitude_structured": "magnitude (structured)",
    "snacs": "SNACS",
    "mint": "MINT (SNACS's predecessor)",
    "gumbel": "Gumbel masks (weights)",
    "self_compression": "self-compression (SNR)",
    "spike_slab": "spike-and-slab (ours)",
    "group_horseshoe": "group horseshoe (ours)",
}
SETTINGS = {
    "lenet_300_100": dict(epochs=20, lr=1e-3, svi_epochs=30, gumbel_density=0.0015),
    "lenet5_caffe": dict(epochs=20, lr=1e-3, svi_epochs=30, gumbel_density=0.01),
    "resnet20": dict(epochs=15, lr=2e-3, svi_epochs=20, gumbel_density=0.05),
}
ALPHA, DELTA = 0.02, 0.1
STRUCTURED_LEVELS = [round(0.05 * i, 2) for i in range(20)]
GUMBEL_LEVELS = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999]
QUICK_LEVELS = [round(0.1 * i, 2) for i in range(10)]


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
        "structured": structured,
    }
    if cert is not None:
        found = cert.index is not None
        row["cert_level"] = cert.level
        row["cert_acc"] = evaluate(cert.model.eval(), test) if found else None
        row["cert_params"] = cert.params_kept if found else None
    return row


def _proto_row(model, method, risk, cert, test):
    found = cert.index is not None
    return {
        "model": model,
        "method": method,
        "risk": risk,
        "level": cert.level,
        "risk_hat": cert.risk_hat,
        "params": cert.params_kept if found else None,
        "acc": evaluate(cert.model.eval(), test) if found else None,
    }


def _fmt(v, pct=False, digits=4):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if pct:
        return f"{100 * v:.2f}%"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if v < 1e-3 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def _dense(name: str, args, splits, tr, device) -> torch.nn.Module:
    """The dense net of this (model, seed, calibration size), trained once and cached."""
    cfg = SETTINGS[name]
    epochs = _dense_epochs(name, args)
    path = (
        args.out
        / _folder(name, args)
        / f"dense-cal{args.cal_size}-e{epochs}-s{args.seed}.safetensors"
    )
    torch.manual_seed(args.seed)
    dense = get_model(name)
    if args.dense_dir is not None:
        # benchmarks/dense.py's nets: same seed and splits only with its --cal-size (5,000)
        path = args.dense_dir / f"{name}.safetensors"
        if not path.exists():
            raise SystemExit(f"--dense-dir: {path} does not exist; run benchmarks/dense.py first")
    if path.exists():
        dense.load_state_dict(load_file(str(path)))
        print(f"[{name}] dense weights loaded from {path}", flush=True)
        return dense.to(device).eval()
    t0 = time.perf_counter()
    train(dense, tr, epochs=epochs, lr=cfg["lr"], device=device, progress=args.progress,
          seed=args.seed)  # fmt: skip
    print(f"[{name}] dense trained in {time.perf_counter() - t0:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in dense.state_dict().items()}, str(path))
    return dense.eval()


def _dense_epochs(name: str, args) -> int:
    return args.dense_epochs or (2 if args.quick else SETTINGS[name]["epochs"])


def _folder(name: str, args) -> str:
    return f"{name}-quick" if args.quick else name


def run_method(method: str, name: str, dense, args, tr, cal, test, x) -> dict:
    """Run one method on one dense net; returns its row, its protocol rows and its settings."""
    cfg = SETTINGS[name]
    certify_kw = dict(alpha=ALPHA, delta=DELTA, progress=False, train_loader=tr)
    svi_epochs = args.svi_epochs or (2 if args.quick else cfg["svi_epochs"])
    proto: list[dict] = []

    def baseline(pm, own_level, levels, settings):
        start = time.perf_counter()
        pm.fit(dense, tr)
        res = pm.result(0.0 if own_level is None else own_level(pm))
        wall = time.perf_counter() - start
        cert = pm.certify(cal, levels, **certify_kw)
        if own_level is None:  # the method's decision is the certificate
            own = cert.model if cert.index is not None else dense
            level = cert.level
        else:
            own, level = res.module, res.level
        row = _row(name, method, own, dense, x, pm.structured, wall, test, cert, level)
        return pm, row, settings

    if method in ("magnitude", "magnitude_structured"):
        structured = method == "magnitude_structured"
        levels = STRUCTURED_LEVELS if structured else (QUICK_LEVELS if args.quick else PAPER_LEVELS)
        pm, row, settings = baseline(
            MagnitudePruning(structured=structured), None, levels,
            f"{len(levels)} global levels, no fine-tuning",
        )  # fmt: skip
        if not structured:
            for risk in ("error", "disagreement"):
                c = pm.certify(cal, levels, progress=False, train_loader=tr,
                               **{**PAPER_PROTOCOL, "risk": risk})  # fmt: skip
                proto.append(_proto_row(name, method, risk, c, test))
    elif method == "snacs":
        per_class = 50 if args.quick else args.snacs_per_class
        _, row, settings = baseline(
            SNACS(per_class=per_class, progress=args.progress), lambda m: m.snacs_level(),
            STRUCTURED_LEVELS, f"{per_class} activations per class, single shot, no fine-tuning",
        )  # fmt: skip
    elif method == "mint":
        per_class = 50 if args.quick else args.snacs_per_class
        _, row, settings = baseline(
            MINT(per_class=per_class, progress=args.progress), None, STRUCTURED_LEVELS,
            f"{per_class} activations per class, certified level, no fine-tuning",
        )  # fmt: skip
    elif method == "gumbel":
        epochs = 1 if args.quick else args.gumbel_epochs
        pm = GumbelPruning(
            target_density=cfg["gumbel_density"], sparsity_weight=args.gumbel_weight, epochs=epochs,
            device=x.device, progress=args.progress, seed=args.seed,
        )  # fmt: skip
        _, row, settings = baseline(
            pm, lambda m: m.trained_level, GUMBEL_LEVELS,
            f"target density {cfg['gumbel_density']:g}, λ {args.gumbel_weight:g}, {epochs} epochs",
        )  # fmt: skip
    elif method == "self_compression":
        rounds = 1 if args.quick else args.sc_rounds
        round_epochs = 1 if args.quick else args.sc_round_epochs
        pm = SelfCompression(
            "snr", epochs=svi_epochs, rounds=rounds, round_fraction=0.3,
            round_epochs=round_epochs, device=x.device, progress=args.progress, seed=args.seed,
        )  # fmt: skip
        _, row, settings = baseline(
            pm, lambda m: 0.5, STRUCTURED_LEVELS,
            f"{svi_epochs} SVI epochs, {rounds} rounds of 30% x {round_epochs} epochs, level 0.5",
        )  # fmt: skip
    elif method in ("spike_slab", "group_horseshoe"):
        if method == "spike_slab":
            pi = args.prior_inclusion
            prior = bp.priors.SpikeAndSlab(
                level="node", prior_inclusion=pi if pi == "theory" else float(pi)
            )
        else:
            prior = bp.priors.GroupHorseshoe()
        start = time.perf_counter()
        saved = args.posterior_dir and args.posterior_dir / f"{name}-{method}-posterior.safetensors"
        loaded = bool(saved and saved.exists())
        if loaded:
            # fitted by an earlier run (this one or benchmarks/compression.py on the same dense
            # net and splits): the wall time below is then pruning only, and the row says so
            bnet = bp.load(saved, copy.deepcopy(dense), device=x.device)
            print(f"  {method}: posterior loaded from {saved} (no SVI fit)", flush=True)
        else:
            bnet = bp.bayesianize(copy.deepcopy(dense).cpu(), prior=prior, reparam=args.reparam)
            bp.fit(bnet, tr, epochs=svi_epochs, lr=1e-3, kl_weight=args.kl_weight, device=x.device,
                   progress=args.progress, seed=args.seed,
                   structure_delay=args.structure_delay)  # fmt: skip
            if saved:
                saved.parent.mkdir(parents=True, exist_ok=True)
                bnet.save(saved)
        small = bp.prune(bnet, threshold=0.5, example_input=x)
        wall = time.perf_counter() - start
        cert = bp.conformal.certify(bnet, cal, example_input=x, **certify_kw)
        row = _row(name, method, small, dense, x, True, wall, test, cert, 0.5)
        settings = (
            f"{svi_epochs} SVI epochs, β={args.kl_weight:g}, reparam={args.reparam}, PIP >= 0.5, "
            "no fine-tuning"
        )
        if args.structure_delay is not None:
            settings += f", structure_delay {args.structure_delay:g}"
        if loaded:  # the fit settings are those of the run that saved it
            settings = (
                f"posterior loaded from {saved}, PIP >= 0.5, no fine-tuning; wall: pruning only"
            )
        elif method == "spike_slab":
            settings += f", prior inclusion {args.prior_inclusion}"
        for risk in ("error", "disagreement"):
            c = bp.conformal.certify(
                bnet, cal, risk=risk, alpha=PAPER_PROTOCOL["alpha"], delta=PAPER_PROTOCOL["delta"],
                pvalue="binomial", example_input=x, progress=False, train_loader=tr,
            )  # fmt: skip
            proto.append(_proto_row(name, method, risk, c, test))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return {"row": row, "proto": proto, "settings": settings}


def _load_saved(out: Path, models: list[str]) -> list[dict]:
    results = []
    for name in models:
        for method in ("dense", *METHODS):
            path = out / name / f"{method}.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
    return results


def print_table(results: list[dict]) -> None:
    print(f"| model | method | level | test acc | params kept | FLOPs kept | method wall time | "
          f"certified level (α={ALPHA}, δ={DELTA}) | certified acc | certified params |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        r = res["row"]
        kind = "" if r.get("structured", True) else " (non-zeros)"
        print(
            f"| {r['model']} | {LABELS[r['method']]} | {_fmt(r['level'])} | {r['acc']:.4f} | "
            f"{_fmt(r['params'], True)}{kind} | {_fmt(r['flops'], True)} | {r['wall']:.1f} s | "
            f"{_fmt(r.get('cert_level'))} | {_fmt(r.get('cert_acc'))} | "
            f"{_fmt(r.get('cert_params'), True)} |"
        )
    print("\nAlvarez protocol (α=0.03, δ=0.05, exact binomial p-value, fixed sequence):\n")
    print("| model | method | loss | certified level | calibration risk | params kept | test acc |")
    print("|---|---|---|---:|---:|---:|---:|")
    for res in results:
        for r in res["proto"]:
            print(
                f"| {r['model']} | {LABELS[r['method']]} | {r['risk']} | {_fmt(r['level'])} | "
                f"{_fmt(r['risk_hat'])} | {_fmt(r['params'], True)} | {_fmt(r['acc'])} |"
            )
    print("\nSettings per row:\n")
    for res in results:
        r = res["row"]
        print(f"- {r['model']} / {LABELS[r['method']]}: {res['settings']}")
    print("\nProduced by:\n")
    for prov in dict.fromkeys(res["provenance"] for res in results):
        print(f"- {prov}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=None, choices=MODELS,
                   help="default: both LeNets (with --quick: LeNet-300-100)")  # fmt: skip
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--table", action="store_true", help="print the saved results; run nothing")
    p.add_argument("--quick", action="store_true", help="3,000 images, 1-2 epochs (smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cal-size", type=int, default=9000, help="calibration points (Alvarez: 9,000)")
    p.add_argument("--dense-epochs", type=int, default=None, help="override dense training")
    p.add_argument(
        "--dense-dir",
        type=Path,
        default=None,
        help="load <dir>/<model>.safetensors from benchmarks/dense.py instead of training "
        "(its splits hold out 5,000 calibration images: pass --cal-size 5000)",
    )
    p.add_argument("--svi-epochs", type=int, default=None, help="override SVI epochs (ours, SC)")
    p.add_argument(
        "--kl-weight", type=float, default=1.0, help="tempered ELBO β for ours (1 = ELBO)"
    )
    p.add_argument("--prior-inclusion", default="0.1", help="spike-and-slab: float or 'theory'")
    p.add_argument("--reparam", default="local", choices=["local", "shared", "auto"],
                   help="SVI estimator of our priors (bp.bayesianize's reparam)")  # fmt: skip
    p.add_argument("--structure-delay", type=float, default=None,
                   help="bp.fit's structure_delay for our priors (default: fit's)")  # fmt: skip
    p.add_argument("--posterior-dir", type=Path, default=None,
                   help="our priors: load <model>-<method>-posterior.safetensors from here instead "
                   "of fitting (e.g. one saved by benchmarks/compression.py on the same dense net "
                   "and splits), or save the fit there")  # fmt: skip
    p.add_argument("--gumbel-weight", type=float, default=10.0,
                   help="λ of the density term (0.01 in the paper's tutorial, too weak on our data: "
                   "benchmarks/README.md#baselines)")  # fmt: skip
    p.add_argument("--gumbel-epochs", type=int, default=30)
    p.add_argument("--sc-rounds", type=int, default=3, help="self-compression pruning rounds")
    p.add_argument("--sc-round-epochs", type=int, default=5, help="SVI epochs after each round")
    p.add_argument(
        "--snacs-per-class", type=int, default=200, help="SNACS and MINT activations per class"
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--json", type=Path, default=None,
                   help="merge the results into this JSON (e.g. benchmarks/results/baselines.json)")  # fmt: skip
    args = p.parse_args(argv)
    if args.models is None:
        args.models = ["lenet_300_100"] if args.quick else ["lenet_300_100", "lenet5_caffe"]
    if args.table:
        results = _load_saved(args.out, [_folder(m, args) for m in args.models])
        if not results:
            p.error(f"no saved results under {args.out}; run without --table first")
        print_table(results)
        _merge_json(args.json, results)
        return results
    if args.dense_dir is not None and args.cal_size != 5000:
        p.error("--dense-dir nets were trained with 5,000 calibration images held out: "
                "pass --cal-size 5000 so that no calibration image is a training image")  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    splits = load_fashion_mnist(
        seed=args.seed,
        cal_size=2000 if args.quick else args.cal_size,
        subset=3000 if args.quick else None,
    )
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())  # fmt: skip
    provenance = (
        f"`python benchmarks/compare.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
        f"{dev} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, seed "
        f"{args.seed}, splits {splits.sizes()}"
    )
    results = []
    for name in args.models:
        tr = loader(splits.train, 128, seed=args.seed)
        cal = loader(splits.cal, 1000, shuffle=False)
        test = loader(splits.test, 1000, shuffle=False)
        dense = _dense(name, args, splits, tr, device)
        x = next(iter(tr))[0][:1].to(device)
        folder = args.out / _folder(name, args)
        folder.mkdir(parents=True, exist_ok=True)
        for method in ("dense", *args.methods):
            if method == "dense":
                how = f"{_dense_epochs(name, args)} epochs Adam"
                if args.dense_dir is not None:
                    how = f"weights of benchmarks/dense.py from {args.dense_dir}"
                row = _row(name, "dense", dense, dense, x, True, 0.0, test)
                res = {"row": row, "proto": [], "settings": how}
            else:
                res = run_method(method, name, dense, args, tr, cal, test, x)
            res["provenance"] = provenance
            (folder / f"{method}.json").write_text(json.dumps(res, indent=1))
            print(f"[{name}] {LABELS[method]}: {json.dumps(res['row'])}", flush=True)
            results.append(res)
    print()
    print_table(results)
    _merge_json(args.json, results)
    return results


def _merge_json(path: Path | None, results: list[dict]) -> None:
    """Merge ``results`` into the JSON at ``path`` by (model, method, settings)."""
    if path is not None:
        merge_rows(path, results, key=lambda r: (r["row"]["model"], r["row"]["method"],
                   r["settings"]), field="results")  # fmt: skip


if __name__ == "__main__":
    main()
