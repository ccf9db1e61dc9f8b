"""Reference networks of the bayesprune benchmark tables.

Each builder returns a plain, freshly initialised :class:`torch.nn.Module` for 28x28 grayscale
input (Fashion-MNIST) by default, in the style of torchvision's model builders::

    from models import lenet_300_100, lenet5_caffe, vgg_small, resnet20, get_model
    net = get_model("resnet20", num_classes=10)

``models`` is installed next to ``bayesprune`` by ``pip install -e .`` (see ``pyproject.toml``), so
tests, benchmarks, tutorials and the ``bayesprune`` command import it by name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .lenet import lenet5_caffe, lenet_300_100
from .resnet import resnet20
from .vgg import vgg_small

__all__ = ["MODELS", "get_model", "lenet5_caffe", "lenet_300_100", "resnet20", "vgg_small"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet_300_100": lenet_300_100,
    "lenet5_caffe": lenet5_caffe,
    "vgg_small": vgg_small,
    "resnet20": resnet20,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a reference network by name (one of :data:`MODELS`)."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return builder(**kwargs)
