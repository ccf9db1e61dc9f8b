"""``bayesprune prune``: the smaller network at a PIP threshold (or a fraction of the nodes kept),
optionally recalibrated and fine-tuned, its compression report, and accuracy and size against the
fraction of nodes kept."""

from __future__ import annotations

import argparse
import warnings

import torch

from ._common import CLIError, save_fig, save_json, say, show_progress
from .rundir import Run, clear, out_dir

__all__ = ["prune_command"]


def prune_command(args: argparse.Namespace) -> None:
    import bayesprune as bp

    from .. import plots

    run = Run(args.run, args.device)
    out = out_dir(args)
    progress = show_progress(args)
    bnet = run.bayesian()
    dense = run.dense()
    test = run.loader("test")
    threshold = 0.5 if args.threshold is None else args.threshold  # 0 is a valid threshold
    kwargs = {"keep": args.keep} if args.keep is not None else {"threshold": threshold}
    say(f"pruning with {', '.join(f'{k}={v}' for k, v in kwargs.items())}")
    small = bp.prune(bnet, example_input=run.example, round_to=args.round_to,
                     min_nodes=args.min_nodes, **kwargs)  # fmt: skip
    if args.recalibrate_batches:
        say(f"re-estimating BatchNorm statistics on {args.recalibrate_batches} training batches")
        try:
            bp.recalibrate_batchnorm(small, run.loader("train", shuffle=True),
                                     num_batches=args.recalibrate_batches, device=args.device,
                                     progress=progress)  # fmt: skip
        except ValueError as exc:  # a network without BatchNorm
            raise CLIError(f"--recalibrate-batches: {exc}") from exc
    if args.finetune_epochs > 0:
        say(f"fine-tuning for {args.finetune_epochs} epoch(s)")
        bp.finetune(small, run.loader("train", shuffle=True), epochs=args.finetune_epochs,
                    device=args.device, progress=progress, seed=args.seed)  # fmt: skip
    small.cpu().eval()
    clear(out, "prune")  # just before the first write: an error above leaves the old files
    bp.save_pruned(small, out / "pruned.safetensors")
    report = bp.compression_report(dense, small, run.example, repeats=10, progress=progress)
    dense_acc, small_acc = bp.evaluate(dense, test), bp.evaluate(small, test)

    # The curve ranks nodes by PIP and keeps a fraction of them: unlike PIP thresholds, whose
    # useful range depends on how far the fit has moved the PIPs, it always spans dense to tiny.
    levels = args.levels or [round(1 - 0.1 * i, 1) for i in range(1, 10)]
    from tqdm.auto import tqdm

    pips = bnet.inclusion_probs()
    nodes = sum(len(v) for v in pips.values())
    chosen_frac = sum(int(m) for m in _kept_nodes(pips, kwargs)) / max(nodes, 1)
    curve = []
    for f in tqdm(levels, desc="accuracy vs nodes kept", disable=not progress, leave=False):
        try:
            with warnings.catch_warnings():
                # floors and zeroed-not-removed nodes were reported for the chosen network above;
                # the curve's params_kept shows each level's real size
                warnings.simplefilter("ignore", UserWarning)
                cand = bp.prune(bnet, keep=f, example_input=run.example).cpu().eval()
        except ValueError as exc:  # e.g. a level that removes every node of a layer
            curve.append({"keep": f, "error": str(exc)})
            continue
        curve.append({
            "keep": f, "accuracy": bp.evaluate(cand, test),
            "params_kept": bp.count_params(cand) / bp.count_params(dense),
        })  # fmt: skip
    ok = [c for c in curve if "accuracy" in c]
    if ok:
        fig = plots.plot_pruning_curve(
            [c["keep"] for c in ok], [c["accuracy"] for c in ok],
            [c["params_kept"] for c in ok], chosen=chosen_frac, dense_accuracy=dense_acc,
            level_label="fraction of nodes kept (highest PIP first)",
        )  # fmt: skip
        fig.axes[0].invert_xaxis()
        save_fig(fig, out / "pruning_curve.png")
    save_json(out / "compression.json", {
        "run_id": run.run_id, "run": str(run.dir), **kwargs, "finetune_epochs": args.finetune_epochs,
        "dense_test_accuracy": dense_acc, "pruned_test_accuracy": small_acc,
        "report": report.to_dict(), "curve": curve,
    })  # fmt: skip
    print(report)
    say(f"test accuracy: dense {dense_acc:.4f}, pruned {small_acc:.4f}")
    say(f"wrote {out / 'pruned.safetensors'}")


def _kept_nodes(pips: dict[str, torch.Tensor], kwargs: dict[str, float]) -> list[int]:
    """Nodes kept per layer by a threshold (keep=: the fraction itself)."""
    if "threshold" in kwargs:
        return [int((v >= kwargs["threshold"]).sum()) for v in pips.values()]
    nodes = sum(len(v) for v in pips.values())
    return [round(kwargs["keep"] * nodes)]
