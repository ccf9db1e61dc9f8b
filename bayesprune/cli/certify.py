"""``bayesprune certify``: the most pruned network whose risk Learn then Test certifies, on one half
of the calibration split, and conformal prediction sets of it calibrated on the other half."""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import Subset

from ._common import save_fig, save_json, say, show_progress
from .rundir import Run, clear, out_dir

__all__ = ["certify_command"]


def certify_command(args: argparse.Namespace) -> None:
    import bayesprune as bp

    from .. import plots
    from ..data import loader

    run = Run(args.run, args.device)
    out = out_dir(args)
    progress = show_progress(args)
    bnet = run.bayesian()
    # Two disjoint halves of the calibration split: one chooses the level (Learn then Test), the
    # other calibrates the conformal sets of the chosen network. Re-using one half for both would
    # make the conformal scores depend on the data that picked the network.
    cal = run.splits.cal
    half = len(cal) // 2
    perm = torch.randperm(len(cal), generator=torch.Generator().manual_seed(args.seed)).tolist()
    ltt_set, conf_set = Subset(cal, perm[:half]), Subset(cal, perm[half:])
    say(f"certifying {args.risk} <= {args.alpha} with probability >= {1 - args.delta:g} "
        f"on {half} calibration examples")  # fmt: skip
    dense = run.dense().to(bnet.device)
    cert = bp.conformal.certify(
        bnet, loader(ltt_set, 256, shuffle=False), risk=args.risk, alpha=args.alpha,
        delta=args.delta, levels=args.levels, example_input=run.example, progress=progress,
        reference=dense,
    )  # fmt: skip
    test = run.loader("test")
    model = cert.model.cpu().eval()
    dense_acc, cert_acc = bp.evaluate(dense.cpu(), test), bp.evaluate(model, test)
    record = {
        "run_id": run.run_id, "run": str(run.dir), **cert.to_dict(),
        "reference_file": "dense.safetensors", "test_accuracy": cert_acc,
        "reference_test_accuracy": dense_acc,
    }  # fmt: skip
    clear(out, "certify")  # just before the first write: an error above leaves the old files
    save_fig(plots.plot_risk_curve(cert), out / "risk_curve.png")
    print(cert)
    say(f"test accuracy: certified network {cert_acc:.4f}, dense network (the reference) "
        f"{dense_acc:.4f}")  # fmt: skip
    bp.save_pruned(model, out / "certified.safetensors")

    clf = bp.conformal.ConformalClassifier(model, score="aps")
    clf.calibrate(loader(conf_set, 256, shuffle=False), args.set_alpha)
    sets, labels = [], []
    for x, y in test:
        sets.append(clf.predict_sets(x).cpu())
        labels.append(y)
    sets_t, labels_t = torch.cat(sets), torch.cat(labels)
    sizes = sets_t.sum(1).numpy()
    covered = sets_t[torch.arange(len(labels_t)), labels_t].numpy()
    save_fig(plots.plot_set_sizes(sizes, num_classes=run.cfg["num_classes"], alpha=args.set_alpha),
             out / "set_sizes.png")  # fmt: skip
    save_json(out / "conformal.json", {
        "run_id": run.run_id, "alpha": args.set_alpha, "calibration_examples": len(conf_set),
        "test_coverage": float(covered.mean()), "mean_set_size": float(sizes.mean()),
        "size_histogram": np.bincount(sizes.astype(int), minlength=run.cfg["num_classes"] + 1),
    })  # fmt: skip
    save_json(out / "certificate.json", record)  # last: the record of a finished certify
    say(f"conformal sets (alpha={args.set_alpha}): test coverage {covered.mean():.3f}, "
        f"mean size {sizes.mean():.2f}")  # fmt: skip
    say(f"wrote {out / 'certificate.json'}")
