"""The run directory: ``run.json`` and what each command writes into it (``OUTPUTS``), moving an
earlier run's files to ``retired/<its run id>/``, clearing a command's old outputs, and
:class:`Run`, which rebuilds what a run holds -- the data splits, the dense and the Bayesian
network -- from its files and from the model, weights and data that ``run.json`` names."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from .._utils import with_versions
from ._common import CLIError

__all__ = [
    "OUTPUTS",
    "RUN_FILE",
    "Run",
    "build_model",
    "clear",
    "load_splits",
    "load_weights",
    "out_dir",
    "read_run",
    "retire",
]


RUN_FILE = "run.json"

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


def load_splits(
    data: str, subset: int | None, seed: int, root: Path | None, preprocess: str = "standardize"
):
    from ..data import load_digits, load_fashion_mnist

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


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
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


def load_weights(net: nn.Module, path: Path, model: str) -> None:

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


def read_run(run: Path) -> dict[str, Any]:
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


def retire(out: Path) -> str | None:
    """Move a previous run's files out of ``out`` (into ``out/retired/<its run id>/``), run.json
    first, so that nothing of it can be mistaken for the new run's; returns where they went."""
    names = [RUN_FILE] + [n for files in OUTPUTS.values() for n in files]
    present = [n for n in names if (out / n).is_file() or (out / n).is_symlink()]
    if not present:
        return None
    if not ((out / RUN_FILE).is_file() or (out / "fit.partial.json").is_file()):
        raise CLIError(
            f"{out} holds {', '.join(present[:4])} but is not a bayesprune run directory (no "
            f"{RUN_FILE}); fit never moves files it did not write: choose a new --out, or remove them"
        )
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


def clear(out: Path, command: str) -> None:
    """Remove what an earlier ``command`` wrote into ``out``, before writing it anew: an
    interrupted command then leaves its outputs missing, never an old and a new one mixed.

    Only files that ``command`` wrote are removed: the record (the last of its outputs, a JSON
    file with a run id) must be there with them, and links are never followed or removed."""
    names = OUTPUTS[command]
    present = [n for n in names if (out / n).exists() or (out / n).is_symlink()]
    links = [n for n in present if (out / n).is_symlink()]
    if links:
        raise CLIError(
            f"refusing to replace {out / links[0]}: it is a link; remove it or choose another --out"
        )
    if present and not (out / RUN_FILE).is_file():  # --out elsewhere: only our own files go
        try:
            record = json.loads((out / names[-1]).read_text())
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or "run_id" not in record:
            raise CLIError(
                f"{out} holds {', '.join(present[:3])} that `bayesprune {command}` did not write (no "
                f"{names[-1]} with a run id); choose another --out, or remove them"
            )
    for name in reversed(names):  # the record first
        try:
            (out / name).unlink(missing_ok=True)
        except OSError as exc:
            raise CLIError(f"cannot remove the old {out / name}: {exc}") from exc


def out_dir(args: argparse.Namespace) -> Path:
    out = args.out if args.out is not None else args.run
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create output directory {out}: {exc.strerror}") from exc
    return out


class Run:
    """What a run directory holds, rebuilt: data splits, dense net and Bayesian net."""

    def __init__(self, run: Path, device: str) -> None:
        self.dir = run
        self.cfg = read_run(run)
        self.device = device
        self.splits = load_splits(
            self.cfg["data"], self.cfg.get("subset"), self.cfg["seed"],
            Path(self.cfg["data_root"]) if self.cfg.get("data_root") else None,
            self.cfg.get("preprocess", "standardize"),  # runs made before the choice existed
        )  # fmt: skip
        self.run_id = self.cfg.get("run_id")
        self.example = self.splits.test[0][0][None]

    def architecture(self) -> nn.Module:
        return build_model(self.cfg["model"], self.cfg["input_shape"], self.cfg["num_classes"])

    def dense(self) -> nn.Module:
        net = self.architecture()
        load_weights(net, self.dir / "dense.safetensors", self.cfg["model"])
        return net.eval()

    def bayesian(self):
        import bayesprune as bp

        path = self.dir / "bayesian.safetensors"
        if not path.is_file():
            raise CLIError(f"{path} is missing; run `bayesprune fit --out {self.dir}` again")
        bnet = bp.load(path, self.dense(), device=self.device)
        return bnet

    def loader(self, split: str, shuffle: bool = False):
        from ..data import loader

        return loader(getattr(self.splits, split), 256, shuffle=shuffle, seed=self.cfg["seed"])
