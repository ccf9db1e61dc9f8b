"""``bayesprune fit``: train (or load) the dense network, fit the posterior by SVI and write the run
directory, ``run.json`` last; ``--resume`` continues an interrupted fit once its options match."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from ..files import atomic_write
from ._common import (
    PREPROCESS_WORDS,
    CLIError,
    json_default,
    save_fig,
    save_json,
    say,
    show_progress,
)
from .rundir import RUN_FILE, build_model, load_splits, load_weights, retire

__all__ = ["fit_command"]


def _prior(args: argparse.Namespace):
    from .. import priors

    if args.prior == "spike-and-slab":
        if args.global_scale is not None:
            raise CLIError("--global-scale is an option of --prior horseshoe; for spike-and-slab "
                           "use --prior-inclusion")  # fmt: skip
        if args.prior_inclusion is not None and args.prior_log_odds is not None:
            raise CLIError("give --prior-inclusion or --prior-log-odds, not both (--prior-log-odds "
                           "A is --prior-inclusion 1/(1+exp(-A)))")  # fmt: skip
        kw = {} if args.prior_inclusion is None else {"prior_inclusion": args.prior_inclusion}
        if args.prior_log_odds is not None:
            kw["prior_log_odds"] = args.prior_log_odds
        if args.per_parameter:
            if args.prior_log_odds is None:
                raise CLIError("--per-parameter prices the nodes per parameter with "
                               "--prior-log-odds: add --prior-log-odds A (for example -0.25)")  # fmt: skip
            kw["per_parameter"] = True
        if args.price_per_example and args.per_parameter:  # (0: no price, nothing to clash)
            raise CLIError("--per-parameter and --price-per-example both price each node's "
                           "parameters: give one")  # fmt: skip
        price = _price(args)
        if price is not None:
            kw["price_per_example"] = price
        return priors.SpikeAndSlab(level="node", **kw)
    for name in ("prior_inclusion", "prior_log_odds", "per_parameter", "price_per_example"):
        if getattr(args, name) is not None and getattr(args, name) is not False:
            raise CLIError(f"--{name.replace('_', '-')} is an option of --prior spike-and-slab; "
                           "for the horseshoe use --global-scale")  # fmt: skip
    kw = {} if args.global_scale is None else {"global_scale": args.global_scale}
    return priors.GroupHorseshoe(**kw)


def _price(args: argparse.Namespace) -> float | None:
    """The spike-and-slab price per parameter and example: the default prior's unless
    ``--per-parameter`` prices the nodes itself; ``--price-per-example 0`` turns it off."""
    from .. import priors

    if args.prior != "spike-and-slab" or args.per_parameter:
        return None
    if args.price_per_example is None:
        return priors.DEFAULT_PRICE_PER_EXAMPLE
    return args.price_per_example or None


def fit_command(args: argparse.Namespace) -> None:
    import bayesprune as bp

    from .. import plots
    from ..data import loader

    progress = show_progress(args)
    prior = _prior(args)  # option errors before any training
    _check_devices(args)
    out = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create output directory {out}: {exc.strerror}") from exc
    splits = load_splits(args.data, args.subset, args.seed, args.data_root, args.preprocess)
    input_shape = list(splits.test[0][0].shape)
    net = build_model(args.model, input_shape, splits.num_classes)
    if args.weights is not None:  # a bad file fails before the old run is moved away
        load_weights(net, args.weights, args.model)
    options = {k: json_default(v) if isinstance(v, Path) else v for k, v in vars(args).items()
               if k in _FIT_OPTIONS}  # fmt: skip
    options["price_per_example"] = _price(args)  # the default's, as a number: a resume compares it
    ckpt_path = out / "checkpoint.safetensors"
    if args.resume:
        run_id = _resumable(out, options)
    else:
        retired = retire(out)
        if retired:
            say(f"moved the previous run's files from {out} to {retired}")
        run_id = uuid.uuid4().hex[:12]
        # first: whatever this fit leaves behind if interrupted is marked as the CLI's
        save_json(out / "fit.partial.json", {"run_id": run_id, "options": options})
    train_loader = loader(splits.train, args.batch_size, seed=args.seed)
    # validation accuracies are a progress report, not a result: 1,000 images are enough
    val_loader = loader(Subset(splits.val, range(min(1000, len(splits.val)))), 512, shuffle=False)
    t0 = time.perf_counter()
    if args.resume:
        say(f"1/3 the dense {args.model} of the interrupted fit ({out / 'dense.safetensors'})")
        load_weights(net, out / "dense.safetensors", args.model)
    elif args.weights is not None:
        say(f"1/3 loading your weights for {args.model} from {args.weights} (inputs: "
            f"--preprocess {args.preprocess}, {PREPROCESS_WORDS[args.preprocess]})")  # fmt: skip
    else:
        say(
            f"1/3 training the dense {args.model} for {args.pretrain_epochs} epoch(s) on {args.data}"
        )
        bp.train(net, train_loader, epochs=args.pretrain_epochs, device=args.device,
                 progress=progress, seed=args.seed)  # fmt: skip
    net.cpu().eval()
    dense_acc = bp.evaluate(net, val_loader)
    if not args.resume:
        from safetensors.torch import save_file

        dense_state = {k: v.contiguous() for k, v in net.state_dict().items()}
        atomic_write(out / "dense.safetensors", lambda tmp: save_file(dense_state, tmp))

    say(f"2/3 fitting the posterior ({args.prior} prior) by SVI for {args.epochs} epoch(s)")
    bnet = bp.bayesianize(net, prior=prior, reparam=args.reparam, weight_sd=args.weight_sd)
    result = bp.fit(bnet, train_loader, epochs=args.epochs, lr=args.lr, device=args.device,
                    progress=progress, seed=args.seed, kl_weight=args.kl_weight,
                    structure_delay=args.structure_delay, checkpoint=ckpt_path,
                    resume=ckpt_path if args.resume else None, devices=args.devices,
                    sync_batchnorm=args.sync_batchnorm, compile=args.compile,
                    gate_tests=args.gate_tests)  # fmt: skip
    bnet.save(out / "bayesian.safetensors")
    pips = {k: v.detach().cpu().numpy() for k, v in bnet.inclusion_probs().items()}
    bayes_acc = bp.evaluate(bnet, val_loader, num_samples=8)  # posterior predictive

    say("3/3 writing the run directory")
    cfg = {
        "model": args.model, "weights": str(args.weights) if args.weights else None,
        "data": args.data, "data_root": str(args.data_root) if args.data_root else None,
        "subset": args.subset, "seed": args.seed, "prior": args.prior, "prior_spec": prior.to_dict(),
        "reparam": bnet.reparam, "weight_sd": bnet.weight_sd, "preprocess": args.preprocess,
        "input_shape": input_shape, "num_classes": splits.num_classes, "run_id": run_id,
    }  # fmt: skip
    losses = _history(result)
    epoch_loss = [float(v) for v in getattr(result, "epoch_loss", [])]
    save_json(out / "fit.json", {
        "run_id": run_id, "loss": losses, "epoch_loss": epoch_loss,
        "epochs": args.epochs, "lr": args.lr, "kl_weight": args.kl_weight,
        "structure_delay": args.structure_delay, "devices": args.devices or 1,
        "compiled": result.compiled, "compile_seconds": result.compile_seconds,
        "gate_tests": result.gate_tests, "warnings": list(result.warnings),
        "dense_val_accuracy": dense_acc, "bayes_val_accuracy": bayes_acc,
        "pips": {k: v.tolist() for k, v in pips.items()},
        "nodes_pip_ge_0.5": {k: int((v >= 0.5).sum()) for k, v in pips.items()},
        "nodes": {k: len(v) for k, v in pips.items()},
        "kept_whole": _kept_whole(net, splits.test[0][0][None]),
        "preprocess": args.preprocess,
        "seconds": time.perf_counter() - t0,
    })  # fmt: skip
    save_fig(plots.plot_elbo(losses), out / "elbo.png")
    if pips:
        save_fig(plots.plot_pips(pips), out / "pips.png")
    save_json(out / RUN_FILE, cfg)  # last: a fit interrupted before here left no run
    for name in ("fit.partial.json", "checkpoint.safetensors", "checkpoint.safetensors.resume"):
        (out / name).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    whole = _kept_whole(net, splits.test[0][0][None])
    prunable = {k: v for k, v in pips.items() if k not in whole}  # the output layer is never pruned
    kept = sum(int((v >= 0.5).sum()) for v in prunable.values())
    total = sum(len(v) for v in prunable.values())
    say(f"validation accuracy: dense {dense_acc:.4f}, posterior predictive {bayes_acc:.4f}; "
        f"{kept}/{total} prunable nodes with PIP >= 0.5")  # fmt: skip
    say(f"wrote {out} (run id {run_id})")


def _check_devices(args: argparse.Namespace) -> None:
    """Refuse --devices / --sync-batchnorm that cannot run, before any training."""
    devices = args.devices or 1
    gpu = torch.device(args.device).type == "cuda"
    if args.compile and devices > 1:
        raise CLIError("--compile compiles the step of one process: drop --devices or --compile")
    if args.sync_batchnorm and devices < 2:
        raise CLIError("--sync-batchnorm synchronizes BatchNorm across the processes of "
                       "--devices N > 1; add --devices, or drop --sync-batchnorm")  # fmt: skip
    if args.sync_batchnorm and not gpu:
        raise CLIError("--sync-batchnorm needs GPUs (torch.nn.SyncBatchNorm): add --device "
                       "cuda, or drop it (each process then uses its share's statistics)")  # fmt: skip
    if gpu and devices > torch.cuda.device_count():
        raise CLIError(f"--devices {devices}, but {torch.cuda.device_count()} GPU(s) are "
                       "visible: pass fewer, or use torchrun across machines")  # fmt: skip
    if devices > 1 and args.batch_size < devices:
        raise CLIError(f"--batch-size {args.batch_size} is the global batch, split across "
                       f"--devices {devices}: use --batch-size >= {devices}")  # fmt: skip


#: the options of `fit` that a resumed fit must repeat
_FIT_OPTIONS = (
    "model", "weights", "data", "data_root", "subset", "seed", "prior", "prior_inclusion",
    "prior_log_odds", "per_parameter", "price_per_example", "global_scale", "reparam", "weight_sd", "pretrain_epochs",
    "epochs", "kl_weight", "structure_delay", "lr", "batch_size", "preprocess",
)  # fmt: skip


def _resumable(out: Path, options: dict[str, Any]) -> str:
    """The run id of the interrupted fit in ``out``, after checking that it can be resumed with
    ``options``; a ``CLIError`` that says why not otherwise."""
    partial = out / "fit.partial.json"
    if (out / RUN_FILE).is_file():
        raise CLIError(f"the fit in {out} finished (it has {RUN_FILE}): nothing to resume")
    if not partial.is_file() or not (out / "checkpoint.safetensors.resume").is_file():
        raise CLIError(
            f"nothing to resume in {out}: no interrupted fit that finished an epoch there; run "
            "`bayesprune fit` without --resume"
        )
    try:
        saved = json.loads(partial.read_text())
    except ValueError as exc:
        raise CLIError(f"{partial} is not valid JSON ({exc}); run the fit again") from exc
    then = saved["options"]
    differ = [
        f"--{k.replace('_', '-')} {then.get(k)!r} then, {v!r} now"
        for k, v in options.items()
        # (an option newer than the interrupted fit was off then)
        if then.get(k) != v and not (k not in then and v in (None, False))
    ]
    if differ:
        hint = ""
        if then.get("price_per_example") is None and options.get("price_per_example") is not None:
            hint = (" (a fit without a price per example, the default before it had one: "
                    "add --price-per-example 0)")  # fmt: skip
        raise CLIError(
            f"--resume needs the options of the interrupted fit: {'; '.join(differ)}{hint}"
        )
    return saved["run_id"]


def _history(result: Any) -> list[float]:
    for name in ("loss", "losses", "history", "elbo_loss"):
        value = getattr(result, name, None)
        if value is not None:
            return [float(v) for v in value]
    elbo = getattr(result, "elbo", None)
    if elbo is not None:
        return [-float(v) for v in elbo]
    return []


def _kept_whole(net: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Layers that pruning must keep whole (e.g. the output layer), with the reason."""
    from ..pruning import dependency_groups

    try:
        groups = dependency_groups(net, example)
    except Exception:  # an untraceable network: the report just lacks the note
        return {}
    return {p: "; ".join(g.frozen) for g in groups if g.frozen for p in g.producers}
