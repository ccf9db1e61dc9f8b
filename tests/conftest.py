"""Shared fixtures. Tests run on the CPU with one thread: CI has 2 cores and no GPU."""

from __future__ import annotations

import os

import pytest
import torch

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
