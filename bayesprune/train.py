"""Training and evaluation of deterministic networks: the dense baselines and fine-tuning.

Example
-------
>>> from bayesprune.data import load_digits, loader
>>> from bayesprune.train import train, evaluate
>>> from bayesprune.models import lenet_300_100
>>> splits = load_digits(seed=0)
>>> net = lenet_300_100(in_features=64)
>>> history = train(net, loader(splits.train, 64), epochs=2, progress=False)
>>> 0.0 <= evaluate(net, loader(splits.test, 256, shuffle=False)) <= 1.0
True
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._utils import is_bayesian, resolve_device
from .data import (
    batch_xy,
    check_class_labels,
    check_finite,
    input_errors,
    label_errors,
    output_tensor,
)

__all__ = ["TrainHistory", "evaluate", "resolve_device", "train"]


@dataclass
class TrainHistory:
    """Per-step training loss and per-epoch metrics of :func:`train`."""

    loss: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)


def _check_loader(data: Iterable, name: str) -> None:
    if not isinstance(data, Iterable):
        raise TypeError(
            f"{name} must be an iterable of (inputs, labels) batches such as a DataLoader, got {type(data).__name__}"
        )


def train(
    net: nn.Module,
    train_loader: Iterable,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    device: str | torch.device | None = None,
    val_loader: Iterable | None = None,
    progress: bool = True,
    loss_fn=F.cross_entropy,
    seed: int | None = None,
) -> TrainHistory:
    """Train ``net`` in place with Adam and a cosine learning-rate schedule.

    Parameters
    ----------
    net
        Any module mapping a batch of inputs to class logits (or to what ``loss_fn`` expects).
    train_loader
        Iterable of ``(inputs, targets)`` batches.
    epochs, lr, weight_decay
        Optimisation settings; the learning rate follows a cosine decay to zero over all steps.
    device
        ``"cpu"``, ``"cuda"`` or a ``torch.device``; the net is moved there and stays there.
    val_loader
        If given, accuracy on it is recorded after every epoch.
    progress
        Show a tqdm progress bar.
    seed
        Seeds torch before training, for reproducible runs.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    _check_loader(train_loader, "train_loader")
    if seed is not None:
        torch.manual_seed(seed)
    dev = resolve_device(device)
    net.to(dev)
    steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
    if steps_per_epoch == 0:
        raise ValueError("train_loader is empty")
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        if steps_per_epoch
        else None
    )
    history = TrainHistory()
    bar = tqdm(
        total=epochs * (steps_per_epoch or 0) or None,
        disable=not progress,
        desc="train",
        leave=False,
    )
    for epoch in range(epochs):
        net.train()
        total, count = 0.0, 0
        for batch in train_loader:
            x, y = batch_xy(batch, "train_loader")
            labels, shape = y, tuple(x.shape)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with input_errors(type(net).__name__, "a train_loader batch", shape):
                out = net(x)
            if loss_fn is F.cross_entropy:  # a custom loss_fn may read auxiliary outputs
                out = output_tensor(out, net)
                with label_errors(out, labels):
                    loss = loss_fn(out, y)
            else:
                loss = loss_fn(out, y)
            if not torch.isfinite(loss):
                if loss_fn is F.cross_entropy and bool((labels == -100).all()):
                    raise ValueError(
                        f"every label of a batch (epoch {epoch + 1}) is -100, cross-entropy's "
                        "ignore_index, so its loss is 0/0; drop the unlabelled examples from the "
                        "loader"
                    )
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}, step {len(history.loss) + 1}; "
                    "lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            value = loss.item()
            history.loss.append(value)
            total, count = total + value * len(y), count + len(y)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}", refresh=False)
        history.epoch_loss.append(total / max(count, 1))
        if val_loader is not None:
            history.val_accuracy.append(evaluate(net, val_loader, device=dev))
    bar.close()
    return history


@torch.no_grad()
def evaluate(
    net: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    num_samples: int = 8,
) -> float:
    """Top-1 accuracy of ``net`` on ``loader`` (eval mode, restored afterwards).

    With ``device`` the net is moved there (as :func:`train` does); without it, the batches go to the
    net's own device. For a :class:`~bayesprune.BayesianModule` it is the accuracy of the
    posterior predictive, ``bnet.predict(x, num_samples)``: one forward pass of a Bayesian net
    would score a single random posterior draw. (The posterior-mean network is
    ``bnet.mean_module()``.)
    """
    _check_loader(loader, "loader")
    if getattr(net, "likelihood", "categorical") != "categorical":
        raise ValueError(
            f"evaluate reports classification accuracy, but this BayesianModule has a "
            f"{net.likelihood!r} likelihood; for regression use bnet.predict_regression(x) and "
            "compare its .mean with the targets"
        )
    dev = resolve_device(device) if device is not None else next(net.parameters()).device
    net.to(dev)
    was_training = net.training
    net.eval()
    correct = total = 0
    try:
        bayesian = is_bayesian(net) and callable(getattr(net, "predict", None))
        for batch in loader:
            x, y = batch_xy(batch, "loader")
            check_finite(x, "evaluation inputs")
            with input_errors(type(net).__name__, "a loader batch", tuple(x.shape)):
                out = (
                    net.predict(x.to(dev), num_samples=num_samples) if bayesian else net(x.to(dev))
                )
            if out.dim() == 2:  # else the accuracy would be silently 0
                check_class_labels(y, out.shape[1])
            pred = out.argmax(-1)
            correct += int((pred == y.to(dev)).sum())
            total += len(y)
    finally:
        net.train(was_training)
    if total == 0:
        raise ValueError("loader is empty: nothing to evaluate")
    return correct / total
