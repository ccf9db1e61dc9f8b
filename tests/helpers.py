"""Test doubles shared by several test modules (not a test module itself)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import bayesprune as bp


class FakeBayesianModule:
    """Implements ARCHITECTURE.md's BayesianModule contract around a plain net (for certify and
    ConformalClassifier)."""

    def __init__(self, model: nn.Module, pips: dict[str, torch.Tensor]) -> None:
        self.model, self.pips, self.num_classes, self.device = model, pips, 10, torch.device("cpu")

    def inclusion_probs(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.pips.items()}

    def mean_module(self, masks=None) -> nn.Module:
        return bp.zero_masked(self.model, masks) if masks else copy.deepcopy(self.model)

    def dense_module(self) -> nn.Module:
        return copy.deepcopy(self.model).eval()

    def predict(
        self, x: torch.Tensor, num_samples: int = 32, seed: int | None = None
    ) -> torch.Tensor:
        return torch.softmax(self.model(x), -1)
