"""A small VGG-style network (conv-BN-ReLU blocks) for 28x28 grayscale input."""

from __future__ import annotations

from torch import nn

_DEFAULT_CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M")


def vgg_small(
    in_channels: int = 1,
    num_classes: int = 10,
    cfg: tuple = _DEFAULT_CFG,
    hidden: int = 256,
    image_size: int = 28,
) -> nn.Module:
    """VGG-style net: ``cfg`` lists conv widths (3x3, padding 1, BatchNorm, ReLU) and ``"M"`` pools.

    With the default ``cfg`` a 28x28 image becomes 128 x 3 x 3 features, then fc ``hidden``-classes.

    >>> import torch
    >>> from bayesprune.models import vgg_small
    >>> vgg_small()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            side //= 2
        else:
            layers += [
                nn.Conv2d(channels, item, 3, padding=1, bias=False),
                nn.BatchNorm2d(item),
                nn.ReLU(),
            ]
            channels = item
    net = nn.Sequential()
    net.add_module("features", nn.Sequential(*layers))
    net.add_module(
        "classifier",
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        ),
    )
    return net
