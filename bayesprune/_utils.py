"""Small helpers shared across the package (private: not re-exported by ``bayesprune``).

Device resolution, the duck-typed BayesianModule check, train/eval modes kept, module versions
for state dicts read from safetensors, seed and level validation, and the Pyro ``param`` effect
of module-owned parameters.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import pyro
import torch
from torch import nn

__all__ = [
    "check_level",
    "check_seed",
    "is_bayesian",
    "modes_kept",
    "param_effect",
    "resolve_device",
    "with_versions",
]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device`` or ``None`` (CPU) into a device.

    Raises a clear error when CUDA is asked for but not available, instead of falling back silently.
    """
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device} was requested but CUDA is not available on this machine; use device='cpu'"
        )
    return device


def is_bayesian(model: Any) -> bool:
    """Whether ``model`` follows the BayesianModule contract of ARCHITECTURE.md (duck-typed, so
    that test doubles and wrappers qualify)."""
    return callable(getattr(model, "inclusion_probs", None)) and callable(
        getattr(model, "mean_module", None)
    )


@contextlib.contextmanager
def modes_kept(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit (``module.train(flag)`` would set
    them all alike, e.g. unfreeze a BatchNorm the user keeps in eval mode inside a training net)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def with_versions(state: Mapping[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` plus the per-module versions of ``net``, into which it is about to be loaded.

    ``torch.save`` keeps them (``state_dict()._metadata``) and safetensors files do not; some
    modules refuse to load without them (torchvision's MNASNet). A state that has its own (an
    old ``torch.save`` checkpoint, whose BatchNorms may predate ``num_batches_tracked``) keeps
    them, so that each module's loader upgrades it; a safetensors file was saved from the same
    code, so the freshly built ``net``'s versions are the right ones for it.
    """
    if getattr(state, "_metadata", None) is not None:
        return state  # type: ignore[return-value]
    out = OrderedDict(state)
    out._metadata = getattr(net.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    return out


def check_seed(seed: Any) -> int:
    """``seed`` if torch's generators take it, else a clear error."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer or None, got {seed!r}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits (-2**63 <= seed < 2**64), got {seed}")
    return seed


def check_level(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return value


def param_effect(name: str, p: torch.Tensor) -> None:
    """Emit a ``param`` site for an ``nn.Parameter`` without touching Pyro's global param store.

    ``pyro.infer.SVI`` collects the parameters to optimise from these sites, so the guide can be run
    with ``SVI`` and ``pyro.optim`` while the module keeps owning its parameters.
    """
    import weakref

    p.unconstrained = weakref.ref(p)  # what the param store attaches to its values
    pyro.poutine.runtime.effectful(type="param")(lambda *_, **__: p)(
        name, p, constraint=torch.distributions.constraints.real, name=name
    )
