"""Shared fixtures. Tests run on the CPU with one thread: CI has 2 cores and no GPU."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesprune.data import DatasetNotFoundError, fashion_mnist_root

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fmnist_available() -> None:
    """Skip (outside CI) or fail (in CI) when the Fashion-MNIST Debian package is missing."""
    try:
        fashion_mnist_root()
    except DatasetNotFoundError as exc:
        if os.environ.get("CI"):
            raise  # CI installs the package: a missing dataset there is a real failure
        pytest.skip(str(exc))


@pytest.fixture
def conv_bn_net() -> tuple[nn.Module, DataLoader]:
    """An untrained conv -> BatchNorm -> conv -> flatten -> linear net on 8x8 images, 3 classes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 2), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3),
    ).eval()  # fmt: skip
    return net, DataLoader(TensorDataset(x, y), batch_size=100)
