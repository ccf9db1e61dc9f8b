"""Shared fixtures. Tests run on the CPU with one thread: CI has 2 cores and no GPU."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesprune.data import DatasetNotFoundError, fashion_mnist_root, load_digits, loader
from bayesprune.models import lenet_300_100
from bayesprune.train import train

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


@pytest.fixture(scope="module")
def digits():
    """sklearn's digits as seeded train / val / cal / test splits."""
    return load_digits(seed=0)


@pytest.fixture(scope="module")
def net(digits) -> nn.Module:
    """A LeNet-300-100 trained briefly on digits (the guarantee layer's tests)."""
    torch.manual_seed(0)
    model = lenet_300_100(in_features=64)
    train(model, loader(digits.train, 64), epochs=8, lr=2e-3, progress=False, seed=0)
    return model.eval()
