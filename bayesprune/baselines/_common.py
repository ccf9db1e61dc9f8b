"""Helpers shared by the information-theoretic baselines (SNACS and MINT): paired sample arrays,
class-balanced calibration batches, spatial means of feature maps."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..data import batch_xy

__all__ = ["as_2d", "balanced", "paired", "spatial_mean"]


def as_2d(a: Any, name: str) -> np.ndarray:
    a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [n] or [n, d], got shape {a.shape}")
    if len(a) and not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a.astype(np.float64)


def paired(*arrays: tuple[Any, str]) -> list[np.ndarray]:
    out = [as_2d(a, name) for a, name in arrays]
    if len({len(a) for a in out}) != 1:
        sizes = ", ".join(f"{name}: {len(a)}" for a, (_, name) in zip(out, arrays, strict=True))
        raise ValueError(f"the variables must have the same number of samples, got {sizes}")
    return out


def balanced(loader: Iterable, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for batch in loader:
        x, y = batch_xy(batch)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    gen = torch.Generator().manual_seed(seed)
    idx = []
    for c in torch.unique(y):
        where = (y == c).nonzero().flatten()
        idx.append(where[torch.randperm(len(where), generator=gen)[:per_class]])
    idx = torch.cat(idx)
    return x[idx], y[idx]


def spatial_mean(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).mean(2) if t.dim() > 2 else t
