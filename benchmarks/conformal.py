"""Certified pruning (Learn then Test) and conformal prediction sets on Fashion-MNIST.

LeNet-300-100 is trained (or its weights are loaded from ``benchmarks/dense.py``'s ``--out``),
bayesianized with a node-level spike-and-slab prior and fitted by SVI. The candidates come from
``bayesprune.conformal.pip_candidates``: the hidden nodes with PIP >= t are kept, for the
thresholds t of ``default_levels``: the median-probability model (t = 0.5), then PIP quantiles
above it (least to most pruned; the output layer is never pruned). The loss is ``accuracy_drop``: the pruned net is wrong where the Bayesian posterior
predictive (``bnet.predict``, 32 draws) is right (``--reference mean``: the posterior-mean net).

1. The certificate: ``bp.conformal.certify`` on the calibration split (5,000 images the training
   never saw), the chosen level's test risk on the official test set, for alpha in {0.01, 0.02,
   0.05} and delta = 0.1.
2. Validity: the calibration split and the test set form a held-out pool of 15,000 images. For 100
   random splits, ``--n-cal`` images calibrate Learn then Test and the rest measure the test risk
   of the chosen candidate; a split *violates* the bound when that test risk exceeds alpha. The
   guarantee says violations happen with probability at most delta = 0.1, i.e. about 10 of 100 or
   fewer (binomial sd 3).
3. Prediction sets (alpha = 0.1) from the posterior predictive with the ``lac``, ``aps`` and
   ``raps`` scores: coverage and mean set size on the test set (calibrated on the calibration
   split) and the coverage averaged over the same 100 random splits.

    python benchmarks/conformal.py --device cuda        # on a GPU
    python benchmarks/conformal.py --quick              # CPU smoke run (subset, 1 epoch each)

``--json PATH`` also writes both tables there (atomically); the table of
``benchmarks/README.md#conformal`` is generated from ``benchmarks/results/conformal.json``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from results_io import write_json
from safetensors.torch import load_file
from torch.utils.data import ConcatDataset

import bayesprune as bp
from bayesprune.conformal import (
    ConformalClassifier,
    certify,
    conformal_quantile,
    learn_then_test,
    pip_candidates,
    raps_scores,
    risk_losses,
)
from bayesprune.data import load_fashion_mnist, loader
from bayesprune.models import lenet_300_100
from bayesprune.train import evaluate, resolve_device, train

ALPHAS = (0.01, 0.02, 0.05)
DELTA = 0.1
SET_ALPHA = 0.1
SCORES = {"lac": {}, "aps": {}, "raps": dict(lam=0.01, k_reg=2)}


def _dense(args, splits, device) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    net = lenet_300_100()
    weights = args.dense_dir / "lenet_300_100.safetensors"
    if weights.exists() and not args.quick:
        net.load_state_dict(load_file(str(weights)))
        print(f"dense weights loaded from {weights}", flush=True)
        return net.to(device)
    train(
        net, loader(splits.train, 128, seed=args.seed), epochs=1 if args.quick else 20, lr=1e-3,
        device=device, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    return net


@torch.no_grad()
def _pool_outputs(bnet, candidates, pool_loader, device, num_samples):
    """Posterior predictive probabilities and each candidate's predicted labels on the pool."""
    probs, preds, labels = [], [[] for _ in candidates], []
    for x, y in pool_loader:
        x = x.to(device)
        probs.append(bnet.predict(x, num_samples=num_samples).cpu())
        for j, c in enumerate(candidates):
            preds[j].append(c(x).argmax(-1).cpu())
        labels.append(y)
    return (
        torch.cat(probs).double().numpy(),
        np.stack([torch.cat(p).numpy() for p in preds]),
        torch.cat(labels).numpy(),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="2,000 training images, 1 epoch each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--svi-epochs", type=int, default=None, help="default 30 (quick: 1)")
    parser.add_argument("--n-cal", type=int, default=None, help="calibration size of the splits")
    parser.add_argument("--splits", type=int, default=100, help="random calibration/test splits")
    parser.add_argument("--max-levels", type=int, default=20, help="number of PIP thresholds")
    parser.add_argument("--num-samples", type=int, default=32, help="posterior predictive draws")
    parser.add_argument(
        "--reference", choices=("predictive", "mean"), default="predictive",
        help="what accuracy_drop compares with: the posterior predictive or the posterior-mean net",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--dense-dir", type=Path, default=Path("runs/dense"))
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the tables there (written atomically)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    progress = not args.no_progress
    start = time.perf_counter()

    splits = load_fashion_mnist(seed=args.seed, subset=2000 if args.quick else None)
    cal_loader = loader(splits.cal, 1024, shuffle=False)
    test_loader = loader(splits.test, 1024, shuffle=False)
    dense = _dense(args, splits, device)
    dense_acc = evaluate(dense, test_loader, device=device)

    bnet = bp.bayesianize(copy.deepcopy(dense), bp.priors.SpikeAndSlab(level="node"))
    svi_epochs = args.svi_epochs or (1 if args.quick else 30)
    bp.fit(
        bnet, loader(splits.train, 128, seed=args.seed), epochs=svi_epochs, lr=1e-3,
        device=device, seed=args.seed, progress=progress,
    )  # fmt: skip
    bnet.eval()
    x1 = splits.test.tensors[0][:1].to(device)
    levels, candidates = pip_candidates(bnet, example_input=x1, max_levels=args.max_levels)
    candidates = [c.to(device).eval() for c in candidates]
    mean_net = bnet.mean_module().to(device).eval()
    total = bp.count_params(mean_net)
    kept = np.array([bp.count_params(c) / total for c in candidates])

    # -- 1. the certificates on the calibration split, test risk on the test set ----------------
    torch.manual_seed(args.seed)
    pool = ConcatDataset([splits.cal, splits.test])
    probs, preds, labels = _pool_outputs(
        bnet, [mean_net, *candidates], loader(pool, 1024, shuffle=False), device, args.num_samples
    )
    mean_pred, preds = preds[0], preds[1:]
    ref = probs.argmax(1) if args.reference == "predictive" else mean_pred
    losses = risk_losses(preds, ref, labels, "accuracy_drop")  # [K, N], one column per pool image
    # when nothing passes, the posterior-mean network is returned (uncertified): its own loss
    fallback = risk_losses(mean_pred, ref, labels, "accuracy_drop")
    n_cal_split = len(splits.cal)
    is_test = np.arange(len(labels)) >= n_cal_split
    rows = []
    for alpha in ALPHAS:
        cert = certify(
            bnet, cal_loader, alpha=alpha, delta=DELTA, levels=levels, example_input=x1,
            num_samples=args.num_samples, reference=args.reference, progress=False,
        )  # fmt: skip
        if alpha == ALPHAS[1]:
            print(cert, flush=True)
        # test risk of the chosen candidate against the pool's (fixed) reference predictions;
        # certify drew its own posterior predictive on the calibration split
        j = cert.index
        test_risk = (losses[j] if j is not None else fallback)[is_test].mean()
        test_acc = evaluate(cert.model.to(device), test_loader, device=device)
        rows.append(dict(alpha=alpha, cert=cert, test_risk=test_risk, test_acc=test_acc))

    # -- 2. violations over random calibration/test splits of the held-out pool ------------------
    n_pool = len(labels)
    n_cal = args.n_cal or min(5000, n_pool // 3)
    rng = np.random.default_rng(args.seed)
    perms = [rng.permutation(n_pool) for _ in range(args.splits)]
    for row in rows:
        alpha, violations, fractions, risks = row["alpha"], 0, [], []
        for perm in perms:
            cal_idx, test_idx = perm[:n_cal], perm[n_cal:]
            res = learn_then_test(losses[:, cal_idx], alpha, DELTA)
            risk = (losses[res.index] if res.passed else fallback)[test_idx].mean()
            violations += res.passed and risk > alpha  # no claim is made when nothing passes
            fractions.append(kept[res.index] if res.passed else 1.0)
            risks.append(risk)
        row.update(violations=int(violations), mean_kept=float(np.mean(fractions)),
                   mean_risk=float(np.mean(risks)))  # fmt: skip

    # -- 3. prediction sets from the posterior predictive --------------------------------------
    set_rows = []
    for score, kw in SCORES.items():
        cp = ConformalClassifier(
            bnet, score=score, num_samples=args.num_samples, seed=args.seed, **kw
        )
        res = cp.calibrate(cal_loader, SET_ALPHA).evaluate(test_loader)
        # the same score on the fixed pool probabilities, over the random splits
        u = rng.random(n_pool)
        s = raps_scores(probs, labels, lam=kw.get("lam", 0.0), k_reg=kw.get("k_reg", 0), u=u)
        if score == "lac":
            s = 1.0 - probs[np.arange(n_pool), labels]
        cov = [(s[p[n_cal:]] <= conformal_quantile(s[p[:n_cal]], SET_ALPHA)).mean() for p in perms]
        set_rows.append(dict(score=score, coverage=res["coverage"], size=res["mean_size"],
                             split_cov=float(np.mean(cov)), split_sd=float(np.std(cov))))  # fmt: skip

    reference_name = (
        "posterior predictive" if args.reference == "predictive" else "posterior-mean network"
    )
    mean_acc = float((mean_pred[is_test] == labels[is_test]).mean())
    pred_acc = float((probs.argmax(1)[is_test] == labels[is_test]).mean())
    mean_drop = float(fallback[is_test].mean())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"\nCertified pruning of LeNet-300-100 (node spike-and-slab, {svi_epochs} SVI epochs) on "
        f"Fashion-MNIST, risk = accuracy_drop vs the {reference_name}, delta = {DELTA}\n"
        f"({dev_name or 'CPU'}, torch {torch.__version__}, seed {args.seed}; dense test accuracy "
        f"{dense_acc:.4f}; {len(levels)} candidates; certificate on the {n_cal_split} calibration "
        f"images; violations over {args.splits} random splits of the {n_pool}-image held-out pool "
        f"with n_cal = {n_cal}). Unpruned posterior-mean net: test accuracy {mean_acc:.4f}, "
        f"accuracy_drop vs the {reference_name} {mean_drop:.4f}; posterior predictive test "
        f"accuracy {pred_acc:.4f}.\n"
    )
    print("| alpha | certified PIP threshold | params kept | test acc | test risk | "
          f"violations / {args.splits} | mean params kept (splits) | mean test risk (splits) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c = r["cert"]
        level = "none (unpruned, uncertified)" if c.index is None else f"{c.level:.6g}"
        pk = 1.0 if c.index is None else kept[c.index]
        print(f"| {r['alpha']} | {level} | {100 * pk:.2f}% | {r['test_acc']:.4f} | "
              f"{r['test_risk']:.4f} | {r['violations']} | {100 * r['mean_kept']:.2f}% | "
              f"{r['mean_risk']:.4f} |")  # fmt: skip
    print(f"\nConformal prediction sets from the posterior predictive, alpha = {SET_ALPHA}\n")
    print("| score | test coverage | mean set size | coverage over splits (mean ± sd) |")
    print("|---|---:|---:|---:|")
    for r in set_rows:
        print(f"| {r['score']} | {r['coverage']:.4f} | {r['size']:.3f} | "
              f"{r['split_cov']:.4f} ± {r['split_sd']:.4f} |")  # fmt: skip
    seconds = time.perf_counter() - start
    print(f"\ntotal time {seconds:.0f} s", flush=True)
    if args.json is not None:
        meta = dict(
            command="python benchmarks/conformal.py " + " ".join(sys.argv[1:] if argv is None else argv),
            device=f"{dev_name or 'CPU'}, {torch.get_num_threads()} thread(s)",
            torch=torch.__version__, seconds=round(seconds), svi_epochs=svi_epochs, delta=DELTA,
            set_alpha=SET_ALPHA, splits=args.splits, n_cal=n_cal, pool=n_pool,
            risk=f"accuracy_drop vs the {reference_name}", dense_acc=dense_acc, mean_acc=mean_acc,
            mean_drop=mean_drop, predictive_acc=pred_acc,
        )  # fmt: skip
        certificates = [
            dict(alpha=r["alpha"], level=None if r["cert"].index is None else r["cert"].level,
                 params_kept=1.0 if r["cert"].index is None else float(kept[r["cert"].index]),
                 test_acc=r["test_acc"], test_risk=float(r["test_risk"]),
                 violations=r["violations"], mean_kept=r["mean_kept"], mean_risk=r["mean_risk"])
            for r in rows
        ]  # fmt: skip
        write_json(args.json, {"meta": meta, "certificates": certificates, "sets": set_rows})
    return dict(rows=rows, sets=set_rows)


if __name__ == "__main__":
    main()
