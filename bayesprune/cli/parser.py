"""The argument parser of the ``bayesprune`` command: its four subcommands and their options, and
the argument types that reject a bad value with one clear line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._common import PREPROCESS, CLIError

__all__ = ["DATASETS", "PRIORS", "build_parser"]


DATASETS = ("digits", "fashion-mnist")
PRIORS = ("spike-and-slab", "horseshoe")


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
_nonnegative_float = _checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
_fraction = _checked(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
_finite_float = _checked(float, math.isfinite, "a finite number")


def _tests(text: str) -> int | None:
    """``--gate-tests``: a positive number of examples, or ``none``."""
    return None if text.lower() == "none" else _positive_int(text)


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
        help="spike-and-slab: prior probability that a node is on (default: the prior's, 0.1); "
        "the default price per example still caps it (--price-per-example 0 drops the price)",
    )
    fit.add_argument(
        "--prior-log-odds",
        type=_finite_float,
        default=None,
        metavar="A",
        help="spike-and-slab: the prior as log(P / (1 - P)), for priors below 1e-300 "
        "(-1500 charges a node 1,500 nats); instead of --prior-inclusion",
    )
    fit.add_argument(
        "--per-parameter",
        action="store_true",
        help="spike-and-slab: --prior-log-odds A is per parameter, so a node costs -A times "
        "the parameters it removes (one price for big and small nodes: -0.25 prices a "
        "4,144-parameter attention head at 1,036 nats)",
    )
    fit.add_argument(
        "--price-per-example",
        type=_nonnegative_float,
        default=None,
        metavar="LAM",
        help="spike-and-slab: charge each node at least LAM x N nats per parameter (N training "
        "images), so a parameter must be worth LAM nats of mean training loss whatever N "
        "(SpikeAndSlab(price_per_example=LAM)); default 2e-6, the default prior's "
        "(bayesprune.priors.default_prior); 0 charges only the prior inclusion's log-odds",
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
    fit.add_argument("--devices", type=_positive_int, default=None, metavar="N",
                     help="run the SVI on N processes, each on a share of every batch (gloo on "
                     "--device cpu, one GPU each with --device cuda; --batch-size stays the "
                     "global batch); a resumed fit may use another N. Several machines: "
                     "torchrun, see bayesprune.distributed (default: one process)")  # fmt: skip
    fit.add_argument("--sync-batchnorm", action="store_true",
                     help="with --devices: BatchNorm statistics of the global batch "
                     "(torch.nn.SyncBatchNorm, GPUs only; default: each process's own share)")  # fmt: skip
    fit.add_argument("--compile", action="store_true",
                     help="compile the SVI step's forward, loss and backward with torch.compile "
                     "(one process; falls back to the eager step with a warning where "
                     "compilation fails; pays only for long fits of conv nets on a CPU)")  # fmt: skip
    fit.add_argument("--gate-tests", type=_tests, default=256, metavar="N",
                     help="training examples on which each gate switch that the natural gate "
                     "step proposes is tested exactly before it is taken (bp.fit's gate_tests; "
                     "'none' turns the tests off; default 256)")  # fmt: skip
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
