"""Saving and loading pruned networks without pickle (:func:`save_pruned`, :func:`load_pruned`)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import is_bayesian, resolve_device, with_versions
from ..files import atomic_write, check_target
from ..registry import layer_spec, prepare_blocks
from .layers import (
    REPLACED_TYPES,
    ConstantLayer,
    RemovedLayer,
    conv_config,
    geometry,
    layer_widths,
    set_tensor,
)

__all__ = [
    "load_pruned",
    "save_pruned",
]


_FORMAT = "bayesprune.pruned/1"


def save_pruned(small: nn.Module, path: str | Path) -> None:
    """Write a pruned network's weights and layer shapes to a safetensors file (no pickle).

    The metadata records every Linear / Conv / BatchNorm width, so :func:`load_pruned` can re-slice
    an unpruned instance of the architecture to fit, and every ``nn.Identity`` (where
    :func:`bayesprune.fold_batchnorm` removed a BatchNorm), so that a folded network reloads too.

    Example
    -------
    >>> import tempfile, torch
    >>> from bayesprune.pruning import load_pruned, prune_module, save_pruned
    >>> from bayesprune.models import lenet_300_100
    >>> net = lenet_300_100(in_features=64)
    >>> small = prune_module(net, {"1": torch.arange(300) < 7}, torch.zeros(1, 64))
    >>> path = tempfile.mkdtemp() + "/small.safetensors"
    >>> save_pruned(small, path)
    >>> load_pruned(path, lambda: lenet_300_100(in_features=64))[1].out_features
    7
    """
    from safetensors.torch import save_file

    if is_bayesian(small):
        raise TypeError(
            "save_pruned saves a plain pruned network; this is a BayesianModule. Save it with "
            "bnet.save(path) (reload with bp.load), or prune it first: "
            "bp.save_pruned(bp.prune(bnet, ...), path)"
        )
    check_target(path)
    widths, identities, replaced = {}, [], {}
    for name, m in small.named_modules():
        if layer_spec(m) is not None:
            out_w, in_w = layer_widths(m)
            widths[name] = {"type": type(m).__name__, "out": out_w, "in": in_w, **conv_config(m)}
        elif isinstance(m, nn.Identity) and name:
            identities.append(name)
        elif isinstance(m, REPLACED_TYPES):
            replaced[name] = {
                "as": type(m).__name__,
                "type": m.kind,
                "in": layer_widths(m)[1],
                "norms": list(m.norms),
                "geometry": m.geometry,
            }
    # cloned, contiguous CPU tensors: safetensors refuses views and shared storage
    state = {k: v.detach().cpu().contiguous().clone() for k, v in small.state_dict().items()}
    meta = {
        "format": _FORMAT,
        "widths": json.dumps(widths),
        "identities": json.dumps(identities),
        "replaced": json.dumps(replaced),
    }
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def _check_against_base(name: str, saved: dict[str, Any], m: nn.Module) -> None:
    """Refuse a base whose layer computes something else than the saved one, or is narrower."""
    base_out, base_in = layer_widths(m)
    if saved["out"] > base_out or saved["in"] > base_in:
        raise ValueError(
            f"layer {name!r} was saved {saved['in']} -> {saved['out']} wide but base's is "
            f"{base_in} -> {base_out}: pruning never widens a layer, so base is not the "
            "architecture the network was pruned from; pass that (unpruned) architecture"
        )
    for key, value in conv_config(m).items():
        if key in saved and saved[key] != value:  # files saved before this check lack it
            raise ValueError(
                f"layer {name!r} was saved with {key}={saved[key]} but base's has {key}={value}: "
                "pass the architecture the network was pruned from"
            )


def load_pruned(
    path: str | Path, base: nn.Module | Callable[[], nn.Module], *, device: str = "cpu"
) -> nn.Module:
    """Rebuild a network saved by :func:`save_pruned`.

    Parameters
    ----------
    path
        A file written by :func:`save_pruned`.
    base
        An unpruned instance of the architecture (it is copied, not modified) or a callable that
        builds one, e.g. ``lambda: resnet20()``. Its layers are re-sliced to the saved widths.
    device
        Where the returned network lives.

    Returns
    -------
    nn.Module
        ``base``'s architecture with the saved widths and weights, in ``base``'s mode (a freshly
        built module is in training mode): call ``.eval()`` before inference (BatchNorm).

    Raises
    ------
    ValueError
        When ``base`` is not the architecture the network was pruned from: a layer of another
        type, a convolution with another kernel, stride, padding, dilation or groups, or a layer
        narrower than the saved one.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    device = resolve_device(device)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a safetensors file ({exc})") from exc
    if meta.get("format") != _FORMAT:
        raise ValueError(
            f"{path} was not written by bayesprune.save_pruned (metadata format "
            f"{meta.get('format')!r}, expected {_FORMAT!r})"
        )
    widths = json.loads(meta["widths"])
    state = load_file(str(path))
    if isinstance(base, nn.Module):
        net = copy.deepcopy(base)
    elif callable(base):
        net = base()
        if not isinstance(net, nn.Module):
            raise TypeError(f"base() must return an nn.Module, got {type(net).__name__}")
    else:
        raise TypeError(f"base must be an nn.Module or a callable building one, got {type(base)}")
    for name in json.loads(meta.get("identities", "[]")):
        try:
            net.set_submodule(name, nn.Identity())
        except AttributeError as exc:
            raise ValueError(
                f"the saved network has a folded layer at {name!r} that base does not have: "
                "pass the same architecture"
            ) from exc
    modules = dict(net.named_modules())
    for name, r in json.loads(meta.get("replaced", "{}")).items():
        layer = modules.get(name)
        if layer is None or type(layer).__name__ != r["type"]:
            raise ValueError(
                f"the saved network has a removed {r['type']} at {name!r} but base has "
                f"{type(layer).__name__ if layer is not None else 'nothing'} there: pass the same "
                "architecture"
            )
        if "geometry" in r and json.loads(json.dumps(geometry(layer))) != r["geometry"]:
            raise ValueError(
                f"the removed layer {name!r} was saved with kernel, padding and stride "
                f"{r['geometry']} but base's are {geometry(layer)}: pass the architecture the "
                "network was pruned from"
            )
        if r["as"] == "RemovedLayer":
            net.set_submodule(name, RemovedLayer(layer, r["in"], r["norms"]))
        else:
            value = torch.empty_like(state[f"{name}.value"])
            net.set_submodule(name, ConstantLayer(layer, value, r["norms"]))
    modules = dict(net.named_modules())
    for name, w in widths.items():
        m = modules.get(name)
        nodes = None if m is None else getattr(layer_spec(m), "nodes", None)
        pruned = None if nodes is None else nodes.pruned_type
        if pruned is not None and type(m) is not pruned and pruned.__name__ == w["type"]:
            # a layer the pruner replaces by another class (attention -> fewer heads): that
            # class, with as many nodes as the file holds (their weights are read below)
            _check_against_base(name, w, m)
            m = nodes.select(m, torch.arange(w["out"]))
            net.set_submodule(name, m)
            modules = dict(net.named_modules())
        if m is None or type(m).__name__ != w["type"]:
            raise ValueError(
                f"the saved network has a {w['type']} at {name!r} but base has "
                f"{type(m).__name__ if m is not None else 'nothing'} there: pass the same architecture"
            )
        _check_against_base(name, w, m)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            key = f"{name}.{attr}" if name else attr
            # any registered slot the file fills, including a bias that folding added
            if key in state and (attr in m._parameters or attr in m._buffers):
                set_tensor(m, attr, torch.empty_like(state[key]))
        layer_spec(m).resize(m, w["out"], w["in"])
    prepare_blocks(net)
    try:
        net.load_state_dict(with_versions(state, net), strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"the weights in {path} do not fit base {type(net).__name__}: {exc}"
        ) from exc
    return net.to(device)
