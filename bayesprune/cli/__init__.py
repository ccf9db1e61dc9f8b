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

The package: :mod:`.parser` (the options), :mod:`.rundir` (the run directory and what it rebuilds),
one module per command (:mod:`.fit`, :mod:`.prune`, :mod:`.certify`, :mod:`.report`), and
``_common`` (what they share); :func:`main` here runs them.

Example
-------
>>> from bayesprune.cli import main
>>> main(["fit", "--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from .._utils import resolve_device
from ._common import CLIError
from .certify import certify_command
from .fit import fit_command
from .parser import build_parser
from .prune import prune_command
from .report import report_command
from .rundir import OUTPUTS, RUN_FILE, Run, load_splits, load_weights

# main, CLIError and build_parser are the command's own; the run directory's names are re-exported
# for scripts and tests that look into a run
__all__ = [
    "OUTPUTS",
    "RUN_FILE",
    "CLIError",
    "Run",
    "build_parser",
    "load_splits",
    "load_weights",
    "main",
]

_COMMANDS = {
    "fit": fit_command,
    "prune": prune_command,
    "certify": certify_command,
    "report": report_command,
}


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
