"""Do the default posteriors prune well on nets, data sizes, starts and budgets never tuned for?

Every cell trains its own dense reference, then runs the *same* default call,
``bp.fit(bp.bayesianize(net, prior), train_loader, epochs=E)`` (the epochs are the only knob),
and measures on the test images:

- ``dense``: the dense reference; ``predictive``: the posterior predictive (32 draws);
- ``pruned``: ``bp.prune(bnet, threshold=0.5)`` (the median-probability model, no fine-tuning),
  and its share of the dense parameters;
- ``hidden_off``: the share of hidden nodes with PIP < 0.5; ``uncertain``: with PIP in [0.1, 0.9].

Targets (issue "Posteriors that prune well out of the box"): (a) predictive >= dense - 1.5 points;
(b) pruned >= predictive - 1 point; (c) long-budget MLP cells prune at least half of the hidden
nodes, and every long-budget cell gives a smaller network. The cell list is fixed; a cell that
misses a target stays in the table with what was measured.

    python benchmarks/robustness.py --threads 2                  # the whole matrix (about 15 minutes)
    python benchmarks/robustness.py --cells 1 2 3 --threads 1    # some cells
    python benchmarks/robustness.py --price-per-example 5e-6 --threads 2   # a candidate default
    python benchmarks/robustness.py --per-node --threads 2       # the per-node charge alone
    python benchmarks/robustness.py --table                      # markdown table from the JSON
    python benchmarks/robustness.py --write-docs                 # that table into README.md

Results are merged by cell into ``benchmarks/results/robustness.json`` (written atomically); the
table of ``benchmarks/README.md#robustness`` is generated from it by ``benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import tables
import torch
import torch.nn.functional as F
from results_io import write_json
from torch import nn

import bayesprune as bp
from bayesprune.data import load_digits, load_fashion_mnist, loader
from bayesprune.models import lenet5_caffe, lenet_300_100, resnet20

RESULTS = Path(__file__).parent / "results" / "robustness.json"
BATCH = 128


class ResidualMLP(nn.Module):
    """784-256-256-10 (or 64-... on digits) with a residual addition around the second layer."""

    def __init__(self, d_in: int = 784, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(self.fc2(h)) + h
        return self.out(h)


def build(name: str, data: str) -> nn.Module:
    d_in = 64 if data == "digits" else 784
    if name == "resmlp":
        return ResidualMLP(d_in)
    if name == "lenet300":
        return nn.Sequential(nn.Flatten(), *lenet_300_100(in_features=d_in))
    if name == "mlp4":  # held-out cells only: a deeper MLP than any net of CELLS
        return nn.Sequential(
            nn.Flatten(), nn.Linear(d_in, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
            nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip
    if name == "lenet5":
        return lenet5_caffe()
    if name == "resnet20":
        return resnet20()
    raise ValueError(name)


PRIORS = {
    "ss": bp.priors.default_prior,  # SpikeAndSlab(level="node", price_per_example=2e-6)
    "ghs": lambda: bp.priors.GroupHorseshoe(),
    "ssghs": lambda: bp.priors.SpikeAndSlab(level="node", slab="horseshoe"),
}

# id: (data, training images, net, start, budget, epochs, prior). "short" is about 300 steps of
# batch 128; "long" at least 20 epochs. Fixed once chosen: do not drop or change a cell.
CELLS = {
    1: ("digits", 898, "resmlp", "random", "short", 38, "ss"),
    2: ("digits", 898, "resmlp", "dense", "long", 60, "ss"),
    3: ("digits", 898, "lenet300", "dense", "short", 38, "ghs"),
    4: ("digits", 898, "lenet300", "random", "long", 60, "ss"),
    5: ("fmnist", 2000, "resmlp", "dense", "short", 19, "ss"),
    6: ("fmnist", 2000, "resmlp", "random", "long", 60, "ss"),
    7: ("fmnist", 2000, "lenet300", "dense", "long", 60, "ghs"),
    8: ("fmnist", 2000, "lenet5", "dense", "short", 19, "ss"),
    9: ("fmnist", 2000, "resnet20", "dense", "short", 19, "ss"),
    10: ("fmnist", 10000, "lenet300", "dense", "long", 20, "ss"),
    11: ("fmnist", 10000, "resmlp", "random", "short", 4, "ss"),
    12: ("fmnist", 10000, "lenet5", "random", "long", 20, "ss"),
    13: ("fmnist", 10000, "resmlp", "dense", "long", 20, "ghs"),
    14: ("fmnist", 50000, "lenet300", "dense", "short", 1, "ss"),
    15: ("fmnist", 50000, "resmlp", "random", "long", 20, "ss"),
    16: ("fmnist", 50000, "lenet300", "dense", "long", 20, "ssghs"),
    17: ("fmnist", 2000, "resmlp", "dense", "long", 60, "ssghs"),
    18: ("fmnist", 10000, "lenet5", "dense", "short", 4, "ghs"),
    19: ("fmnist", 2000, "resnet20", "random", "long", 20, "ghs"),
}
DENSE_EPOCHS = {"digits": 60, "fmnist": 20}

# Held-out cells (``--heldout``): data sizes, budgets and a net that no default or candidate was
# chosen on. They are for judging a candidate default after it is chosen on CELLS, never for
# choosing it: a change of default is measured on both. Not in the table (their own JSON file).
HELDOUT = {
    101: ("fmnist", 5000, "lenet300", "random", "long", 30, "ss"),
    102: ("fmnist", 20000, "resmlp", "dense", "long", 20, "ss"),
    103: ("fmnist", 50000, "lenet5", "dense", "short", 1, "ss"),
    104: ("digits", 898, "lenet300", "dense", "long", 60, "ss"),
    105: ("fmnist", 5000, "lenet5", "dense", "long", 20, "ss"),
    106: ("fmnist", 30000, "lenet300", "dense", "long", 20, "ss"),
    107: ("fmnist", 10000, "mlp4", "dense", "long", 20, "ss"),
    108: ("digits", 898, "mlp4", "random", "long", 60, "ss"),
    # added after the per-node default (then the default) and two candidates had run on 101-108,
    # before any run of a third
    109: ("fmnist", 1000, "lenet300", "dense", "long", 60, "ss"),
    110: ("fmnist", 15000, "lenet5", "random", "long", 20, "ss"),
    111: ("digits", 898, "resmlp", "dense", "short", 38, "ss"),
    112: ("fmnist", 40000, "mlp4", "random", "long", 20, "ss"),
    113: ("fmnist", 3000, "resnet20", "dense", "short", 13, "ss"),
    # defined after every run on 101-113 and before any run on these: a price of 2e-6 was chosen
    # after seeing 5e-6 on 101-113, so these are the cells that judge it
    114: ("fmnist", 7500, "resmlp", "random", "long", 30, "ss"),
    115: ("fmnist", 25000, "lenet300", "random", "long", 20, "ss"),
    116: ("fmnist", 35000, "mlp4", "dense", "long", 20, "ss"),
    117: ("digits", 898, "mlp4", "dense", "short", 38, "ss"),
    118: ("fmnist", 4000, "lenet5", "random", "long", 30, "ss"),
}

# Why a cell misses a target, as measured (the table prints it for each cell that misses one;
# docs/notes/gate-decisions.md has the probes). A reason for a cell that meets every target is
# not printed; a cell that misses one without a reason here stops the table.
MISSED = {
    1: "(a), a short fit from random weights: the dense net of the same budget scores 2.2 points "
    "above the fit, the dense reference (60 epochs) more; not measured further",
    7: "(c), the group horseshoe prunes nothing at its default global scale 1; its KL is "
    "dominated by the mean-field Gaussian weights' KL (gate-decisions point 6), and with point "
    "weights it prunes nothing either (point 17); `bp.fit` warns that it keeps every node",
    11: "(a), a short fit from random weights (4 epochs): 1.7 points below a dense net trained "
    "for the same 4 epochs (`dense_same_budget`), 3.8 below the 20-epoch reference; the "
    "per-node charge alone, which keeps 71% of the parameters here against 44%, was 0.95 below "
    "the same-budget net (docs/default-candidates.md)",
    13: "(c), as cell 7, but the group horseshoe switches off 1% of the hidden nodes here (the "
    "fit's warning is for none)",
    16: "(a), spike-and-slab with Bayesian (horseshoe) weights: their KL outweighs the "
    "likelihood, the gates are left to Adam (gate-decisions point 6)",
    17: "(a) and (b), as cell 16, on 2,000 images: every hidden node switched off",
    19: "(a) and (c), the group horseshoe on ResNet-20 from random weights does not train: "
    "every node kept, the predictive far below dense; its weights' KL dominates, as cell 7",
}


def _splits(data: str, n: int):
    if data == "digits":
        return load_digits(flatten=False)
    return load_fashion_mnist(subset=n, val_size=2000, cal_size=1000)


def run_cell(
    cell: int,
    seed: int = 0,
    price_per_example: float | None = None,
    inclusion: bool = False,
    per_node: bool = False,
) -> dict:
    """One cell of the matrix. ``price_per_example`` (``--price-per-example``): a candidate
    default measured beside the table, the spike-and-slab cells' prior becomes
    ``SpikeAndSlab(prior_log_odds=0, price_per_example=lam)`` (log-odds ``-lam * N`` per
    parameter, N training images), or with ``inclusion`` (``--with-inclusion``)
    ``SpikeAndSlab(price_per_example=lam)``: log-odds ``min(logit(0.1), -lam * N)`` per node and
    parameter. ``per_node`` (``--per-node``): the spike-and-slab cells with
    ``SpikeAndSlab(level="node")``, the per-node charge of prior inclusion 0.1 without the
    default's price (the default before the price was)."""
    data, n, net_name, start, budget, epochs, prior = {**CELLS, **HELDOUT}[cell]
    splits = _splits(data, n)
    train = loader(splits.train, BATCH, seed=seed)
    test = loader(splits.test, 512, shuffle=False)
    torch.manual_seed(seed)
    dense_net = build(net_name, data)
    t0 = time.perf_counter()
    bp.train(dense_net, train, epochs=DENSE_EPOCHS[data], progress=False, seed=seed)
    dense_s = time.perf_counter() - t0
    dense = bp.evaluate(dense_net, test)
    net = dense_net if start == "dense" else build(net_name, data)
    lam = price_per_example if prior == "ss" else None
    if lam is not None:
        base = {} if inclusion else {"prior_log_odds": 0.0}
        bnet = bp.bayesianize(net, bp.priors.SpikeAndSlab(price_per_example=lam, **base))
    elif per_node and prior == "ss":
        bnet = bp.bayesianize(net, bp.priors.SpikeAndSlab(level="node"))
    else:
        bnet = bp.bayesianize(net, PRIORS[prior]())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = bp.fit(bnet, train, epochs=epochs, progress=False, seed=seed)
    predictive = bp.evaluate(bnet, test, num_samples=32)
    pips = bnet.inclusion_probs()
    hidden = [k for k in pips if k in fit.nodes_off]
    allp = torch.cat([pips[k] for k in hidden]) if hidden else torch.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = bp.prune(bnet, threshold=0.5)
    pruned = bp.evaluate(small, test)
    share = bp.count_params(small) / bp.count_params(dense_net)
    row = {
        "cell": cell,
        "seed": seed,
        "data": data,
        "train_images": len(splits.train),
        "net": net_name,
        "start": start,
        "budget": budget,
        "epochs": epochs,
        "steps": len(fit.loss),
        "prior": prior,
        "dense": round(dense, 4),
        "predictive": round(predictive, 4),
        "pruned": round(pruned, 4),
        "params": round(share, 4),
        "hidden_off": round(float((allp < 0.5).float().mean()), 4),
        "uncertain": round(float(((allp >= 0.1) & (allp <= 0.9)).float().mean()), 4),
        "nodes_off": {k: v[-1] for k, v in fit.nodes_off.items()},
        "fit_warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
        "dense_seconds": round(dense_s, 1),
        "fit_seconds": round(fit.seconds, 1),
        "gate_tests": fit.gate_tests,
        "kl_weight": fit.kl_weight,
    }
    if lam is not None:
        row["price_per_example"] = lam
        row["prior_inclusion"] = 0.1 if inclusion else 0.5
        row["price_rule"] = "min"  # the log-odds: min(logit(inclusion), -lam N m)
    elif prior == "ss":
        row["price_per_example"] = None if per_node else bp.priors.DEFAULT_PRICE_PER_EXAMPLE
    if start == "random" and budget == "short":
        # the dense reference trains for DENSE_EPOCHS; a short fit from random weights is also
        # compared with a dense net trained from the same start for the fit's own epochs
        torch.manual_seed(seed)
        same = build(net_name, data)
        bp.train(same, train, epochs=epochs, progress=False, seed=seed)
        row["dense_same_budget"] = round(bp.evaluate(same, test), 4)
    mlp = net_name in ("resmlp", "lenet300", "mlp4")
    row["a"] = predictive >= dense - 0.015
    row["b"] = pruned >= predictive - 0.01
    row["c"] = None if budget != "long" else (share < 1 and (not mlp or row["hidden_off"] >= 0.5))
    return row


