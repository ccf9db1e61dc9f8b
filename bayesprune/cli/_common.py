"""What the modules of the ``bayesprune`` command share (private to :mod:`bayesprune.cli`): the
one-line user error, the words for each input scaling, progress messages, JSON records and figures
written atomically, and whether progress bars are shown."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write, write_json

__all__ = [
    "PREPROCESS",
    "PREPROCESS_WORDS",
    "CLIError",
    "json_default",
    "save_fig",
    "save_json",
    "say",
    "show_progress",
]


PREPROCESS = ("standardize", "unit")
PREPROCESS_WORDS = {
    "standardize": "pixels scaled to [0, 1], then standardised with the training set's mean and sd",
    "unit": "pixels scaled to [0, 1]",
}


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


def say(msg: str) -> None:
    print(msg, flush=True)


def save_json(path: Path, obj: Any) -> None:
    write_json(path, obj, default=json_default)


def json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray | torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def save_fig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars: on a terminal unless --no-progress, elsewhere (a log) only with --progress."""
    return bool(args.progress or (not args.no_progress and sys.stderr.isatty()))
