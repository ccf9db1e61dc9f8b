"""The ``bayesprune`` command: from a network to a certified smaller network and a report.

Four subcommands share one *run directory*: ``fit`` creates it, the others read it and add to it::

    bayesprune fit     --model lenet_300_100 --data digits --out runs/demo     # train + SVI
    bayesprune prune   --run runs/demo --threshold 0.5                         # smaller network
    bayesprune certify --run runs/demo --alpha 0.02 --delta 0.1                # Learn then Test
    bayesprune report  --run runs/demo                                         # Markdown + plots

=================================  ==============================================================
file in the run directory          written by
=================================  ==============================================================
``run.json``                       ``fit``: model, data, prior and seed, so later steps rebuild them
``dense.safetensors``              ``fit``: the dense network the Bayesian one started from
``bayesian.safetensors``           ``fit``: the variational posterior (``BayesianModule.save``)
``fit.json``, ``elbo.png``,        ``fit``: loss history, PIPs per layer and their plot
``pips.png``
``pruned.safetensors``,            ``prune``: the pruned network (:func:`bayesprune.save_pruned`),
``compression.json``,              its compression report, accuracy and size against the level
``pruning_curve.png``
``certified.safetensors``,         ``certify``: the certified network, the certificate, its risk
``certificate.json``,              curve, and conformal prediction sets on the test split
``risk_curve.png``,
``set_sizes.png``
``report.md``                      ``report``: everything above in one Markdown page
=================================  ==============================================================

``--model`` names a network of ``bayesprune.models`` or your own builder as ``module:function``
(called with whichever of ``num_classes``, ``in_features``, ``in_channels``, ``image_size`` it
accepts, read from the data). Your trained weights come in with ``--weights`` (a ``state_dict``
saved by ``torch.save`` -- read with ``weights_only=True`` -- or a ``.safetensors`` file); inputs are
scaled as ``--preprocess`` says (recorded in ``run.json``). Errors in paths or options, a full disk
or a read-only target are reported on one line with exit status 2 (130 for Ctrl-C); ``--debug``
shows the traceback instead.

Every file is written atomically (:mod:`bayesprune.files`). ``run.json`` holds the run's id, and so
does every JSON record of ``prune`` and ``certify``; ``fit`` writes ``run.json`` last (an
interrupted fit leaves no run) and first moves an earlier run's files to ``retired/<its id>/``;
``report`` refuses records of another fit.

Example
-------
>>> from bayesprune.cli import main
>>> main(["fit", "--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from ._utils import resolve_device, with_versions
from .files import atomic_write, write_json, write_text

__all__ = ["CLIError", "build_parser", "main"]

DATASETS = ("digits", "fashion-mnist")
PRIORS = ("spike-and-slab", "horseshoe")
RUN_FILE = "run.json"
PREPROCESS = ("standardize", "unit")
_PREPROCESS_WORDS = {
    "standardize": "pixels scaled to [0, 1], then standardised with the training set's mean and sd",
    "unit": "pixels scaled to [0, 1]",
}
#: what each command writes into a run directory; each JSON file carries the run's id, and the
#: last file of each list is written last (a command interrupted before it left no record)
OUTPUTS = {
    "fit": (
        "fit.partial.json", "dense.safetensors", "checkpoint.safetensors",
        "checkpoint.safetensors.resume", "bayesian.safetensors", "elbo.png", "pips.png", "fit.json",
    ),
    "prune": ("pruned.safetensors", "pruning_curve.png", "compression.json"),
    "certify": (
        "certified.safetensors", "risk_curve.png", "set_sizes.png", "conformal.json",
        "certificate.json",
    ),
    "report": ("report.md",),
}  # fmt: skip


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (``bayesprune fit: error: ...``), not usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------------------------
def _checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable:
    """An argparse type: ``cast`` the text, then reject values failing ``ok`` with one clear line."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_probability = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
