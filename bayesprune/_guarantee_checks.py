"""Checks and small helpers shared by the guarantee layer (private: not part of the public API).

:mod:`bayesprune.certificate` (Learn then Test over pruning levels) and :mod:`bayesprune.conformal`
(split-conformal prediction sets) both read a model's class scores on a calibration loader: the
same device lookup, the same refusal of the training loader, the same checks of outputs and labels,
and the same way of freezing a Bayesian model's posterior draws. They live here once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["check_cal_loader", "check_labels", "check_outputs", "device_of", "draw_seed"]


def device_of(model: Any) -> torch.device:
    """``model.device`` when it has one, else the device of its first parameter or buffer (CPU)."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device | str):
        return torch.device(dev)
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        if p is None:
            p = next(model.buffers(), None)
        return p.device if p is not None else torch.device("cpu")
    return torch.device("cpu")


def check_cal_loader(cal_loader: Any, train_loader: Any) -> None:
    """Refuse a calibration loader that is not iterable, or that is (or reads) the training data."""
    if not isinstance(cal_loader, Iterable):
        raise TypeError(
            "cal_loader must be an iterable of (inputs, labels) batches such as a DataLoader, got "
            f"{type(cal_loader).__name__}"
        )
    if train_loader is not None and (
        cal_loader is train_loader
        or (
            getattr(cal_loader, "dataset", None) is not None
            and getattr(cal_loader, "dataset", None) is getattr(train_loader, "dataset", object())
        )
    ):
        raise ValueError(
            "cal_loader is the training loader (or reads the same dataset): conformal guarantees "
            "need calibration data disjoint from the training data. Use a held-out split, e.g. "
            "loader(splits.cal, shuffle=False) from bayesprune.data."
        )


def check_outputs(out: torch.Tensor, num_classes: int | None, who: str) -> int:
    """The number of classes of class scores ``out`` ``[batch, C]``; a clear error when ``out`` has
    another shape, another width than ``num_classes``, or NaN entries."""
    if out.ndim != 2:
        raise ValueError(
            f"{who} returned shape {tuple(out.shape)}; expected [batch, num_classes] class scores"
        )
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(
            f"{who} returned {out.shape[1]} class scores but the task has {num_classes} classes; "
            "check that the model matches the data"
        )
    if out.is_floating_point() and bool(torch.isnan(out).any()):
        raise ValueError(
            f"{who} returned NaN class scores for finite inputs; their argmax would be "
            "an arbitrary class. Check the model's weights (bp.evaluate it on training data)"
        )
    return int(out.shape[1])


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """Labels must be a 1-D tensor of class indices in ``[0, num_classes)``."""
    if y.ndim != 1:
        raise ValueError(
            f"labels must be a 1-D tensor of class indices, got shape {tuple(y.shape)}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}) but the loader holds labels in "
            f"[{int(y.min())}, {int(y.max())}]; check the dataset or the model's number of classes"
        )


def draw_seed(seed: int | None) -> int:
    """``seed``, or one drawn from torch's global generator (reproducible under ``torch.manual_seed``)."""
    return int(torch.randint(2**62, (1,))) if seed is None else seed
