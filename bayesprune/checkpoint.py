"""Fit checkpoints: what :func:`bayesprune.fit` writes with ``checkpoint=`` and reads with ``resume=``.

``fit(..., checkpoint=path)`` writes two files at the end of every epoch:

* ``path``: the :class:`~bayesprune.BayesianModule` in the format of
  :meth:`~bayesprune.BayesianModule.save` (read it with ``bp.load(path, net)``);
* ``path.resume``: the fit state, everything ``fit(..., resume=path)`` needs to continue the
  fit as if it had not stopped: the module's state, the optimizers' and learning-rate
  schedulers' states, the gradients of the gate logits (``fit`` does not zero them with
  the others: the natural-gradient step sees their sum over the steps so far), the state of the
  gate tests (:mod:`bayesprune.gate_tests`: their examples, holds and counts), the step and
  epoch reached, the :class:`~bayesprune.FitResult` history so far, the random states (torch's CPU generator, the fit device's CUDA generator, Python's
  ``random``, NumPy's global generator) and the state of every ``torch.Generator`` the training
  loader brings (its own, its sampler's), and the fit's options, which a resumed fit must repeat.

Both are safetensors files: tensors in the body, the rest as JSON in the header. Nothing is
unpickled on reading. Each is written to a temporary file in the same folder and then moved over
the old one (``os.replace``), so an interrupted write leaves the previous file whole and no
partial file behind (a process killed outright may leave a hidden ``.NAME.HEX.tmp`` file, which
is never read). The fit state is written first and is self-contained: ``resume=`` reads only
``path.resume``.

Example
-------
>>> import os, tempfile, torch
>>> import bayesprune as bp
>>> from torch.utils.data import DataLoader, TensorDataset
>>> data = TensorDataset(torch.randn(64, 5), torch.randint(0, 3, (64,)))
>>> net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> folder = tempfile.mkdtemp()
>>> path = os.path.join(folder, "fit.safetensors")
>>> loader = DataLoader(data, batch_size=16, shuffle=True)
>>> _ = bp.fit(bp.bayesianize(net), loader, epochs=2, checkpoint=path, progress=False)
>>> sorted(os.listdir(folder))
['fit.safetensors', 'fit.safetensors.resume']
>>> bp.load(path, net).num_data
64
>>> bp.fit(bp.bayesianize(net), loader, epochs=2, resume=path, progress=False)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: resume=...: the checkpoint holds a finished fit (all 2 epochs); there is nothing to continue. Load the fitted module with bp.load(path, net), or start a new fit to train longer
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bayesianize import BayesianModule
from .files import atomic_write

__all__ = ["FORMAT", "SUFFIX", "load_fit_state", "restore", "save_fit_state", "state_path"]

FORMAT = "bayesprune-fit-1"
SUFFIX = ".resume"
_META = "bayesprune_fit"
_BNET = "bnet/"
_RESULT_LISTS = ("loss", "epoch_loss", "kl", "nll", "val_accuracy", "val_median_accuracy")


def check_path(path: str | Path) -> None:
    """Refuse a ``checkpoint=`` path whose module file would overwrite its own fit state."""
    if Path(path).name.endswith(SUFFIX):
        raise ValueError(
            f"checkpoint={str(path)!r} ends in {SUFFIX!r}, the ending fit gives the fit-state file "
            "it writes next to the module file; name the module file (e.g. fit.safetensors: the "
            f"fit state then goes to fit.safetensors{SUFFIX})"
        )


def state_path(path: str | Path) -> Path:
    """The fit-state file of the checkpoint ``path`` (``path`` itself if it is one)."""
    path = Path(path)
    return path if path.name.endswith(SUFFIX) else path.with_name(path.name + SUFFIX)


# -- atomic writes ---------------------------------------------------------------------------------
def _write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (the temporary file of :func:`files.atomic_write`) and flush it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_module(bnet: BayesianModule, path: str | Path) -> None:
    """``bnet.save(path)``, atomically."""

    def write(tmp: str) -> None:
        bnet.save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    atomic_write(path, write)


# -- JSON + tensors --------------------------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """``obj`` as JSON, its tensors moved to ``tensors`` under keys starting with ``key``.

    Tuples, dicts with non-string keys and NumPy arrays keep their type through a round trip.
    """
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors of the fit state would be stored as {key!r}")
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": [str(obj.dtype), obj.tolist()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_encode(k, tensors, key), _encode(v, tensors, f"{key}/{k}")]
                for k, v in obj.items()
            ]
        }
    raise TypeError(f"cannot store a {type(obj).__name__} in a fit checkpoint (at {key})")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        dtype, values = obj["__ndarray__"]
        return np.array(values, dtype=dtype)
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    raise ValueError(f"unknown entry in a fit checkpoint: {sorted(obj)}")


# -- random states ---------------------------------------------------------------------------------
def loader_generators(loader: Iterable) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects ``loader`` draws its order from, by where they sit:
    ``DataLoader(generator=g)`` (the loader's and its sampler's), a sampler's own, or the
    ``generator`` attribute of a custom loader."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    places = {
        "loader": loader,
        "sampler": getattr(loader, "sampler", None),
        "batch_sampler": batch_sampler,
        "batch_sampler.sampler": getattr(batch_sampler, "sampler", None),
    }
    found = {}
    for place, obj in places.items():
        generator = getattr(obj, "generator", None) if obj is not None else None
        if isinstance(generator, torch.Generator):
            found[place] = generator
    return found


def seed_loader(loader: Iterable, seed: int) -> None:
    """Seed every generator of :func:`loader_generators` with ``seed``."""
    for generator in {id(g): g for g in loader_generators(loader).values()}.values():
        generator.manual_seed(seed)


def rng_state(device: torch.device, loader: Iterable) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "random": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the global one, which seed= seeds
        "loader": {k: g.get_state() for k, g in loader_generators(loader).items()},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device, loader: Iterable) -> list[str]:
    """Restore ``state``; returns what could not be restored (for a warning)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    lost = []
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    elif "cuda" in state or device.type == "cuda":
        lost.append("the CUDA generator (the checkpoint and this fit run on different devices)")
    generators = loader_generators(loader)
    for place, saved in state["loader"].items():
        if place in generators:
            generators[place].set_state(saved)
        else:
            lost.append(f"the generator of train_loader's {place} (this train_loader has none)")
    for place in generators.keys() - state["loader"].keys():
        lost.append(f"the generator of train_loader's {place} (the checkpointed loader had none)")
    return lost


