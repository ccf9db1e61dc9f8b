"""What does a whole default fit cost, step for step, against training the dense net?

The per-step rows of ``benchmarks/svi_speed.py`` time the step of ``bp.fit`` on a fresh net with
random labels and the gates released from the first step: the worst case for the exact tests of
the gate switches (``bayesprune.gate_tests``), which then run at almost every step. This script
times what a user runs, on Fashion-MNIST subsets:

1. ``bp.train(net, loader, epochs=E)``: the dense net (Adam, cross-entropy, batch 128), timed
   around the call: the deterministic loop;
2. ``bp.fit(bp.bayesianize(net), loader, epochs=E, progress=False)`` from that trained net, every
   option at its default, timed around the call (the same batches, the same number of steps).

Both loops first run two steps, untimed, on copies of the net (one-time costs of the process).

Per cell it records the seconds of both, the steps, the gate tests' seconds and count
(``FitResult.gate_tests``) and the gates tested; the ratio per step, with and without the tests'
seconds; and the dense and median-probability pruned nets' test accuracy and size (the fit is
a real one). Cells: a short fit (about 300 steps, 2,000 images) and a longer one (10,000
images) per net, and for the conv nets ResNet-20 and VGG-small a fit of twice that length. The
tests cost about one pass over 256 examples from the tested layer on per gate
tested, whatever the length of the fit, so the short fits show what they add at most::

    python benchmarks/fit_cost.py --threads 1            # every cell (about an hour)
    python benchmarks/fit_cost.py --cells 1 2 --threads 1
    python benchmarks/fit_cost.py --device cuda --json OUT.json   # on a GPU (gpu_check.sh)

Rows are merged by cell into ``benchmarks/results/fit_cost.json`` (written atomically); the table
of ``docs/fit-cost.md`` is generated from it by ``benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from results_io import merge_rows

import bayesprune as bp
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.models import get_model

RESULTS = Path(__file__).parent / "results" / "fit_cost.json"
BATCH = 128

# id: (net, training images, epochs). Short: about 300 steps; long: 10,000 images (and
# 20 epochs of them for the conv nets: what the tests add to a fit of twice the steps).
CELLS = {
    1: ("lenet_300_100", 2000, 19),
    2: ("lenet_300_100", 10000, 20),
    3: ("lenet5_caffe", 2000, 19),
    4: ("lenet5_caffe", 10000, 10),
    5: ("resnet20", 2000, 19),
    6: ("resnet20", 10000, 10),
    7: ("vgg_small", 2000, 19),
    8: ("vgg_small", 10000, 10),
    9: ("resnet20", 10000, 20),
    10: ("vgg_small", 10000, 20),
}


def _warm_up(net: torch.nn.Module, train, device: str) -> None:
    """Two steps of each loop on copies of ``net``, untimed, so that neither timed call pays
    the process's one-time costs (thread pools, allocator, first kernels)."""
    batches = [b for b, _ in zip(train, range(2), strict=False)]
    bp.train(copy.deepcopy(net), batches, epochs=1, progress=False, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnet = bp.bayesianize(copy.deepcopy(net).to(device))
        bp.fit(bnet, batches, epochs=1, progress=False, num_data=len(train.dataset), device=device)


def run_cell(cell: int, seed: int = 0, device: str = "cpu") -> dict:
    name, n, epochs = CELLS[cell]
    splits = load_fashion_mnist(subset=n, val_size=2000, cal_size=1000)
    train = loader(splits.train, BATCH, seed=seed)
    test = loader(splits.test, 1000, shuffle=False)
    torch.manual_seed(seed)
    net = get_model(name)
    _warm_up(net, train, device)
    start = time.perf_counter()
    bp.train(net, train, epochs=epochs, progress=False, seed=seed, device=device)
    _sync(device)
    dense_s = time.perf_counter() - start
    dense_acc = bp.evaluate(net, test)
    dense_params = bp.count_params(net)
    bnet = bp.bayesianize(net)
    start = time.perf_counter()
    fit = bp.fit(bnet, train, epochs=epochs, progress=False, seed=seed, device=device)
    _sync(device)
    fit_s = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = bp.prune(bnet, threshold=0.5)
    steps = len(fit.loss)
    tests = fit.gate_tests
    tests_s = tests.get("seconds", 0.0)
    gates = sum(p.numel() for p in bnet.gate_parameters())
    per_dense, per_fit = dense_s / steps, fit_s / steps
    return {
        "cell": cell,
        "seed": seed,
        "net": name,
        "train_images": len(splits.train),
        "epochs": epochs,
        "steps": steps,
        "dense_seconds": round(dense_s, 2),
        "fit_seconds": round(fit_s, 2),
        "tests_seconds": tests_s,
        "tests": tests.get("tests", 0),
        "gates": gates,
        "ratio": round(per_fit / per_dense, 3),
        "ratio_without_tests": round((fit_s - tests_s) / steps / per_dense, 3),
        "dense_ms_per_step": round(1000 * per_dense, 2),
        "fit_ms_per_step": round(1000 * per_fit, 2),
        "dense": round(dense_acc, 4),
        "pruned": round(bp.evaluate(small, test), 4),
        "params": round(bp.count_params(small) / dense_params, 4),
        "gate_tests": tests,
    }


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=sorted(CELLS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (benchmarks/gpu_check.sh)")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cells if c not in CELLS]
    if unknown:
        parser.error(f"unknown cell(s) {unknown}: the cells are {sorted(CELLS)}")
    torch.set_num_threads(args.threads)
    command = "python benchmarks/fit_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    gpu = torch.device(args.device).type == "cuda"
    meta = {
        "device": torch.cuda.get_device_name()
        if gpu
        else f"cpu ({platform.machine()}), {args.threads} thread(s)",
        "torch": torch.__version__,
        "batch": BATCH,
    }
    rows = []
    for cell in args.cells:
        row = {**run_cell(cell, args.seed, args.device), **meta, "command": command.strip()}
        print(
            f"cell {cell} {row['net']} {row['train_images']} x {row['epochs']} epochs: "
            f"{row['steps']} steps, dense {row['dense_ms_per_step']} ms/step, fit "
            f"{row['fit_ms_per_step']} ms/step ({row['ratio']}x; without the tests "
            f"{row['ratio_without_tests']}x), {row['tests']} tests of {row['gates']} gates in "
            f"{row['tests_seconds']} s; dense {row['dense']}, pruned {row['pruned']} at "
            f"{row['params']:.1%} of the parameters",
            flush=True,
        )
        rows.append(row)
        merge_rows(args.json, [row], key=lambda r: (r["cell"], r["seed"]))
    return rows


if __name__ == "__main__":
    main()