def _fresh_gate_gradients() -> None:
    """Make every natural gate step see only the current gradient (the textbook damped CAVI step):
    ``bp.fit`` clears Adam's gradients but not the gates', so its steps use their running sum."""
    from bayesprune.natural import BernoulliNaturalGradient

    step = BernoulliNaturalGradient.step

    def fresh(self, closure=None):
        out = step(self, closure)
        self.zero_grad(set_to_none=True)
        return out

    BernoulliNaturalGradient.step = fresh


def results_path(seed: int = 0) -> Path:
    """Seed 0 is the table's; other seeds (a check of run-to-run spread) go to their own file."""
    return RESULTS if seed == 0 else RESULTS.with_name(f"robustness_seed{seed}.json")


def _save(rows: dict[int, dict], meta: dict, path: Path) -> None:
    write_json(path, {"meta": meta, "cells": [rows[k] for k in sorted(rows)]})


def table(path: Path = RESULTS) -> str:
    """The markdown table of the JSON (every cell of CELLS; cells not run yet say so)."""
    payload = json.loads(path.read_text()) if path.exists() else {"cells": []}
    return "\n".join(tables.robustness_table(payload, CELLS))


def write_docs() -> None:
    """Regenerate the robustness table of ``benchmarks/README.md`` (written atomically)."""
    tables.write(["robustness"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs="+", type=int, default=sorted(CELLS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="data order, dense net and fit seed")
    p.add_argument(
        "--fresh-gate-gradients",
        action="store_true",
        help="a check of the default gate step: clear the gate gradients after every natural "
        "step (bp.fit sums them; see bayesprune/natural.py); results go to "
        "robustness_fresh_gates*.json",
    )
    p.add_argument(
        "--price-per-example",
        type=float,
        default=None,
        metavar="LAM",
        help="a candidate default: the spike-and-slab cells (the only ones run unless --cells "
        "says otherwise) with SpikeAndSlab(prior_log_odds=-LAM * N, per_parameter=True); "
        "results go to robustness_lam<LAM>.json",
    )
    p.add_argument(
        "--with-inclusion",
        action="store_true",
        help="with --price-per-example: SpikeAndSlab(price_per_example=LAM), each node charged "
        "the larger of the default prior inclusion 0.1's log-odds and LAM x N per parameter; "
        "results go to robustness_lam<LAM>_incl.json",
    )
    p.add_argument(
        "--per-node",
        action="store_true",
        help="the spike-and-slab cells with SpikeAndSlab(level='node'): the per-node charge "
        "of prior inclusion 0.1 without the default's price; results go to "
        "robustness*_pernode.json",
    )
    p.add_argument(
        "--heldout",
        action="store_true",
        help="the held-out cells (HELDOUT, never used to choose a default) instead of CELLS; "
        "results go to robustness_heldout*.json",
    )
    p.add_argument("--table", action="store_true", help="print the markdown table and exit")
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="regenerate the robustness table of benchmarks/README.md from the JSON",
    )
    args = p.parse_args(argv)
    if args.table:
        print(table())
        return
    if args.write_docs:
        write_docs()
        return
    cells = HELDOUT if args.heldout else CELLS
    if args.heldout and args.cells == sorted(CELLS):  # --cells left at every cell
        args.cells = sorted(HELDOUT)
    unknown = sorted(set(args.cells) - set(cells))
    if unknown:
        p.error(f"unknown cells {unknown}; the cells are {min(cells)}..{max(cells)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = results_path(args.seed)
    if args.heldout:
        path = path.with_name(path.stem + "_heldout.json")
    if args.fresh_gate_gradients:
        _fresh_gate_gradients()
        path = path.with_name(path.stem + "_fresh_gates.json")
    lam = args.price_per_example
    if args.with_inclusion and lam is None:
        p.error("--with-inclusion is an option of --price-per-example LAM")
    if args.per_node and lam is not None:
        p.error("--per-node and --price-per-example are two priors: give one")
    if args.per_node:
        path = path.with_name(f"{path.stem}_pernode.json")
    if (args.per_node or lam is not None) and args.cells == sorted(cells):
        # another spike-and-slab prior: --cells left at every cell runs the spike-and-slab ones
        args.cells = [c for c, v in cells.items() if v[-1] == "ss"]
    if lam is not None:
        if not lam > 0:
            p.error(f"--price-per-example must be positive, got {lam}")
        incl = "_incl" if args.with_inclusion else ""
        path = path.with_name(f"{path.stem}_lam{lam:g}{incl}.json")
    rows = {}
    if path.exists():
        rows = {r["cell"]: r for r in json.loads(path.read_text())["cells"]}
    meta = {
        "command": "python benchmarks/robustness.py"
        + (f" --seed {args.seed}" if args.seed else "")
        + (" --heldout" if args.heldout else "")
        + (" --fresh-gate-gradients" if args.fresh_gate_gradients else "")
        + (f" --price-per-example {lam:g}" if lam is not None else "")
        + (" --with-inclusion" if args.with_inclusion else "")
        + (" --per-node" if args.per_node else ""),
        "device": f"cpu ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
        "bayesprune": bp.__version__,
    }
    for cell in args.cells:
        row = run_cell(
            cell,
            seed=args.seed,
            price_per_example=lam,
            inclusion=args.with_inclusion,
            per_node=args.per_node,
        )
        rows[cell] = row
        _save(rows, meta, path)
        print(json.dumps({k: v for k, v in row.items() if k != "fit_warnings"}), flush=True)


if __name__ == "__main__":
    main()