# -- the fit-state file ----------------------------------------------------------------------------
def _bnet_config(bnet: BayesianModule) -> dict[str, Any]:
    """What must match between the module that wrote a checkpoint and the one resuming it."""
    cfg = json.loads(json.dumps(bnet.config()))
    for key in ("num_data", "input_shape", "dense_reference"):
        cfg.pop(key, None)
    for prior in cfg.get("priors", {}).values():  # N of a prior that depends on it: as num_data
        prior.pop("num_data", None)
    return cfg


def save_fit_state(
    path: str | Path,
    bnet: BayesianModule,
    optimizers: dict[str, dict[str, Any]],
    result: Any,
    **state: Any,
) -> None:
    """Write, atomically, the fit state to ``path``: the state of ``bnet``, the ``state_dict()``
    of each optimizer and scheduler in ``optimizers``, the history ``result`` (a
    :class:`~bayesprune.FitResult`) and ``state`` (JSON-able apart from tensors, tuples and
    NumPy arrays: the epoch and step reached, the random states, the fit's options)."""
    from safetensors.torch import save

    tensors = {
        _BNET + k: v.detach().cpu().contiguous().clone() for k, v in bnet.state_dict().items()
    }
    state.update(optimizers)
    for name in _RESULT_LISTS:
        tensors[f"result/{name}"] = torch.tensor(getattr(result, name), dtype=torch.float64)
    for layer, values in result.nodes_off.items():
        tensors[f"result/nodes_off/{layer}"] = torch.tensor(values, dtype=torch.float64)
    header = {
        "format": FORMAT,
        "bnet": _bnet_config(bnet),
        "input_shape": None if bnet.input_shape is None else list(bnet.input_shape),
        "nodes_off": list(result.nodes_off),
        "seconds": result.seconds,
        "state": _encode(state, tensors, "state"),
    }
    data = save(tensors, metadata={_META: json.dumps(header)})
    atomic_write(path, lambda tmp: _write_bytes(tmp, data))


