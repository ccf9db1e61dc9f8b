"""The demo of ``make demo``: train, bayesianize, fit, prune and report, on Fashion-MNIST.

    python -m bayesprune.demo                    # defaults: LeNet-300-100, CPU, a few minutes
    python -m bayesprune.demo --device cuda --epochs 10 --bayes-epochs 10

Steps: train the dense LeNet-300-100; wrap it with a node-level spike-and-slab prior
(:func:`bayesprune.bayesianize`); run SVI (:func:`bayesprune.fit`); prune the nodes whose posterior
inclusion probability is below 0.5 (:func:`bayesprune.prune`) and fine-tune the smaller net
(:func:`bayesprune.finetune`); print the compression table
(:func:`bayesprune.compression_report`) and the test accuracies.
"""

from __future__ import annotations

import argparse

import torch

import bayesprune as bp
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.models import get_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m bayesprune.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", default="lenet_300_100", help="a name from bayesprune.models.list_models()"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    parser.add_argument("--bayes-epochs", type=int, default=3, help="SVI epochs")
    parser.add_argument(
        "--kl-weight",
        type=float,
        default=1.0,
        help="weight of the KL term (1, the default: the ELBO; below 1 a tempered posterior "
        "that prunes less; benchmarks/README.md#baselines)",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="keep nodes with PIP >= threshold"
    )
    parser.add_argument(
        "--subset", type=int, default=None, help="use only this many training images"
    )
    parser.add_argument(
        "--finetune-epochs", type=int, default=1, help="fine-tune the pruned net (0: no)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    progress = not args.no_progress

    splits = load_fashion_mnist(seed=args.seed, subset=args.subset)
    train_loader = loader(splits.train, 128, seed=args.seed)
    test_loader = loader(splits.test, 1024, shuffle=False)

    print(f"1/4 training the dense {args.model} for {args.epochs} epochs on {args.device}")
    dense = get_model(args.model)
    bp.train(
        dense,
        train_loader,
        epochs=args.epochs,
        device=args.device,
        progress=progress,
        seed=args.seed,
    )
    dense_acc = bp.evaluate(dense, test_loader)

    print(
        "2/4 bayesianizing with the default prior (node spike-and-slab with a price per "
        "parameter) and running SVI "
        f"(KL weight {args.kl_weight})"
    )
    bnet = bp.bayesianize(dense)  # bp.priors.default_prior()
    bp.fit(
        bnet,
        train_loader,
        epochs=args.bayes_epochs,
        kl_weight=args.kl_weight,
        device=args.device,
        progress=progress,
        seed=args.seed,
    )

    print(f"3/4 pruning nodes with posterior inclusion probability < {args.threshold}")
    small = bp.prune(bnet, threshold=args.threshold)
    pruned_acc = bp.evaluate(small, test_loader, device=args.device)
    small_acc = pruned_acc
    if args.finetune_epochs:
        print(f"    fine-tuning the pruned net for {args.finetune_epochs} epoch(s)")
        bp.finetune(
            small,
            train_loader,
            epochs=args.finetune_epochs,
            device=args.device,
            progress=progress,
            seed=args.seed,
        )
        small_acc = bp.evaluate(small, test_loader, device=args.device)

    print("4/4 compression report (latency: CPU, median of repeated runs)\n")
    example = splits.test.tensors[0][:1]
    report = bp.compression_report(dense.cpu(), small.cpu(), example, progress=progress)
    print(report)
    tuned = f", after fine-tuning {small_acc:.4f}" if args.finetune_epochs else ""
    print(f"\ntest accuracy: dense {dense_acc:.4f}, pruned {pruned_acc:.4f}{tuned}")
    return {
        "dense_acc": dense_acc,
        "pruned_acc": pruned_acc,
        "finetuned_acc": small_acc,
        "report": report,
    }


if __name__ == "__main__":
    main()
