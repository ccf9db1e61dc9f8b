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


def fit_options_of_cli(tmp_path, monkeypatch, *flags: str) -> dict:
    """The keyword arguments that ``bayesprune fit --model lenet_300_100 ... *flags`` passes to
    ``bp.fit``; the command is stopped there, before any SVI (exit 130)."""
    from bayesprune.cli import main

    seen: dict = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before any SVI: only the options are checked here

    monkeypatch.setattr(bp, "fit", spy)
    argv = ["fit", "--model", "lenet_300_100", "--out", str(tmp_path / "run"), "--epochs", "1",
            "--pretrain-epochs", "1", "--no-progress", "--threads", "1", *flags]  # fmt: skip
    assert main(argv) == 130
    return seen
