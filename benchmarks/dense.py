"""Dense reference rows: train each reference net on Fashion-MNIST; print accuracy, params and FLOPs.

The pruning benchmarks load these nets (``--dense-dir runs/dense``) and compare their pruned nets
with them (``benchmarks/README.md``); the dense reference rows of an H100 run are in
``docs/notes/benchmark-history.md``.

    python benchmarks/dense.py --device cuda            # the H100 run of the notes
    python benchmarks/dense.py --quick                  # a smoke run on the CPU (subset, 1 epoch)

Trained weights are written to ``--out`` (safetensors) for later benchmarks to reuse.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bayesprune.data import load_fashion_mnist, loader
from bayesprune.metrics import count_flops, count_params
from bayesprune.models import get_model
from bayesprune.train import evaluate, resolve_device, train

# epochs and learning rate per net: enough for the dense nets to converge on Fashion-MNIST
SETTINGS = {
    "lenet_300_100": dict(epochs=20, lr=1e-3),
    "lenet5_caffe": dict(epochs=20, lr=1e-3),
    "vgg_small": dict(epochs=15, lr=1e-3),
    "resnet20": dict(epochs=15, lr=2e-3),
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=None, help="override the per-model epochs")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 2,000 images (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/dense"))
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    splits = load_fashion_mnist(seed=args.seed, subset=2000 if args.quick else None)
    test_loader = loader(splits.test, 1024, shuffle=False)
    x1 = splits.test.tensors[0][:1]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        cfg = dict(SETTINGS[name])
        if args.quick:
            cfg["epochs"] = 1
        if args.epochs:
            cfg["epochs"] = args.epochs
        torch.manual_seed(args.seed)
        net = get_model(name)
        start = time.perf_counter()
        train(net, loader(splits.train, 128, seed=args.seed), device=device, seed=args.seed, **cfg)
        seconds = time.perf_counter() - start
        acc = evaluate(net, test_loader, device=device)
        net.cpu()
        save_file(
            {k: v.contiguous() for k, v in net.state_dict().items()},
            args.out / f"{name}.safetensors",
        )
        rows.append(
            dict(model=name, epochs=cfg["epochs"], test_acc=acc, params=count_params(net),
                 flops=count_flops(net, x1), train_s=seconds)
        )  # fmt: skip
        print(f"{name}: test accuracy {acc:.4f}", flush=True)

    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "CPU"
    )
    print(
        f"\nDense baselines on Fashion-MNIST ({dev_name}, torch {torch.__version__}, seed {args.seed})\n"
    )
    print("| model | epochs | test acc | params | FLOPs (MACs) | train time |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['epochs']} | {r['test_acc']:.4f} | {r['params']:,} | "
            f"{r['flops']:,} | {r['train_s']:.0f} s |"
        )
    return rows


if __name__ == "__main__":
    main()