_pip_threshold = _checked(float, lambda v: 0 <= v <= 1, "a PIP threshold in [0, 1]")
_keep_fraction = _checked(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
_positive_float = _checked(float, lambda v: v > 0, "a positive number")
_fraction = _checked(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def _number_list(ok: Callable[[float], bool], expected: str) -> Callable:
    """An argparse type for comma-separated numbers, each checked by ``ok``."""

    def parse(text: str) -> list[float]:
        try:
            values = [float(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers such as 0.3,0.5,0.7, got {text!r}"
            ) from None
        if not values or not all(ok(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return values

    return parse


_fraction_list = _number_list(lambda v: 0 < v <= 1, "fractions in (0, 1] such as 0.8,0.5,0.2")
_threshold_list = _number_list(lambda v: 0 <= v <= 1, "PIP thresholds in [0, 1] such as 0.3,0.5")


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bayesprune`` command (exposed for documentation tools)."""
    from bayesprune.models import MODELS

    parser = _Parser(
        prog="bayesprune",
        description="Bayesian pruning with a certificate: fit a variational posterior over which "
        "nodes a network needs, prune, certify the accuracy loss, and report.",
        epilog="Typical path: bayesprune fit ... --out RUN; bayesprune prune --run RUN; "
        "bayesprune certify --run RUN; bayesprune report --run RUN",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{fit,prune,certify,report}", parser_class=_Parser
    )

    common = _Parser(add_help=False)
    common.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    common.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    bars = common.add_mutually_exclusive_group()
    bars.add_argument("--no-progress", action="store_true", help="hide progress bars")
    bars.add_argument("--progress", action="store_true",
                      help="show progress bars even when stderr is not a terminal (default: shown "
                      "only on a terminal)")  # fmt: skip
    common.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")  # fmt: skip

    fit = sub.add_parser(
        "fit", parents=[common], help="train (or load) a network and fit the Bayesian posterior",
        description="Train a reference network (or load your weights), wrap it with a node-level "
        "sparsity prior and fit the variational posterior by SVI. Writes the run directory.",
    )  # fmt: skip
    fit.add_argument("--model", required=True, metavar="NAME",
                     help=f"architecture from bayesprune.models ({', '.join(sorted(MODELS))}), or your own "
                     "builder as module:function (e.g. mynets:build, imported from the current "
                     "directory or the Python path)")  # fmt: skip
    fit.add_argument("--weights", type=Path, default=None, metavar="PATH",
                     help="your trained weights for --model: a state_dict (.pt/.pth, loaded with "
                     "weights_only=True) or .safetensors; skips dense training")  # fmt: skip
    fit.add_argument("--data", choices=DATASETS, default="digits",
                     help="dataset (default: digits, from scikit-learn)")  # fmt: skip
    fit.add_argument("--preprocess", choices=PREPROCESS, default="standardize",
                     help="input scaling: 'standardize' (default) scales pixels to [0, 1], then "
                     "subtracts the training set's mean and divides by its sd; 'unit' stops at "
                     "[0, 1], as torchvision's ToTensor() does. Use the one your --weights were "
                     "trained with; it is recorded in run.json")  # fmt: skip
    fit.add_argument(
        "--data-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory of the Fashion-MNIST IDX files (default: the Debian package)",
    )
    fit.add_argument(
        "--subset",
        type=_positive_int,
        default=None,
        metavar="N",
        help="use only N training (and N test) examples, for quick runs",
    )
    fit.add_argument(
        "--prior",
        choices=PRIORS,
        default="spike-and-slab",
        help="node-level sparsity prior (default: spike-and-slab)",
    )
    fit.add_argument(
        "--reparam",
        choices=("local", "shared", "auto"),
        default="local",
        help="SVI estimator (default: local; see bp.bayesianize's docstring)",
    )
    fit.add_argument(
        "--weight-sd",
        choices=("per_weight", "rank1"),
        default="per_weight",
        help="variational family of the weights' sds (default: per_weight)",
    )
    fit.add_argument(
        "--pretrain-epochs",
        type=_positive_int,
        default=3,
        metavar="E",
        help="dense training epochs when no --weights are given (default: 3)",
    )
    fit.add_argument(
        "--prior-inclusion",
        type=_probability,
        default=None,
        metavar="P",
        help="spike-and-slab: prior probability that a node is on (default: the prior's, 0.1)",
    )
    fit.add_argument(
        "--global-scale",
        type=_positive_float,
        default=None,
        metavar="A",
        help="horseshoe: scale of the layer-wide half-Cauchy; smaller prunes more (default: 1)",
    )
    fit.add_argument(
        "--epochs", type=_positive_int, default=3, metavar="E", help="SVI epochs (default: 3)"
    )
    fit.add_argument(
        "--kl-weight",
        type=_positive_float,
        default=1.0,
        metavar="BETA",
        help="weight of the KL term: 1 is the ELBO; 0.2 keeps accuracy closer to the dense net "
        "while still pruning (default: 1; see bp.fit)",
    )
    fit.add_argument(
        "--structure-delay",
        type=_fraction,
        default=None,
        metavar="F",
        help="fraction of the SVI steps with the gates frozen (default: bp.fit's, 10%% of "
        "the steps and at most one epoch)",
    )
    fit.add_argument("--lr", type=_positive_float, default=1e-3, help="SVI learning rate")
    fit.add_argument("--resume", action="store_true",
                     help="continue the fit in --out that was interrupted (Ctrl-C, a full disk), "
                     "from the end of its last epoch; give the same options. It ends exactly as "
                     "the fit run straight through would have")  # fmt: skip
    fit.add_argument("--batch-size", type=_positive_int, default=128, metavar="B")
    fit.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="run directory to write"
    )

    prune = sub.add_parser(
        "prune", parents=[common], help="prune nodes by posterior inclusion probability",
        description="Remove the nodes whose posterior inclusion probability (PIP) is below "
        "--threshold (or keep the top --keep fraction), write the smaller network and its "
        "compression report, and plot accuracy and size against the threshold.",
    )  # fmt: skip
    level = prune.add_mutually_exclusive_group()
    level.add_argument("--threshold", type=_pip_threshold, default=None,
                       help="keep nodes with PIP >= threshold (default: 0.5)")  # fmt: skip
    level.add_argument("--keep", type=_keep_fraction, default=None,
                       help="keep this fraction of nodes, highest PIP first")  # fmt: skip
    prune.add_argument(
        "--levels",
        type=_fraction_list,
        default=None,
        metavar="F1,F2,...",
        help="fractions of nodes kept (highest PIP first) for the accuracy / size curve "
        "(default: 0.9,0.8,...,0.1)",
    )
    prune.add_argument("--finetune-epochs", type=_nonnegative_int, default=0, metavar="E",
                       help="fine-tune the pruned network for E epochs (default: 0)")  # fmt: skip
    prune.add_argument("--recalibrate-batches", type=_nonnegative_int, default=0, metavar="N",
                       help="re-estimate the pruned network's BatchNorm statistics on N training "
                       "batches before any fine-tuning (bp.recalibrate_batchnorm; default: 0, off)")  # fmt: skip
    prune.add_argument("--round-to", type=_positive_int, default=None, metavar="K",
                       help="round kept widths up to multiples of K, e.g. 8 (default: off)")  # fmt: skip
    prune.add_argument("--min-nodes", type=_nonnegative_int, default=1, metavar="M",
                       help="nodes every layer keeps (default: 1); 0 lets a layer go with the "
                       "residual branch it feeds")  # fmt: skip
    _run_args(prune)

    cert = sub.add_parser(
        "certify", parents=[common], help="certify a pruning level by Learn then Test",
        description="Pick the most pruned network whose accuracy drop relative to the Bayesian "
        "model is at most --alpha, with probability at least 1 - --delta over the calibration "
        "split (Learn then Test). Then build conformal prediction sets with the certified network.",
    )  # fmt: skip
    cert.add_argument("--alpha", type=_probability, default=0.05,
                      help="tolerated risk, e.g. accuracy drop (default: 0.05)")  # fmt: skip
    cert.add_argument("--delta", type=_probability, default=0.1,
                      help="probability that the certificate is wrong (default: 0.1)")  # fmt: skip
    cert.add_argument(
        "--risk",
        choices=("accuracy_drop", "disagreement", "error"),
        default="accuracy_drop",
        help="the risk to control (default: accuracy_drop)",
    )
    cert.add_argument(
        "--set-alpha",
        type=_probability,
        default=0.1,
        help="miscoverage of the conformal prediction sets (default: 0.1)",
    )
    cert.add_argument(
        "--levels",
        type=_threshold_list,
        default=None,
        metavar="T1,T2,...",
        help="candidate PIP thresholds, increasing (default: from the PIPs)",
    )
    _run_args(cert)

    report = sub.add_parser(
        "report", help="write a Markdown report of a run directory",
        description="Collect what fit, prune and certify wrote into report.md (with the plots).",
    )  # fmt: skip
    _run_args(report)
    return parser


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, metavar="DIR",
                   help="run directory written by `bayesprune fit`")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where to write (default: the run directory)")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(msg, flush=True)


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray | torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _save_fig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def _load_splits(
    data: str, subset: int | None, seed: int, root: Path | None, preprocess: str = "standardize"
):
    from .data import load_digits, load_fashion_mnist

    normalize = preprocess == "standardize"
    if data == "digits":
        splits = load_digits(seed=seed, normalize=normalize)
        if subset is not None:  # as load_fashion_mnist(subset=) does
            splits = type(splits)(
                train=Subset(splits.train, range(min(subset, len(splits.train)))),
                val=splits.val, cal=splits.cal,
                test=Subset(splits.test, range(min(subset, len(splits.test)))),
                num_classes=splits.num_classes,
            )  # fmt: skip
        return splits
    return load_fashion_mnist(root, seed=seed, subset=subset, normalize=normalize)


def _builder(name: str) -> Any:
    """``bayesprune.models.MODELS[name]``, or the callable named by ``module:function``."""
    from bayesprune.models import MODELS

    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise CLIError(
            f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}, or give your "
            "own builder as module:function"
        )
    module_name, _, attr = name.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`: the user's own files are found
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import {module_name!r} for --model {name}: {exc}") from exc
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise CLIError(f"{module_name} has no function {attr!r} (from --model {name})")
    return builder


def _build_model(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A reference network sized for the data: its builder's arguments read from the input shape."""
    builder = _builder(name)
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        params = {}
    kwargs: dict[str, Any] = {}
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    if "in_features" in params:
        kwargs["in_features"] = int(np.prod(input_shape))
    if "in_channels" in params and len(input_shape) == 3:
        kwargs["in_channels"] = int(input_shape[0])
    if "image_size" in params and len(input_shape) == 3:
        kwargs["image_size"] = int(input_shape[-1])
    try:
        net = builder(**kwargs)
    except ValueError as exc:
        raise CLIError(
            f"model {name} does not fit inputs of shape {tuple(input_shape)}: {exc}"
        ) from exc
    if not isinstance(net, nn.Module):
        raise CLIError(f"--model {name} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CLIError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CLIError(f"{path} is not a readable safetensors file ({exc})") from exc
    try:
        with warnings.catch_warnings():  # torch warns about the file on stderr: one line only
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors of many kinds: all mean "not a state_dict"
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc).strip())
        # torch's own message may suggest weights_only=False: never relay that advice
        detail = "" if "weights_only" in text or "Weights only" in text or not text else text
        why = (
            "it is not a plain file of tensors (damaged, another format, or other pickled objects "
            "such as a whole model), and bayesprune never unpickles arbitrary code"
            + (f"; torch said: {detail.splitlines()[0]}" if detail else "")
        )
        raise CLIError(
            f"{path} is not a state_dict saved with torch.save (torch.load(weights_only=True) "
            f"refused it: {why}); save model.state_dict(), or use .safetensors"
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a common checkpoint layout: {"state_dict": ..., "epoch": ...}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CLIError(f"{path} does not hold a state_dict (a dict of tensors)")
    return obj


def _load_weights(net: nn.Module, path: Path, model: str) -> None:

    state = _read_state_dict(path)
    missing, unexpected = [], []
    try:
        result = net.load_state_dict(with_versions(state, net), strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as exc:  # shape mismatch
        raise CLIError(
            f"{path} does not match {model}: {str(exc).splitlines()[-1].strip()}"
        ) from exc
    if missing or unexpected:
        raise CLIError(
            f"{path} does not match {model}: missing keys {missing[:3]}, unexpected keys "
            f"{unexpected[:3]}"
        )


def _read_run(run: Path) -> dict[str, Any]:
    path = run / RUN_FILE
    if not run.is_dir():
        raise CLIError(
            f"run directory {run} does not exist; create it with `bayesprune fit --out {run}`"
        )
    if not path.is_file():
        if any((run / name).exists() for name in OUTPUTS["fit"]):
            raise CLIError(
                f"{run} has no {RUN_FILE}: the last `bayesprune fit --out {run}` did not finish "
                "(interrupted or failed), and its files are not a run; run it again, or continue "
                "it with the same options and --resume"
            )
        raise CLIError(
            f"{run} is not a run directory (no {RUN_FILE}); create it with `bayesprune fit`"
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not valid JSON ({exc})") from exc
    missing = [k for k in ("model", "data", "seed", "input_shape", "num_classes") if k not in cfg]
    if missing:
        raise CLIError(
            f"{path} lacks {', '.join(missing)}; it was not written by `bayesprune fit` (or was "
            f"edited): run `bayesprune fit --out {run}` again"
        )
    return cfg


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars: on a terminal unless --no-progress, elsewhere (a log) only with --progress."""
    return bool(args.progress or (not args.no_progress and sys.stderr.isatty()))


def _retire(out: Path) -> str | None:
    """Move a previous run's files out of ``out`` (into ``out/retired/<its run id>/``), run.json
    first, so that nothing of it can be mistaken for the new run's; returns where they went."""
    names = [RUN_FILE] + [n for files in OUTPUTS.values() for n in files]
    present = [n for n in names if (out / n).is_file() or (out / n).is_symlink()]
    if not present:
        return None
    old_id = None
    try:
        old_id = json.loads((out / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        pass
    dest = out / "retired" / (old_id or time.strftime("unfinished-%Y%m%d-%H%M%S"))
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name in present:
            (out / name).replace(dest / name)
    except OSError as exc:
        raise CLIError(f"cannot move the previous run's files out of {out}: {exc}") from exc
    return str(dest)


def _clear(out: Path, command: str) -> None:
    """Remove what an earlier ``command`` wrote into ``out``, before writing it anew: an
    interrupted command then leaves its outputs missing, never an old and a new one mixed."""
    for name in reversed(OUTPUTS[command]):  # the record first
        try:
            (out / name).unlink(missing_ok=True)
        except OSError as exc:
            raise CLIError(f"cannot remove the old {out / name}: {exc}") from exc


def _out_dir(args: argparse.Namespace) -> Path:
    out = args.out if args.out is not None else args.run
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create output directory {out}: {exc.strerror}") from exc
    return out


def _prior(args: argparse.Namespace):
    from . import priors

    if args.prior == "spike-and-slab":
        if args.global_scale is not None:
            raise CLIError("--global-scale is an option of --prior horseshoe; for spike-and-slab "
                           "use --prior-inclusion")  # fmt: skip
        kw = {} if args.prior_inclusion is None else {"prior_inclusion": args.prior_inclusion}
        return priors.SpikeAndSlab(level="node", **kw)
    if args.prior_inclusion is not None:
        raise CLIError("--prior-inclusion is an option of --prior spike-and-slab; for the "
                       "horseshoe use --global-scale")  # fmt: skip
    kw = {} if args.global_scale is None else {"global_scale": args.global_scale}
    return priors.GroupHorseshoe(**kw)


class _Run:
    """What a run directory holds, rebuilt: data splits, dense net and Bayesian net."""

    def __init__(self, run: Path, device: str) -> None:
        self.dir = run
        self.cfg = _read_run(run)
        self.device = device
        self.splits = _load_splits(
            self.cfg["data"], self.cfg.get("subset"), self.cfg["seed"],
            Path(self.cfg["data_root"]) if self.cfg.get("data_root") else None,
            self.cfg.get("preprocess", "standardize"),  # runs made before the choice existed
        )  # fmt: skip
        self.run_id = self.cfg.get("run_id")
        self.example = self.splits.test[0][0][None]

    def architecture(self) -> nn.Module:
        return _build_model(self.cfg["model"], self.cfg["input_shape"], self.cfg["num_classes"])

    def dense(self) -> nn.Module:
        net = self.architecture()
        _load_weights(net, self.dir / "dense.safetensors", self.cfg["model"])
        return net.eval()

    def bayesian(self):
        import bayesprune as bp

        path = self.dir / "bayesian.safetensors"
        if not path.is_file():
            raise CLIError(f"{path} is missing; run `bayesprune fit --out {self.dir}` again")
        bnet = bp.load(path, self.dense(), device=self.device)
        return bnet

    def loader(self, split: str, shuffle: bool = False):
        from .data import loader

        return loader(getattr(self.splits, split), 256, shuffle=shuffle, seed=self.cfg["seed"])


# ---------------------------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------------------------
def _cmd_fit(args: argparse.Namespace) -> None:
    import bayesprune as bp

    from . import plots
    from .data import loader

    progress = _progress(args)
    prior = _prior(args)  # option errors before any training
    out = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create output directory {out}: {exc.strerror}") from exc
    splits = _load_splits(args.data, args.subset, args.seed, args.data_root, args.preprocess)
    input_shape = list(splits.test[0][0].shape)
    net = _build_model(args.model, input_shape, splits.num_classes)
    if args.weights is not None:  # a bad file fails before the old run is moved away
        _load_weights(net, args.weights, args.model)
    options = {k: _json_default(v) if isinstance(v, Path) else v for k, v in vars(args).items()
               if k in _FIT_OPTIONS}  # fmt: skip
    ckpt_path = out / "checkpoint.safetensors"
    if args.resume:
        run_id = _resumable(out, options)
    else:
        retired = _retire(out)
        if retired:
            _say(f"moved the previous run's files from {out} to {retired}")
        run_id = uuid.uuid4().hex[:12]
    train_loader = loader(splits.train, args.batch_size, seed=args.seed)
    # validation accuracies are a progress report, not a result: 1,000 images are enough
    val_loader = loader(Subset(splits.val, range(min(1000, len(splits.val)))), 512, shuffle=False)
    t0 = time.perf_counter()
    if args.resume:
        _say(f"1/3 the dense {args.model} of the interrupted fit ({out / 'dense.safetensors'})")
        _load_weights(net, out / "dense.safetensors", args.model)
    elif args.weights is not None:
        _say(f"1/3 loading your weights for {args.model} from {args.weights} (inputs: "
             f"--preprocess {args.preprocess}, {_PREPROCESS_WORDS[args.preprocess]})")  # fmt: skip
    else:
        _say(
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
        _write_json(out / "fit.partial.json", {"run_id": run_id, "options": options})

    _say(f"2/3 fitting the posterior ({args.prior} prior) by SVI for {args.epochs} epoch(s)")
    bnet = bp.bayesianize(net, prior=prior, reparam=args.reparam, weight_sd=args.weight_sd)
    result = bp.fit(bnet, train_loader, epochs=args.epochs, lr=args.lr, device=args.device,
                    progress=progress, seed=args.seed, kl_weight=args.kl_weight,
                    structure_delay=args.structure_delay, checkpoint=ckpt_path,
                    resume=ckpt_path if args.resume else None)  # fmt: skip
    bnet.save(out / "bayesian.safetensors")
    pips = {k: v.detach().cpu().numpy() for k, v in bnet.inclusion_probs().items()}
    bayes_acc = bp.evaluate(bnet, val_loader, num_samples=8)  # posterior predictive

    _say("3/3 writing the run directory")
    cfg = {
        "model": args.model, "weights": str(args.weights) if args.weights else None,
        "data": args.data, "data_root": str(args.data_root) if args.data_root else None,
        "subset": args.subset, "seed": args.seed, "prior": args.prior, "prior_spec": prior.to_dict(),
        "reparam": bnet.reparam, "weight_sd": bnet.weight_sd, "preprocess": args.preprocess,
        "input_shape": input_shape, "num_classes": splits.num_classes, "run_id": run_id,
    }  # fmt: skip
    losses = _history(result)
    epoch_loss = [float(v) for v in getattr(result, "epoch_loss", [])]
    _write_json(out / "fit.json", {
        "run_id": run_id, "loss": losses, "epoch_loss": epoch_loss,
        "epochs": args.epochs, "lr": args.lr, "kl_weight": args.kl_weight,
        "structure_delay": args.structure_delay,
        "dense_val_accuracy": dense_acc, "bayes_val_accuracy": bayes_acc,
        "pips": {k: v.tolist() for k, v in pips.items()},
        "nodes_pip_ge_0.5": {k: int((v >= 0.5).sum()) for k, v in pips.items()},
        "nodes": {k: len(v) for k, v in pips.items()},
        "kept_whole": _kept_whole(net, splits.test[0][0][None]),
        "preprocess": args.preprocess,
        "seconds": time.perf_counter() - t0,
    })  # fmt: skip
    _save_fig(plots.plot_elbo(losses), out / "elbo.png")
    if pips:
        _save_fig(plots.plot_pips(pips), out / "pips.png")
    _write_json(out / RUN_FILE, cfg)  # last: a fit interrupted before here left no run
    for name in ("fit.partial.json", "checkpoint.safetensors", "checkpoint.safetensors.resume"):
        (out / name).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    whole = _kept_whole(net, splits.test[0][0][None])
    prunable = {k: v for k, v in pips.items() if k not in whole}  # the output layer is never pruned
    kept = sum(int((v >= 0.5).sum()) for v in prunable.values())
    total = sum(len(v) for v in prunable.values())
    _say(f"validation accuracy: dense {dense_acc:.4f}, posterior predictive {bayes_acc:.4f}; "
         f"{kept}/{total} prunable nodes with PIP >= 0.5")  # fmt: skip
    _say(f"wrote {out} (run id {run_id})")


#: the options of `fit` that a resumed fit must repeat
_FIT_OPTIONS = (
    "model", "weights", "data", "data_root", "subset", "seed", "prior", "prior_inclusion",
    "global_scale", "reparam", "weight_sd", "pretrain_epochs", "epochs", "kl_weight",
    "structure_delay", "lr", "batch_size", "preprocess",
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
    differ = [
        f"--{k.replace('_', '-')} {saved['options'].get(k)!r} then, {v!r} now"
        for k, v in options.items()
        if saved["options"].get(k) != v
    ]
    if differ:
        raise CLIError(f"--resume needs the options of the interrupted fit: {'; '.join(differ)}")
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


def _cmd_prune(args: argparse.Namespace) -> None:
    import bayesprune as bp

    from . import plots

    run = _Run(args.run, args.device)
    out = _out_dir(args)
    progress = _progress(args)
    bnet = run.bayesian()
    dense = run.dense()
    test = run.loader("test")
    threshold = 0.5 if args.threshold is None else args.threshold  # 0 is a valid threshold
    kwargs = {"keep": args.keep} if args.keep is not None else {"threshold": threshold}
    _say(f"pruning with {', '.join(f'{k}={v}' for k, v in kwargs.items())}")
    small = bp.prune(bnet, example_input=run.example, round_to=args.round_to,
                     min_nodes=args.min_nodes, **kwargs)  # fmt: skip
    if args.recalibrate_batches:
        _say(f"re-estimating BatchNorm statistics on {args.recalibrate_batches} training batches")
        try:
            bp.recalibrate_batchnorm(small, run.loader("train", shuffle=True),
                                     num_batches=args.recalibrate_batches, device=args.device,
                                     progress=progress)  # fmt: skip
        except ValueError as exc:  # a network without BatchNorm
            raise CLIError(f"--recalibrate-batches: {exc}") from exc
    if args.finetune_epochs > 0:
        _say(f"fine-tuning for {args.finetune_epochs} epoch(s)")
        bp.finetune(small, run.loader("train", shuffle=True), epochs=args.finetune_epochs,
                    device=args.device, progress=progress, seed=args.seed)  # fmt: skip
    small.cpu().eval()
    _clear(out, "prune")  # just before the first write: an error above leaves the old files
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
        _save_fig(fig, out / "pruning_curve.png")
    _write_json(out / "compression.json", {
        "run_id": run.run_id, "run": str(run.dir), **kwargs, "finetune_epochs": args.finetune_epochs,
        "dense_test_accuracy": dense_acc, "pruned_test_accuracy": small_acc,
        "report": report.to_dict(), "curve": curve,
    })  # fmt: skip
    print(report)
    _say(f"test accuracy: dense {dense_acc:.4f}, pruned {small_acc:.4f}")
    _say(f"wrote {out / 'pruned.safetensors'}")


def _kept_nodes(pips: dict[str, torch.Tensor], kwargs: dict[str, float]) -> list[int]:
    """Nodes kept per layer by a threshold (keep=: the fraction itself)."""
    if "threshold" in kwargs:
        return [int((v >= kwargs["threshold"]).sum()) for v in pips.values()]
    nodes = sum(len(v) for v in pips.values())
    return [round(kwargs["keep"] * nodes)]


def _cmd_certify(args: argparse.Namespace) -> None:
    import bayesprune as bp

    from . import plots
    from .data import loader

    run = _Run(args.run, args.device)
    out = _out_dir(args)
    progress = _progress(args)
    bnet = run.bayesian()
    # Two disjoint halves of the calibration split: one chooses the level (Learn then Test), the
    # other calibrates the conformal sets of the chosen network. Re-using one half for both would
    # make the conformal scores depend on the data that picked the network.
    cal = run.splits.cal
    half = len(cal) // 2
    perm = torch.randperm(len(cal), generator=torch.Generator().manual_seed(args.seed)).tolist()
    ltt_set, conf_set = Subset(cal, perm[:half]), Subset(cal, perm[half:])
    _say(f"certifying {args.risk} <= {args.alpha} with probability >= {1 - args.delta:g} "
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
    _clear(out, "certify")  # just before the first write: an error above leaves the old files
    _save_fig(plots.plot_risk_curve(cert), out / "risk_curve.png")
    print(cert)
    _say(f"test accuracy: certified network {cert_acc:.4f}, dense network (the reference) "
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
    _save_fig(plots.plot_set_sizes(sizes, num_classes=run.cfg["num_classes"], alpha=args.set_alpha),
              out / "set_sizes.png")  # fmt: skip
    _write_json(out / "conformal.json", {
        "run_id": run.run_id, "alpha": args.set_alpha, "calibration_examples": len(conf_set),
        "test_coverage": float(covered.mean()), "mean_set_size": float(sizes.mean()),
        "size_histogram": np.bincount(sizes.astype(int), minlength=run.cfg["num_classes"] + 1),
    })  # fmt: skip
    _write_json(out / "certificate.json", record)  # last: the record of a finished certify
    _say(f"conformal sets (alpha={args.set_alpha}): test coverage {covered.mean():.3f}, "
         f"mean size {sizes.mean():.2f}")  # fmt: skip
    _say(f"wrote {out / 'certificate.json'}")


def _cmd_report(args: argparse.Namespace) -> None:
    run_dir = args.run
    cfg = _read_run(run_dir)
    out = _out_dir(args)

    run_id = cfg.get("run_id")
    command = {"fit.json": "fit --out", "compression.json": "prune --run",
               "certificate.json": "certify --run", "conformal.json": "certify --run"}  # fmt: skip

    def load(name: str) -> dict[str, Any] | None:
        p = run_dir / name
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
        except ValueError as exc:
            raise CLIError(f"{p} is not valid JSON ({exc}); run `bayesprune "
                           f"{command[name]} {run_dir}` again") from exc  # fmt: skip
        if rec.get("run_id") != run_id:
            raise CLIError(
                f"{p} comes from another fit (run id {rec.get('run_id')}, this run is {run_id}); "
                f"run `bayesprune {command[name]} {run_dir}` again, or delete it"
            )
        return rec

    fit, comp, cert, conf = (
        load(n) for n in ("fit.json", "compression.json", "certificate.json", "conformal.json")
    )
    lines = [f"# bayesprune report: {cfg['model']} on {cfg['data']}", ""]
    pre = cfg.get("preprocess", "standardize")
    lines += [
        f"- model: `{cfg['model']}`" + (f" with weights `{cfg['weights']}`" if cfg.get("weights") else ""),
        f"- data: {cfg['data']}" + (f" (subset {cfg['subset']})" if cfg.get("subset") else "")
        + f"; inputs: {_PREPROCESS_WORDS[pre]} (`--preprocess {pre}`)",
        f"- prior: {cfg['prior']}, seed {cfg['seed']}" + (f", run id `{run_id}`" if run_id else ""),
        "",
    ]  # fmt: skip
    if fit:
        lines += ["## Posterior (SVI)", ""]
        beta = fit.get("kl_weight", 1.0)
        objective = "-ELBO" if beta == 1 else f"tempered -ELBO, KL weight {beta:g}"
        final = (fit.get("epoch_loss") or fit["loss"])[-1]  # the last epoch's mean, when recorded
        lines += [f"Loss ({objective} per step, mean of the last epoch) {final:.4g} after "
                  f"{fit['epochs']} epoch(s); "
                  f"validation accuracy: dense {fit['dense_val_accuracy']:.4f}, posterior "
                  f"predictive {fit.get('bayes_val_accuracy', float('nan')):.4f}.", ""]  # fmt: skip
        whole = fit.get("kept_whole", {})
        lines += ["| layer | nodes | PIP >= 0.5 | note |", "|---|---:|---:|---|"]
        lines += [
            f"| `{k}` | {fit['nodes'][k]} | {fit['nodes_pip_ge_0.5'][k]} | "
            f"{'kept whole: ' + whole[k] if k in whole else ''} |"
            for k in fit["nodes"]
        ]
        lines += [
            "",
            _img(out, run_dir, "elbo.png", "ELBO"),
            _img(out, run_dir, "pips.png", "PIPs"),
            "",
        ]
    if comp:
        r = comp["report"]
        level = (
            f"the nodes with PIP >= {comp['threshold']} kept"
            if "threshold" in comp
            else f"the {100 * comp['keep']:.0f}% of the nodes with the highest PIPs kept"
        )
        lines += ["## Pruning", "",
                  f"Pruned with {level}: architecture `{r['architecture_before']}` -> "
                  f"`{r['architecture_after']}`.", "",
                  "| | dense | pruned |", "|---|---:|---:|",
                  f"| parameters | {r['params_before']:,} | {r['params_after']:,} ({100 * r['params_kept']:.1f}%) |",
                  f"| FLOPs (MACs) | {r['flops_before']:,} | {r['flops_after']:,} ({r['flop_reduction']:.2f}x fewer) |",
                  f"| test accuracy | {comp['dense_test_accuracy']:.4f} | {comp['pruned_test_accuracy']:.4f} |"]  # fmt: skip
        for bs, lat in r.get("latency_s", {}).items():
            lines.append(f"| latency, batch {bs} ({r['device']}) | {1e3 * lat['dense']:.3f} ms | "
                         f"{1e3 * lat['pruned']:.3f} ms |")  # fmt: skip
            lo_hi = r.get("speedup_range", {}).get(bs)
            if lo_hi:
                lines.append(f"| speed-up, batch {bs} (median; single rounds) | | "
                             f"{r['speedup'][bs]:.2f}x ({lo_hi[0]:.2f}-{lo_hi[1]:.2f}x) |")  # fmt: skip
        lines += ["", _img(out, run_dir, "pruning_curve.png", "accuracy and size"), ""]
    if cert:
        lines += ["## Certificate (Learn then Test)", ""]
        passed = cert.get("index") is not None
        ref_words = (
            "the run's dense network (dense.safetensors)"
            if cert.get("reference_file")
            else cert.get("reference", "the reference model")
        )
        risk_words = {
            "accuracy_drop": f"accuracy drop relative to {ref_words} (the rate of points the "
            "certified network gets wrong while the dense one gets them right)",
            "disagreement": f"disagreement with {ref_words}",
        }.get(cert["risk"], f"{cert['risk']} (no reference)")
        lines += [
            f"Risk: {risk_words}; alpha = {cert['alpha']}, delta = {cert['delta']}, "
            f"n = {cert['n']} calibration examples.",
            "",
            (f"**Certified level: {cert.get('level_name', 'level')} {_num(cert['level'])}**, "
             f"{_pct(cert.get('params_kept'))} of the parameters kept "
             f"(empirical risk {cert['risk_hat']:.4f}, p-value {cert['p_value']:.3g})."
             if passed else f"**No level could be certified**: {ref_words} is kept."),
            "",
        ]  # fmt: skip
        if "test_accuracy" in cert:
            lines += ["| | reference (dense) | certified |", "|---|---:|---:|",
                      f"| test accuracy | {cert['reference_test_accuracy']:.4f} | "
                      f"{cert['test_accuracy']:.4f} |", ""]  # fmt: skip
        lines += [
            f"Read it as: with probability at least {1 - cert['delta']:g} over the draw of the "
            f"calibration set, the certified network's {risk_words} on new data from the same "
            f"distribution is at most {cert['alpha']}. It says nothing about data from another "
            "distribution.",
            "", _img(out, run_dir, "risk_curve.png", "risk curve"), "",
        ]  # fmt: skip
    if conf:
        lines += ["## Conformal prediction sets", "",
                  f"alpha = {conf['alpha']} (target coverage {1 - conf['alpha']:g}); test coverage "
                  f"{conf['test_coverage']:.3f}, mean set size {conf['mean_set_size']:.2f} "
                  f"({conf['calibration_examples']} calibration examples).", "",
                  _img(out, run_dir, "set_sizes.png", "set sizes"), ""]  # fmt: skip
    missing = [f"`bayesprune {c} --run {run_dir}`" for c, rec in (("prune", comp), ("certify", cert))
               if rec is None]  # fmt: skip
    if missing:
        lines += [f"Not in {run_dir} yet (run {' and '.join(missing)}; results written elsewhere "
                  "with --out are not read):", ""]  # fmt: skip
    write_text(out / "report.md", "\n".join(lines))
    _say(f"wrote {out / 'report.md'}")


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pct(v: float | None) -> str:
    return "?" if v is None else f"{100 * v:.1f}%"


def _kept_whole(net: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Layers that pruning must keep whole (e.g. the output layer), with the reason."""
    from .pruning import dependency_groups

    try:
        groups = dependency_groups(net, example)
    except Exception:  # an untraceable network: the report just lacks the note
        return {}
    return {p: "; ".join(g.frozen) for g in groups if g.frozen for p in g.producers}


def _img(out: Path, run_dir: Path, name: str, alt: str) -> str:
    src = run_dir / name
    if not src.is_file():
        return ""
    rel = Path(os.path.relpath(src.resolve(), out.resolve())).as_posix()
    return f"![{alt}]({rel})"


_COMMANDS = {"fit": _cmd_fit, "prune": _cmd_prune, "certify": _cmd_certify, "report": _cmd_report}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bayesprune`` console script; returns the exit status.

    0 on success, 2 on a user error (bad option, missing file, data that does not fit the model),
    with one line on stderr.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # --debug is accepted anywhere on the line (argparse would only take it before the subcommand)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if getattr(args, "device", None) is not None:
            try:  # before any data is loaded or trained on
                resolve_device(args.device)
            except (RuntimeError, ValueError) as exc:
                raise CLIError(str(exc).replace("device='cpu'", "--device cpu")) from exc
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        if hasattr(args, "seed"):
            torch.manual_seed(args.seed)
        _COMMANDS[args.command](args)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(
            "bayesprune: interrupted; every file is either complete or absent (a fit that did not "
            "finish leaves no run.json: continue it with the same command and --resume)",
            file=sys.stderr,
        )
        return 130
    except CLIError as exc:
        if debug:
            raise
        msg = str(exc)
        print(msg if msg.startswith("bayesprune") else f"bayesprune: error: {msg}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        # Errors raised by the library for bad input carry a message that names the fix.
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"bayesprune: error: {first} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only file system, permissions
        if debug:
            raise
        print(f"bayesprune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
