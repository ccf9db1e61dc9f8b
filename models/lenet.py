"""LeNet-300-100 and LeNet-5-Caffe, the classic pruning benchmarks."""

from __future__ import annotations

from torch import nn


def lenet_300_100(in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    """MLP ``in_features``-300-100-``num_classes`` with ReLU (LeCun et al. 1998).

    Accepts images of any shape with ``in_features`` pixels: the first layer flattens them.

    >>> import torch
    >>> from bayesprune.models import lenet_300_100
    >>> lenet_300_100()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet5_caffe(
    in_channels: int = 1, num_classes: int = 10, image_size: int = 28
) -> nn.Sequential:
    """LeNet-5-Caffe: conv 20 (5x5) - maxpool - conv 50 (5x5) - maxpool - fc 800-500-``num_classes``.

    For 28x28 input the flattened feature size is 50 x 4 x 4 = 800, as in Caffe's LeNet.

    >>> import torch
    >>> from bayesprune.models import lenet5_caffe
    >>> lenet5_caffe()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    side = ((image_size - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for LeNet-5 (needs at least 16)")
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * side * side, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )
