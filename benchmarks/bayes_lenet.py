"""Acceptance run of the Bayesian core: dense LeNet-300-100 on Fashion-MNIST, then node spike-and-slab.

Trains the dense net, bayesianizes it (posterior means = trained weights), fits the variational
posterior by SVI, and prints test accuracy of the dense net, of the posterior predictive, and of the
median-probability model (nodes with PIP >= 0.5 kept, posterior-mean weights), plus the fraction of
hidden nodes with PIP < 0.5. Acceptance: Bayesian accuracy within 1 point of dense, >= 50% of hidden
nodes below 0.5::

    python benchmarks/bayes_lenet.py --device cuda                       # Bayesian (beta = 1) only
    python benchmarks/bayes_lenet.py --dense-weights runs/dense/lenet_300_100.safetensors \
        --kl-weight 1 0.5 0.3 0.1                                        # the recorded trade-off (CPU)
    python benchmarks/bayes_lenet.py --device cpu --subset 6000 --dense-epochs 3 --epochs 3   # smoke

``--kl-weight`` beta < 1 fits the tempered objective E[log p(y | x, w)] - beta KL(q || p) (see
``bp.fit``): one row per beta, so the table shows what the Bayesian answer (beta = 1) costs in
accuracy and what tempering buys. ``--dense-weights`` loads the dense net that
``benchmarks/dense.py`` saved (same seed and splits) instead of training it again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from results_io import write_json
from safetensors.torch import load_file

import bayesprune as bp
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.models import lenet_300_100
from bayesprune.train import evaluate, resolve_device, train


@torch.no_grad()
def _predictive_accuracy(bnet: bp.BayesianModule, data, num_samples: int) -> float:
    correct = total = 0
    for x, y in data:
        probs = bnet.predict(x, num_samples=num_samples)
        correct += int((probs.argmax(-1).cpu() == y).sum())
        total += len(y)
    return correct / total


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--subset", type=int, default=None, help="use this many images (smoke runs)"
    )
    parser.add_argument("--dense-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10, help="SVI epochs")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--structure-lr", type=float, default=None)
    parser.add_argument(
        "--structure-delay",
        type=float,
        default=None,
        help="bp.fit's structure_delay (fraction of the steps with frozen gates; default: fit's)",
    )
    parser.add_argument("--prior-inclusion", default="0.1", help="a probability or 'theory'")
    parser.add_argument(
        "--price-per-example",
        type=float,
        default=None,
        metavar="LAM",
        help="SpikeAndSlab(price_per_example=LAM): each node charged at least LAM x N nats per "
        "parameter (default: the default prior's, bp.priors.DEFAULT_PRICE_PER_EXAMPLE; 0: no "
        "price, the per-node charge of --prior-inclusion alone)",
    )
    parser.add_argument(
        "--slab", default="gaussian", choices=["gaussian", "group_lasso", "horseshoe"]
    )
    parser.add_argument("--reparam", default="local", choices=["local", "shared"])
    parser.add_argument(
        "--weight-sd", default="per_weight", choices=["per_weight", "rank1"], help="sd family"
    )
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--init-scale", type=float, default=0.3, help="initial sd / weight RMS")
    parser.add_argument("--kl-warmup", type=float, default=0.0, help="epochs of KL warm-up")
    parser.add_argument(
        "--kl-weight", type=float, nargs="+", default=[1.0], help="beta values (1 = the ELBO)"
    )
    parser.add_argument("--dense-weights", type=Path, default=None, help="safetensors of the net")
    parser.add_argument("--seed", type=int, default=0, help="data splits and the dense net")
    parser.add_argument(
        "--fit-seed",
        type=int,
        default=None,
        help="seed of the SVI fits (minibatch order, initial noise); default: --seed",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the rows there (written atomically)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    fit_seed = args.seed if args.fit_seed is None else args.fit_seed
    splits = load_fashion_mnist(seed=args.seed, subset=args.subset)
    train_loader = loader(splits.train, 128, seed=args.seed)
    svi_loader = loader(splits.train, 128, seed=fit_seed)
    test_loader = loader(splits.test, 1000, shuffle=False)

    t0 = time.perf_counter()
    dense = lenet_300_100()
    if args.dense_weights is not None:
        dense.load_state_dict(load_file(str(args.dense_weights)))
    else:
        train(
            dense,
            train_loader,
            epochs=args.dense_epochs,
            device=dev,
            progress=False,
            seed=args.seed,
        )
    acc_dense = evaluate(dense, test_loader, device=dev)
    t_dense = time.perf_counter() - t0

    pi = args.prior_inclusion if args.prior_inclusion == "theory" else float(args.prior_inclusion)
    lam = args.price_per_example
    lam = bp.priors.DEFAULT_PRICE_PER_EXAMPLE if lam is None else lam
    if lam < 0:
        parser.error(f"--price-per-example must be >= 0, got {lam}")
    price = {"price_per_example": lam} if lam > 0 else {}
    prior = bp.priors.SpikeAndSlab(level="node", prior_inclusion=pi, slab=args.slab, **price)
    rows = []
    for beta in args.kl_weight:
        bnet = bp.bayesianize(
            dense,
            prior=prior,
            reparam=args.reparam,
            init_scale=args.init_scale,
            weight_sd=args.weight_sd,
        )
        t0 = time.perf_counter()
        result = bp.fit(
            bnet,
            svi_loader,
            epochs=args.epochs,
            lr=args.lr,
            structure_lr=args.structure_lr,
            structure_delay=args.structure_delay,
            kl_warmup=args.kl_warmup,
            kl_weight=beta,
            device=dev,
            progress=False,
            seed=fit_seed,
        )
        t_fit = time.perf_counter() - t0
        acc_bayes = _predictive_accuracy(bnet, test_loader, args.samples)
        pips = bnet.inclusion_probs()
        hidden = [k for k in pips if k != "5"]  # the output layer's nodes are the classes
        n_hidden = sum(pips[k].numel() for k in hidden)
        below = sum(int((pips[k] < 0.5).sum()) for k in hidden)
        median_model = bnet.mean_module({k: pips[k] >= 0.5 for k in hidden})
        acc_median = evaluate(median_model, test_loader, device=dev)
        rows.append(
            dict(
                beta=beta,
                weight_sd=args.weight_sd,
                device=str(dev),
                dense_acc=acc_dense,
                bayes_acc=acc_bayes,
                median_model_acc=acc_median,
                hidden_below_half=below / n_hidden,
                below=below,
                n_hidden=n_hidden,
                per_layer_below_half={k: float((pips[k] < 0.5).float().mean()) for k in hidden},
                final_loss=result.loss[-1],
                dense_seconds=t_dense,
                fit_seconds=t_fit,
            )
        )
        print(f"beta {beta}: done in {t_fit:.0f} s", flush=True)
    if args.json is not None:
        write_json(args.json, {"command": " ".join(sys.argv), "rows": rows})
    print(
        f"device {dev}; subset {args.subset}; dense "
        f"{args.dense_weights or f'{args.dense_epochs} epochs'}; SVI epochs {args.epochs}; "
        f"prior inclusion {args.prior_inclusion}; price per example {lam:g}; slab {args.slab}; sd family {args.weight_sd}; "
        f"reparam {args.reparam}; seed {args.seed}; "
        f"fit seed {fit_seed}"
    )
    print(
        "| beta | dense acc | Bayes predictive acc | Δ (points) | median-model acc | "
        "hidden nodes PIP<0.5 | per layer | fit s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        per = ", ".join(f"{k}: {v:.0%}" for k, v in row["per_layer_below_half"].items())
        print(
            f"| {row['beta']:g} | {acc_dense:.4f} | {row['bayes_acc']:.4f} | "
            f"{100 * (row['bayes_acc'] - acc_dense):+.2f} | {row['median_model_acc']:.4f} | "
            f"{row['below']}/{row['n_hidden']} = {row['hidden_below_half']:.0%} | {per} | "
            f"{row['fit_seconds']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
