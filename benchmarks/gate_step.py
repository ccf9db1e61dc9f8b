"""Short fits: the fixed natural-gradient gate step against one tied to the step budget.

``bp.fit``'s gate step is ``gate_step=0.01`` whatever the length of the fit. A lead of issue
"Posteriors that prune well out of the box" is a gate schedule tied to the planned number of
steps. This compares, on LeNet-300-100 started from its trained dense net (digits, and 2,000
Fashion-MNIST images), ``gate_step=0.01`` with ``gate_step = clip(5 / active steps, 0.01, 0.5)``
(active: after the gate freeze of ``structure_delay``), for fits of a few dozen to a few hundred
steps: test accuracy of the predictive and of ``prune(threshold=0.5)``, parameters kept, share
of hidden PIPs in [0.1, 0.9].

    python benchmarks/gate_step.py --threads 1       # CPU, about 2 minutes

Writes ``benchmarks/results/gate_step.json`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from pathlib import Path

import torch
from results_io import write_json
from torch import nn

import bayesprune as bp
from bayesprune.data import load_digits, load_fashion_mnist, loader
from bayesprune.models import lenet_300_100

RESULTS = Path(__file__).parent / "results" / "gate_step.json"
CASES = {"digits": [1, 3, 5, 10], "fmnist-2000": [2, 5, 19]}  # data -> SVI epochs


def _data(name: str):
    if name == "digits":
        return load_digits(seed=0), 64, 60
    return load_fashion_mnist(subset=2000, val_size=2000, cal_size=1000), 784, 20


def run(name: str, epochs: list[int]) -> list[dict]:
    splits, d_in, dense_epochs = _data(name)
    train = loader(splits.train, 128, seed=0)
    test = loader(splits.test, 512, shuffle=False)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), *lenet_300_100(in_features=d_in))
    bp.train(net, train, epochs=dense_epochs, progress=False, seed=0)
    dense = bp.evaluate(net, test)
    rows = []
    for ep in epochs:
        steps = ep * len(train)
        active = max(1, steps - min(int(0.1 * steps), len(train)))
        for rule, step in (("fixed", 0.01), ("tied", min(0.5, max(0.01, 5 / active)))):
            bnet = bp.bayesianize(net)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit = bp.fit(bnet, train, epochs=ep, progress=False, seed=0, gate_step=step)
                small = bp.prune(bnet, threshold=0.5)
            pips = torch.cat([p for k, p in bnet.inclusion_probs().items() if k in fit.nodes_off])
            rows.append(
                {
                    "data": name,
                    "epochs": ep,
                    "steps": steps,
                    "rule": rule,
                    "gate_step": round(step, 4),
                    "dense": round(dense, 4),
                    "predictive": round(bp.evaluate(bnet, test, num_samples=32), 4),
                    "pruned": round(bp.evaluate(small, test), 4),
                    "params": round(bp.count_params(small) / bp.count_params(net), 4),
                    "uncertain": round(float(((pips >= 0.1) & (pips <= 0.9)).float().mean()), 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for name, eps in CASES.items() for r in run(name, eps)]
    meta = {
        "command": "python benchmarks/gate_step.py",
        "device": f"cpu ({platform.machine()}), {torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
    }
    write_json(RESULTS, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
