"""How accurate can a LeNet-300-100-shaped net be at a parameter budget, trained from scratch?

A feasibility check for the issue-4 goal on LeNet-300-100 (at most 10% of the parameters, at most
1 point below dense). For a grid of shapes ``k-h1-h2-10`` whose parameter count fits the budget, a
fresh net is trained with the dense recipe of ``benchmarks/compression.py`` (20 epochs, Adam,
lr 1e-3, cosine schedule, batch 128) on the same Fashion-MNIST training split, several seeds each,
and tested, next to the dense net trained with the same seeds. ``k < 784`` keeps only ``k`` input
pixels: the ``k`` columns of largest L2 norm in the first layer of a dense LeNet-300-100 trained in
the same run (the input pruning of the MNIST literature, e.g. Bayesian Compression's LeNet-300-100
rows, done here with a magnitude criterion).
For each ``(k, h2)`` the first hidden layer gets the largest width the budget allows.

``benchmarks/scratch.py`` measures what node pruning and fine-tuning add over training the same
widths from scratch (``docs/notes/benchmark-history.md``, "Pruned widths from scratch"); this table
says how far the best small shapes are from the goal before that.

    python benchmarks/frontier.py                        # CPU, 3 seeds, 10% budget
    python benchmarks/frontier.py --budget 0.2 --seeds 0
    python benchmarks/frontier.py --epochs 60 --inputs 784 500 --second 48   # a longer recipe

``--epochs`` trains every net, the dense ones included, for that many epochs instead of the dense
recipe's 20 (the cosine schedule spans them all). ``--json PATH`` also writes the table there
(atomically); the table of ``benchmarks/README.md#frontier`` is generated from
``benchmarks/results/frontier.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compression import SETTINGS
from results_io import write_json

from bayesprune.data import load_fashion_mnist, loader
from bayesprune.metrics import count_params
from bayesprune.models import lenet_300_100
from bayesprune.train import evaluate, resolve_device, train

INPUTS = (784, 600, 500, 400, 300)
SECOND = (24, 48)


def mlp(k: int, h1: int, h2: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(k, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10)
    )


def widest_first_layer(k: int, h2: int, budget: int) -> int:
    """Largest ``h1`` with ``(k + 1) h1 + (h1 + 1) h2 + (h2 + 1) 10 <= budget``."""
    return (budget - 11 * h2 - 10) // (k + 1 + h2)


def _subset(ds: TensorDataset, idx: torch.Tensor | None) -> TensorDataset:
    x, y = ds.tensors
    x = x.flatten(1)
    return TensorDataset(x if idx is None else x[:, idx], y)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.10, help="fraction of LeNet-300-100's params")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--inputs", nargs="+", type=int, default=list(INPUTS))
    p.add_argument("--second", nargs="+", type=int, default=list(SECOND))
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's 20 epochs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action="store_true")
    p.add_argument(
        "--json", type=Path, default=None, help="also write the table there (written atomically)"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0 < args.budget <= 1:
        raise SystemExit(f"--budget is a fraction in (0, 1], got {args.budget}")
    if any(not 1 <= k <= 784 for k in args.inputs):
        raise SystemExit(f"--inputs must lie in 1..784, got {args.inputs}")

    device = resolve_device(args.device)
    cfg = dict(SETTINGS["lenet_300_100"])
    if args.epochs is not None:
        if args.epochs < 1:
            raise SystemExit(f"--epochs must be positive, got {args.epochs}")
        cfg["epochs"] = args.epochs
    splits = load_fashion_mnist(seed=0)

    def fit(net: nn.Module, idx: torch.Tensor | None, seed: int) -> float:
        torch.manual_seed(seed)
        train(net, loader(_subset(splits.train, idx), 128, seed=seed), epochs=cfg["epochs"],
              lr=cfg["lr"], device=device, seed=seed, progress=args.progress)  # fmt: skip
        return evaluate(net, loader(_subset(splits.test, idx), 1024, shuffle=False), device=device)

    denses = [lenet_300_100() for _ in args.seeds]
    dense_accs = [fit(net, None, seed) for net, seed in zip(denses, args.seeds, strict=True)]
    dense_acc = statistics.fmean(dense_accs)
    dense = denses[0]
    full = count_params(dense)
    budget = int(args.budget * full)
    # input pixels ranked by the L2 norm of their column in the first seed's dense first layer
    ranked = dense[1].weight.detach().cpu().norm(dim=0).argsort(descending=True)

    print(
        f"dense LeNet-300-100: mean {dense_acc:.4f} over seeds {args.seeds} "
        f"({' '.join(f'{a:.4f}' for a in dense_accs)}), {full:,} parameters; budget {budget:,}"
    )
    print(
        "| inputs | widths | params | params kept | seeds | mean acc | min | max | mean - dense (points) |"
    )
    print("|---:|---|---:|---:|---|---:|---:|---:|---:|")
    results = []
    for k in args.inputs:
        idx = None if k == 784 else ranked[:k].sort().values
        for h2 in args.second:
            h1 = widest_first_layer(k, h2, budget)
            if h1 < 1:
                continue
            accs = [fit(mlp(k, h1, h2), idx, seed) for seed in args.seeds]
            n = count_params(mlp(k, h1, h2))
            mean = statistics.fmean(accs)
            results.append(dict(inputs=k, h1=h1, h2=h2, params=n, accs=accs, mean=mean))
            print(
                f"| {k} | {k}-{h1}-{h2}-10 | {n:,} | {100 * n / full:.2f}% | "
                f"{' '.join(map(str, args.seeds))} | {mean:.4f} | {min(accs):.4f} | "
                f"{max(accs):.4f} | {100 * (mean - dense_acc):+.2f} |",
                flush=True,
            )
    if args.json is not None:
        meta = dict(
            command="python benchmarks/frontier.py " + " ".join(sys.argv[1:] if argv is None else argv),
            device=f"{device}, {torch.get_num_threads()} thread(s)", torch=torch.__version__,
            seeds=args.seeds, epochs=cfg["epochs"], budget=budget, dense_accs=dense_accs,
            dense_mean=dense_acc,
        )  # fmt: skip
        rows = [
            dict(r, params_kept=r["params"] / full, min=min(r["accs"]), max=max(r["accs"]),
                 delta_points=100 * (r["mean"] - dense_acc))
            for r in results
        ]  # fmt: skip
        write_json(args.json, {"meta": meta, "rows": rows})
    best = max(results, key=lambda r: r["mean"])
    print(
        f"\nBest mean: {best['inputs']}-{best['h1']}-{best['h2']}-10 at {best['mean']:.4f}, "
        f"{100 * (best['mean'] - dense_acc):+.2f} points against the dense mean. Recipe: {cfg['epochs']} "
        f"epochs, lr {cfg['lr']:g}, Adam, cosine, batch 128; on {device}, torch {torch.__version__}"
    )
    return results


if __name__ == "__main__":
    main()
