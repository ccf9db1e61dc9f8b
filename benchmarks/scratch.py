"""The pruned architectures trained from scratch: does pruning beat training the small net directly?

The control of Liu et al. ("Rethinking the value of network pruning", 2019). For every pruned
network that ``benchmarks/compression.py`` saved (``<run>/<model>-<method>.safetensors`` with its
row in ``<run>/<model>.json``), the same widths are re-initialised at random and trained on the
same Fashion-MNIST training split as the dense net (same epochs, learning rate and schedule as
``compression.py``'s dense training), then tested. The table puts the pruned (and fine-tuned)
accuracy next to the from-scratch accuracy of the same architecture, one row per seed.

    python benchmarks/scratch.py runs/compression_e60 runs/compression_b05   # CPU
    python benchmarks/scratch.py runs/compression_e60 --seeds 0 1 2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compression import SETTINGS

from bayesprune.data import load_fashion_mnist, loader
from bayesprune.metrics import count_params
from bayesprune.models import get_model
from bayesprune.pruning import architecture_string, load_pruned
from bayesprune.train import evaluate, resolve_device, train


def _reinitialise(net: torch.nn.Module) -> torch.nn.Module:
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return net


def _pruned_rows(run: Path) -> list[tuple[dict, Path]]:
    out = []
    for table in sorted(run.glob("*.json")):
        rows = json.loads(table.read_text())
        if not isinstance(rows, list):  # e.g. latency-<model>.json of benchmarks/latency.py
            continue
        for row in rows:
            path = run / f"{row['model']}-{row['method']}.safetensors"
            if row["method"] != "dense" and path.exists():
                out.append((row, path))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="output folders of benchmarks/compression.py")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    found = [(run, row, path) for run in args.runs for row, path in _pruned_rows(run)]
    if not found:
        raise SystemExit(
            f"no pruned network with a saved row in {[str(r) for r in args.runs]}: "
            "run benchmarks/compression.py first (it writes <model>-<method>.safetensors)"
        )
    device = resolve_device(args.device)
    splits = load_fashion_mnist(seed=0)
    test = loader(splits.test, 1024, shuffle=False)
    results = []
    print(
        "| run | model | method | nodes per layer | params | pruned acc | dense acc | seed "
        "| scratch acc | scratch - pruned (points) |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for run, row, path in found:
        name = row["model"]
        cfg = SETTINGS[name]
        pruned = load_pruned(path, lambda name=name: get_model(name))
        dense_acc = row["test_acc"] - row["delta_points"] / 100
        for seed in args.seeds:
            torch.manual_seed(seed)
            net = _reinitialise(load_pruned(path, lambda name=name: get_model(name)))
            train(
                net,
                loader(splits.train, 128, seed=seed),
                epochs=cfg["epochs"],
                lr=cfg["lr"],
                device=device,
                seed=seed,
                progress=args.progress,
            )
            acc = evaluate(net, test, device=device)
            res = dict(
                run=str(run), model=name, method=row.get("label", row["method"]),
                nodes=architecture_string(pruned), params=count_params(pruned),
                pruned_acc=row["test_acc"], dense_acc=dense_acc, seed=seed, scratch_acc=acc,
            )  # fmt: skip
            results.append(res)
            print(
                f"| {run} | {name} | {res['method']} | {res['nodes']} | {res['params']:,} | "
                f"{res['pruned_acc']:.4f} | {dense_acc:.4f} | {seed} | {acc:.4f} | "
                f"{100 * (acc - res['pruned_acc']):+.2f} |",
                flush=True,
            )
    recipe = ", ".join(f"{k} {v['epochs']} epochs at lr {v['lr']:g}" for k, v in SETTINGS.items())
    print(
        f"\nScratch training: {recipe} (Adam, cosine schedule, batch 128), on {device}, "
        f"torch {torch.__version__}"
    )
    return results


if __name__ == "__main__":
    main()