def load_fit_state(path: str | Path) -> dict[str, Any]:
    """Read a fit-state file: its header, with ``"state"`` decoded, ``"bnet_state"`` and the
    history lists under ``"result"``. Raises ``FileNotFoundError`` or ``ValueError`` with the fix."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    given = Path(path)
    file = state_path(given)
    if not file.is_file():
        if given.is_file():
            raise FileNotFoundError(
                f"resume={str(given)!r}: {given} exists but its fit state {file.name} does not, so "
                "the fit cannot be continued exactly (written by bnet.save, by a fit with a custom "
                "elbo, or by a bayesprune without resume). Load the module with bp.load(path, net) "
                "and start a new fit"
            )
        raise FileNotFoundError(
            f"resume={str(given)!r}: no fit checkpoint at {file}. Pass the path that the fit to "
            f"continue was given as checkpoint= (it writes {given.name} and {file.name} after "
            "every epoch)"
        )
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"resume: {file} is not a readable safetensors file ({exc})") from exc
    if _META not in meta:
        raise ValueError(
            f"resume: {file} is not a bayesprune fit checkpoint (no {_META!r} metadata); pass the "
            "path given as checkpoint= to the fit to continue"
        )
    header = json.loads(meta[_META])
    if header.get("format") != FORMAT:
        raise ValueError(
            f"resume: {file} has format {header.get('format')!r}; this bayesprune reads {FORMAT!r}"
        )
    tensors = load_file(str(file))
    header["file"] = str(file)
    header["state"] = _decode(header["state"], tensors)
    header["bnet_state"] = {k[len(_BNET) :]: v for k, v in tensors.items() if k.startswith(_BNET)}
    lists = {name: tensors[f"result/{name}"].tolist() for name in _RESULT_LISTS}
    lists["nodes_off"] = {k: tensors[f"result/nodes_off/{k}"].tolist() for k in header["nodes_off"]}
    header["result"] = lists
    return header


def check_resumable(saved: dict[str, Any], options: dict[str, Any], bnet: BayesianModule) -> None:
    """Raise a ``ValueError`` that names the fix when ``fit``'s call differs from the one that
    wrote ``saved``, when ``bnet`` is not built like the checkpointed module, or when the
    checkpoint holds a finished fit."""
    file = saved["file"]
    before = saved["state"]["options"]
    differ = [
        f"{k}={before.get(k)!r} in the checkpoint, {v!r} now"
        for k, v in options.items()
        if k != "seed" and before.get(k) != v
    ]
    if options["seed"] is not None and options["seed"] != before.get("seed"):
        differ.append(f"seed={before.get('seed')!r} in the checkpoint, {options['seed']!r} now")
    if differ:
        raise ValueError(
            f"resume={file!r} continues a fit with other options: {'; '.join(differ)}. Pass the "
            "options of the fit being continued (the learning-rate schedule and the structure "
            "freeze span all of its epochs, so they cannot change midway), or start a new fit"
        )
    mine = _bnet_config(bnet)
    if mine != saved["bnet"]:
        keys = sorted(
            k for k in mine.keys() | saved["bnet"].keys() if mine.get(k) != saved["bnet"].get(k)
        )
        raise ValueError(
            f"resume={file!r}: bnet is not built like the module in the checkpoint (it differs in "
            f"{', '.join(keys)}); resume into bp.bayesianize(net, ...) with the same network, "
            "prior and options as the fit being continued"
        )
    state = bnet.state_dict()
    theirs = saved["bnet_state"]
    wrong = [
        k for k in state.keys() | theirs.keys()
        if k not in state or k not in theirs or state[k].shape != theirs[k].shape
    ]  # fmt: skip
    if wrong:
        raise ValueError(
            f"resume={file!r}: bnet's parameters do not match the checkpoint's ({', '.join(sorted(wrong)[:5])}"
            f"{', ...' if len(wrong) > 5 else ''}); resume into a module built from the same "
            "network architecture"
        )
    done = saved["state"]["epoch"]
    if done >= options["epochs"]:
        raise ValueError(
            f"resume={file!r}: the checkpoint holds a finished fit (all {done} epochs); there is "
            "nothing to continue. Load the fitted module with bp.load(path, net), or start a new "
            "fit to train longer"
        )


def restore(
    saved: dict[str, Any], bnet: BayesianModule, optimizers: dict[str, Any], result: Any
) -> tuple[list[str] | None, int, int]:
    """Load a fit state read by :func:`load_fit_state` into ``bnet``, the optimizers and
    schedulers ``optimizers`` (by the names they were saved under) and ``result``; returns the
    hidden layers, the step and the number of epochs done."""
    state = saved["state"]
    if optimizers.keys() != state.keys() & {
        "optimizer",
        "scheduler",
        "gate_optimizer",
        "gate_scheduler",
        "gate_tests",
    }:
        raise ValueError(
            f"resume={saved['file']!r}: the checkpoint's optimizers ({', '.join(sorted(state))}) "
            f"do not match this fit's ({', '.join(sorted(optimizers))}): resume with the "
            "bayesprune version and prior that wrote it"
        )
    with torch.no_grad():
        own = bnet.state_dict()
        for k, v in saved["bnet_state"].items():
            own[k].copy_(v)
        params = dict(bnet.named_parameters())
        for k, grad in state.get("grads", {}).items():
            p = params[k]
            p.grad = None if grad is None else grad.to(device=p.device, dtype=p.dtype).clone()
    shape = saved["input_shape"]
    bnet.input_shape = None if shape is None else tuple(shape)
    for name, obj in optimizers.items():
        obj.load_state_dict(state[name])
    for name, values in saved["result"].items():
        setattr(result, name, values)
    result.seconds = saved["seconds"]
    return state["hidden"], state["step"], state["epoch"]
