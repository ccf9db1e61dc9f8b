"""Structured compression on Fashion-MNIST: dense vs spike-and-slab vs group horseshoe.

For each network the dense model is trained (or loaded from ``benchmarks/dense.py``'s ``--out``),
bayesianized with a node-level prior, fitted with SVI, pruned at PIP >= ``--threshold`` into a
physically smaller plain network (``bp.prune``), optionally fine-tuned, and compared with the dense
net: test accuracy, % parameters and % FLOPs kept, nodes per layer (in the form of the literature:
conv filters, then the inputs of each Linear, e.g. LeNet-5-Caffe ``20-50-800-500``), and the
measured CPU latency speed-up at batch 1 and 256 next to the FLOP reduction (a count, not a timing).

A ``magnitude`` row (keep each hidden layer's ``--magnitude-keep`` fraction of nodes with the
largest weight norms, then fine-tune) checks the plumbing without the Bayesian core.

    python benchmarks/compression.py --device cuda                   # all models in one run (GPU)
    python benchmarks/compression.py --models lenet_300_100 --epochs 10 --finetune-epochs 5  # one model
    python benchmarks/compression.py --table                         # the table from the saved rows
    python benchmarks/compression.py --quick --methods magnitude     # CPU smoke run (subset, 1 epoch)

Each model's rows are saved to ``<out>/<model>.json`` (a rerun of one method replaces that
method's row), so long runs can be split per model and method; ``--table`` prints every saved row.
``--json PATH`` merges the rows (of this run, with its command, or with ``--table`` the saved ones)
into the JSON at ``PATH`` by (model, method, settings), written atomically: the table of
``benchmarks/README.md#compression`` is generated from ``benchmarks/results/compression.json``.

Latency is always measured on the CPU (``--threads`` threads, median of repeated runs after warm-up),
whatever device trains the nets. The dense row's speed-up compares the dense net with itself: it
shows the timing noise.

Before fine-tuning, the pruned net's test accuracy is recorded, and for nets with BatchNorm also
after ``bp.recalibrate_batchnorm`` on ``--recalibrate-batches`` training batches (fine-tuning then
starts from the recalibrated net).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import tables
import torch
from results_io import merge_rows
from safetensors.torch import load_file, save_file

import bayesprune as bp
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.models import get_model
from bayesprune.pruning import architecture_string, compression_report, prune_module, save_pruned
from bayesprune.train import evaluate, resolve_device, train

MODELS = ("lenet_300_100", "lenet5_caffe", "resnet20")
# dense training (as benchmarks/dense.py) and SVI settings per net
SETTINGS = {
    "lenet_300_100": dict(epochs=20, lr=1e-3, svi_epochs=30, svi_lr=1e-3),
    "lenet5_caffe": dict(epochs=20, lr=1e-3, svi_epochs=30, svi_lr=1e-3),
    "resnet20": dict(epochs=15, lr=2e-3, svi_epochs=20, svi_lr=1e-3),
}
METHODS = ("spike_slab", "group_horseshoe", "magnitude")


def _prior(method: str, args):
    if method == "spike_slab":
        inclusion = args.prior_inclusion
        if inclusion != "theory":
            inclusion = float(inclusion)
        return bp.priors.SpikeAndSlab(level="node", prior_inclusion=inclusion)
    if method == "group_horseshoe":
        return bp.priors.GroupHorseshoe(global_scale=args.global_scale)
    raise ValueError(method)


def _dense(name: str, args, splits, device) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    net = get_model(name)
    weights = args.dense_dir / f"{name}.safetensors"
    if weights.exists() and not args.quick:
        net.load_state_dict(load_file(str(weights)))
        print(f"{name}: dense weights loaded from {weights}", flush=True)
        return net
    cfg = SETTINGS[name]
    epochs = args.dense_epochs or (1 if args.quick else cfg["epochs"])
    train(
        net,
        loader(splits.train, 128, seed=args.seed),
        epochs=epochs,
        lr=cfg["lr"],
        device=device,
        seed=args.seed,
        progress=args.progress,
    )
    return net.cpu()


def _bayesian(name: str, method: str, dense, args, splits, device, x1) -> torch.nn.Module:
    if not hasattr(bp, "bayesianize"):
        raise RuntimeError("the Bayesian core (bp.bayesianize, issue 3) is not available yet")
    cfg = SETTINGS[name]
    epochs = args.epochs or (1 if args.quick else cfg["svi_epochs"])
    saved = (
        args.posterior_dir / f"{name}-{method}-posterior.safetensors"
        if args.posterior_dir
        else None
    )
    if saved is not None and saved.exists():
        bnet = bp.load(saved, copy.deepcopy(dense), device=device)
        print(f"  {method}: posterior loaded from {saved} (no SVI fit)", flush=True)
    else:
        bnet = bp.bayesianize(
            copy.deepcopy(dense),
            prior=_prior(method, args),
            reparam=args.reparam,
            weight_sd=args.weight_sd,
        )
        bp.fit(
            bnet,
            loader(splits.train, 128, seed=args.seed),
            epochs=epochs,
            lr=args.svi_lr or cfg["svi_lr"],
            device=device,
            seed=args.seed,
            kl_weight=args.kl_weight,
            progress=args.progress,
            structure_delay=args.structure_delay,
        )
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            bnet.save(saved)
    pips = bnet.inclusion_probs()
    kept = sum(int((p >= args.threshold).sum()) for p in pips.values())
    total = sum(p.numel() for p in pips.values())
    print(f"  {method}: {kept}/{total} gated nodes have PIP >= {args.threshold}", flush=True)
    rule = dict(keep=args.keep) if args.keep is not None else dict(threshold=args.threshold)
    return bp.prune(
        bnet, example_input=x1, round_to=args.round_to, min_nodes=args.min_nodes, **rule
    )


def _magnitude(dense, args, x1) -> torch.nn.Module:
    layers = {
        n: m for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    }
    layers.pop(list(layers)[-1])  # the output layer is never pruned
    scores = {n: m.weight.detach().flatten(1).norm(dim=1) for n, m in layers.items()}
    masks = {}
    for n, s in scores.items():
        k = max(1, round(args.magnitude_keep * s.numel()))
        masks[n] = torch.zeros(s.numel(), dtype=torch.bool)
        masks[n][torch.argsort(-s)[:k]] = True
    return prune_module(dense, masks, x1, scores=scores, round_to=args.round_to)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", type=int, default=None, help="override the SVI epochs")
    parser.add_argument("--dense-epochs", type=int, default=None, help="override dense training")
    parser.add_argument("--svi-lr", type=float, default=None, help="override the SVI learning rate")
    parser.add_argument("--prior-inclusion", default="0.1", help="spike-and-slab: float or theory")
    parser.add_argument("--global-scale", type=float, default=1.0, help="group horseshoe tau scale")
    parser.add_argument(
        "--kl-weight", type=float, default=1.0, help="tempered ELBO weight beta (1 = Bayesian)"
    )
    parser.add_argument("--table", action="store_true", help="print the saved rows; run nothing")
    parser.add_argument("--progress", action="store_true", help="tqdm bars for SVI")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 2,000 images (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.5, help="keep nodes with PIP >= this")
    parser.add_argument(
        "--keep",
        type=float,
        default=None,
        help="instead of --threshold: keep this fraction of "
        "hidden nodes with the highest PIPs, ranked across layers",
    )
    parser.add_argument(
        "--reparam", default="local", choices=["local", "shared", "auto"], help="SVI estimator"
    )
    parser.add_argument(
        "--weight-sd", default="per_weight", choices=["per_weight", "rank1"], help="sd family"
    )
    parser.add_argument("--round-to", type=int, default=None, help="round kept widths up (e.g. 8)")
    parser.add_argument(
        "--min-nodes",
        type=int,
        default=1,
        help="per-layer floor of bp.prune; 0 removes a residual branch the posterior switches off",
    )
    parser.add_argument(
        "--structure-delay",
        type=float,
        default=None,
        help="bp.fit's structure_delay (fraction of the steps with frozen gates; default: fit's)",
    )
    parser.add_argument(
        "--posterior-dir",
        type=Path,
        default=None,
        help="load <model>-<method>-posterior.safetensors from here instead of fitting, or save "
        "the fit there when it is missing (one fit, several pruning settings)",
    )
    parser.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune Bayesian prunes")
    parser.add_argument("--magnitude-keep", type=float, default=0.1)
    parser.add_argument("--magnitude-finetune-epochs", type=int, default=5)
    parser.add_argument(
        "--recalibrate-batches",
        type=int,
        default=100,
        help="re-estimate BatchNorm statistics of a pruned net on this many training batches "
        "before fine-tuning (0: off)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for latency")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per latency")
    parser.add_argument("--dense-dir", type=Path, default=Path("runs/dense"))
    parser.add_argument("--out", type=Path, default=Path("runs/compression"))
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="merge the rows into this JSON (e.g. benchmarks/results/compression.json)",
    )
    args = parser.parse_args(argv)
    if args.table:
        rows = []
        for path in sorted(args.out.glob("*.json")):
            rows += json.loads(path.read_text())
        order = {m: i for i, m in enumerate(MODELS)}
        rows.sort(key=lambda r: order.get(r["model"], len(order)))
        _print_table(rows)
        _merge_json(args.json, rows)
        return rows

    device = resolve_device(args.device)
    splits = load_fashion_mnist(seed=args.seed, subset=2000 if args.quick else None)
    test_loader = loader(splits.test, 1024, shuffle=False)
    x1 = splits.test.tensors[0][:1]
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu

    def settings(method: str, ft: int, dev) -> dict:
        cfg = SETTINGS[name]
        common = f"training on {dev_name}, latency on CPU ({args.threads} thread(s)), torch {torch.__version__}, seed {args.seed}"
        if method == "dense":
            return dict(label="dense", settings=common)
        if method == "magnitude":
            what = f"keep {args.magnitude_keep:.0%} of each hidden layer by weight norm"
            return dict(label="magnitude", settings=f"{what}, fine-tune {ft} epoch(s); {common}")
        epochs = args.epochs or (1 if args.quick else cfg["svi_epochs"])
        rule = f"keep {args.keep}" if args.keep is not None else f"PIP >= {args.threshold}"
        rule += f", min_nodes {args.min_nodes}"
        if args.round_to:
            rule += f", round_to {args.round_to}"
        if args.posterior_dir:
            rule += f", posterior saved in / loaded from {args.posterior_dir}"
        label = {"spike_slab": "spike-and-slab", "group_horseshoe": "group horseshoe"}[method]
        if args.kl_weight != 1:
            label += f" (β={args.kl_weight:g})"
        estimator = f"reparam={args.reparam}, sd family {args.weight_sd}"
        if method == "group_horseshoe":
            estimator += f", global scale {args.global_scale:g}"
        if args.structure_delay is not None:
            estimator += f", structure_delay {args.structure_delay:g}"
        return dict(
            label=label,
            settings=f"{epochs} SVI epochs, β={args.kl_weight:g}, {estimator}, {rule}, "
            f"fine-tune {ft} epoch(s); {common}",
        )

    all_rows = []
    for name in args.models:
        rows = []
        dense = _dense(name, args, splits, device)
        save_file(dense.state_dict(), str(args.out / f"dense-{name}.safetensors"))
        dense_acc = evaluate(dense, test_loader, device=device)
        dense.cpu()
        rows.append(_row(name, "dense", dense, dense, dense_acc, dense_acc, x1, args, 0.0))
        rows[-1].update(settings("dense", 0, device))
        for method in args.methods:
            start = time.perf_counter()
            try:
                if method == "magnitude":
                    small = _magnitude(dense, args, x1)
                    ft = args.magnitude_finetune_epochs
                else:
                    small = _bayesian(name, method, dense, args, splits, device, x1)
                    ft = args.finetune_epochs
            except RuntimeError as exc:
                print(f"  {method}: skipped ({exc})", flush=True)
                continue
            # the stages before fine-tuning, for the record (not timed apart)
            stages = {"acc_pruned": evaluate(small, test_loader, device=device)}
            if args.recalibrate_batches and any(
                isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in small.modules()
            ):
                bp.recalibrate_batchnorm(
                    small,
                    loader(splits.train, 128, seed=args.seed),
                    num_batches=args.recalibrate_batches,
                    device=device,
                    progress=args.progress,
                )
                stages["acc_recalibrated"] = evaluate(small, test_loader, device=device)
            print(f"  {method}: before fine-tuning {stages}", flush=True)
            if ft:
                bp.finetune(
                    small,
                    loader(splits.train, 128, seed=args.seed),
                    epochs=1 if args.quick else ft,
                    lr=1e-3,
                    device=device,
                    seed=args.seed,
                    progress=args.progress,
                )
            acc = evaluate(small, test_loader, device=device)
            small.cpu()
            save_pruned(small, args.out / f"{name}-{method}.safetensors")
            seconds = time.perf_counter() - start
            row = _row(name, method, dense, small, acc, dense_acc, x1, args, seconds)
            row.update(settings(method, ft, device), **stages)
            rows.append(row)
            print(f"  {method}: test accuracy {acc:.4f} ({seconds:.0f} s)", flush=True)
        _save_rows(args.out / f"{name}{'-quick' if args.quick else ''}.json", rows)
        all_rows += rows
    _print_table(all_rows)
    command = "python benchmarks/compression.py " + " ".join(sys.argv[1:] if argv is None else argv)
    _merge_json(args.json, [dict(r, command=command) for r in all_rows])
    return all_rows


def _merge_json(path: Path | None, rows: list[dict]) -> None:
    """Merge ``rows`` into the JSON at ``path`` by (model, method, settings without the clauses
    every row shares)."""
    if path is not None:
        merge_rows(
            path,
            rows,
            key=lambda r: (r["model"], r["method"], tables.short_settings(r.get("settings", ""))),
        )


def _save_rows(path: Path, rows: list[dict]) -> None:
    """Merge ``rows`` into the saved rows of ``path``: a (model, method) pair run again replaces its row."""
    old = json.loads(path.read_text()) if path.exists() else []
    new = {(r["model"], r["method"]) for r in rows}
    merged = [r for r in old if (r["model"], r["method"]) not in new] + rows
    order = {m: i for i, m in enumerate(("dense", *METHODS))}
    merged.sort(key=lambda r: order.get(r["method"], len(order)))
    path.write_text(json.dumps(merged, indent=1))


def _print_table(rows: list[dict]) -> None:
    print("\nStructured compression on Fashion-MNIST (latency: CPU, median of repeated runs)\n")
    print(
        "| model | method | test acc | Δ acc (points) | params kept | FLOPs kept | nodes per layer "
        "| CPU speed-up b1 | b256 | FLOP reduction | speed-up / FLOP reduction (b1, b256) |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r.get('label', r['method'])} | {r['test_acc']:.4f} | {r['delta_points']:+.2f} | "
            f"{100 * r['params_kept']:.2f}% | {100 * r['flops_kept']:.2f}% | {r['nodes']} | "
            f"{r['speedup_b1']:.2f}x | {r['speedup_b256']:.2f}x | {r['flop_reduction']:.2f}x | "
            f"{r['speedup_b1'] / r['flop_reduction']:.2f}, "
            f"{r['speedup_b256'] / r['flop_reduction']:.2f} |"
        )
    print(
        "\nPublished structured anchors for LeNet-5-Caffe 20-50-800-500 on MNIST (not Fashion-MNIST; "
        "for the form of the rows only): Structured Bayesian Pruning 3-18-284-283, 0.86% error, "
        "10.5x fewer FLOPs, 5.4x CPU speed-up; BC-GHS 5-10-76-16 (158K FLOPs) and BC-GNJ "
        "8-13-88-13, 1.0% error; SS-GHS (Jantre et al.) about 2.9% of weights at 98.98% accuracy."
    )
    staged = [r for r in rows if "acc_pruned" in r]
    if staged:
        print("\nTest accuracy before fine-tuning (pruned; after BatchNorm recalibration):")
        for r in staged:
            recal = r.get("acc_recalibrated")
            print(
                f"- {r['model']} / {r.get('label', r['method'])}: {r['acc_pruned']:.4f}; "
                f"{'no BatchNorm' if recal is None else f'{recal:.4f}'}"
            )
    print("\nSettings per row:")
    for r in rows:
        if "settings" in r:
            print(f"- {r['model']} / {r.get('label', r['method'])}: {r['settings']}")


def _row(name, method, dense, small, acc, dense_acc, x1, args, seconds) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rep = compression_report(
            dense, small, x1, device="cpu", batch_sizes=(1, 256), repeats=args.repeats
        )
    finally:
        torch.set_num_threads(threads)
    return dict(
        model=name,
        method=method,
        test_acc=acc,
        delta_points=100 * (acc - dense_acc),
        params=rep.params_after,
        params_kept=rep.params_kept,
        flops=rep.flops_after,
        flops_kept=rep.flops_kept,
        flop_reduction=rep.flop_reduction,
        nodes=architecture_string(small),
        dense_nodes=architecture_string(dense),
        speedup_b1=rep.speedup[1],
        speedup_b256=rep.speedup[256],
        latency_s={str(k): v for k, v in rep.latency.items()},
        seconds=seconds,
    )


if __name__ == "__main__":
    main()
