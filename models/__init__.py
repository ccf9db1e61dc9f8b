"""Reference networks of the bayesprune benchmark tables, installed as ``bayesprune.models``.

Each builder returns a plain, freshly initialised :class:`torch.nn.Module` for 28x28 grayscale
input (Fashion-MNIST) by default. As with torchvision's model builders, a network is built either
by its function or by its name, with the builder's options as keyword arguments:

>>> from bayesprune.models import get_model, list_models, resnet20
>>> list_models()
['lenet5_caffe', 'lenet_300_100', 'resnet20', 'vgg_small']
>>> net = get_model("resnet20", num_classes=3)
>>> type(net) is type(resnet20())
True

The source lives in the repository's top-level ``models/`` folder; ``pyproject.toml`` installs it
inside the package (``package-dir``), so it never clashes with a ``models`` package of your own.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from .lenet import lenet5_caffe, lenet_300_100
from .resnet import resnet20
from .vgg import vgg_small

__all__ = [
    "MODELS",
    "get_model",
    "lenet5_caffe",
    "lenet_300_100",
    "list_models",
    "resnet20",
    "vgg_small",
]

#: The builders by name; :func:`get_model` and :func:`list_models` read this dict.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet_300_100": lenet_300_100,
    "lenet5_caffe": lenet5_caffe,
    "vgg_small": vgg_small,
    "resnet20": resnet20,
}


def list_models() -> list[str]:
    """The names :func:`get_model` accepts, sorted.

    >>> from bayesprune.models import list_models
    >>> list_models()
    ['lenet5_caffe', 'lenet_300_100', 'resnet20', 'vgg_small']
    """
    return sorted(MODELS)


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the reference network ``name`` (one of :func:`list_models`), freshly initialised.

    ``kwargs`` are the builder's options, by keyword only (e.g. ``num_classes``, ``in_channels``);
    an unknown name or option raises a :class:`ValueError` that lists the valid ones.

    >>> import torch
    >>> from bayesprune.models import get_model
    >>> net = get_model("lenet5_caffe", num_classes=3)
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 3])
    >>> get_model("resnet18")
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'resnet18' (did you mean 'resnet20'?); known models: lenet5_caffe, lenet_300_100, resnet20, vgg_small
    """
    if not isinstance(name, str):
        raise TypeError(f"get_model: name must be a model name (str), not {type(name).__name__}")
    try:
        builder = MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint}; known models: {', '.join(list_models())}"
        ) from None
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params]
    if unknown and not takes_any:
        raise ValueError(
            f"{name} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(params) or 'none'}"
        )
    return builder(**kwargs)
