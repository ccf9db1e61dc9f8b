r"""Pruning by gradient descent: learnable Gumbel-softmax masks (Zhang, Tao and Zhang, arXiv 2311.12526).

Each prunable unit :math:`i` (a weight, or a node) gets two logits :math:`\ell_i = (\ell_{i0}, \ell_{i1})`
(drop, keep). Every training step draws a hard straight-through Gumbel-softmax sample

.. math::
    y_i = \mathrm{softmax}\big((\ell_i + g_i) / \tau\big),\ g_{ik} \sim \mathrm{Gumbel}(0, 1), \qquad
    m_i = \mathrm{onehot}(\arg\max_k y_{ik})_1 + y_{i1} - \mathrm{sg}(y_{i1}),

(forward: the hard 0/1 value; backward: the gradient of the soft sample), uses the effective weights
:math:`W_{\text{eff}} = W \odot m`, and minimises, jointly over weights and logits,

.. math:: \mathcal L = \mathrm{CE}(f_{W \odot m}(x), y) + \lambda\,\big|\rho - \overline{m}\big|,

with target density :math:`\rho`, :math:`\lambda = 0.01` and :math:`\overline m` the mean of the mask.
The final mask is :math:`\arg\max_k \ell_{ik}` (keep where :math:`\ell_{i1} > \ell_{i0}`).

What we followed (the paper's public tutorial): two logits per weight, hard straight-through Gumbel-
softmax at temperature 3, :math:`W \odot m`, the penalty :math:`0.01\,|\rho - \overline m|` added to the
task loss, argmax final mask, weights and masks trained together (Adam). Node masks (``granularity=
"node"``, two logits per output unit of every hidden layer, applied to the layer's output, or to its
BatchNorm's output when one directly follows) and an exponential temperature schedule
(``final_temperature``) are the paper's variants.

What we changed: the mask logits have their own Adam learning rate (``mask_lr``) and start at
:math:`(0, \text{init\_logit})` so the net starts (almost) dense; biases are masked like weights
(the tutorial masks the weight matrices; ``mask_bias=False`` restores that). For certification we
need candidates at other levels than the trained one: :meth:`masks` ranks units by the logit margin
:math:`\ell_{i1} - \ell_{i0}` (the learned keep preference); at :attr:`trained_level` this is the
argmax mask, except where the argmax empties a layer: the masks keep at least one unit per layer.

Example
-------
>>> import torch
>>> from torch import nn
>>> from torch.utils.data import DataLoader, TensorDataset
>>> from bayesprune.baselines import GumbelPruning
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> x = torch.randn(256, 4)
>>> data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=64)
>>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
>>> m = GumbelPruning(target_density=0.3, epochs=5, progress=False).fit(net, data)
>>> 0.0 <= m.trained_level < 1.0
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..data import batch_xy
from ..pruning import dependency_groups
from ..train import resolve_device
from .base import (
    PruningMethod,
    global_node_masks,
    global_weight_masks,
    hidden_layers,
    prunable_parameters,
)

__all__ = ["GumbelPruning", "straight_through_mask"]


def straight_through_mask(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hard Gumbel-softmax sample of the "keep" entry of ``logits[..., 2]`` (straight-through).

    Forward: 0 or 1; backward: the gradient of the soft sample
    :math:`\\mathrm{softmax}((\\ell + g)/\\tau)_1`.

    >>> import torch
    >>> from bayesprune.baselines.gumbel import straight_through_mask
    >>> m = straight_through_mask(torch.zeros(5, 2, requires_grad=True), 3.0)
    >>> sorted(set(m.tolist())) in ([0.0], [1.0], [0.0, 1.0])
    True
    """
    return F.gumbel_softmax(logits, tau=temperature, hard=True, dim=-1)[..., 1]


def _positive(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a positive number, got {value!r}") from exc
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


class GumbelPruning(PruningMethod):
    """Learn weight (or node) masks by gradient descent with straight-through Gumbel-softmax.

    Parameters
    ----------
    target_density
        :math:`\\rho`, the fraction of units to keep (the paper's LeNet-300-100 run: 0.0015).
    granularity
        ``"weight"`` (unstructured, masked weights) or ``"node"`` (structured: hidden nodes,
        physically removed by :func:`bayesprune.prune_module`).
    temperature, final_temperature
        Gumbel-softmax temperature :math:`\\tau` (3 in the paper); with ``final_temperature`` it
        decays exponentially from ``temperature`` to ``final_temperature`` over training.
    sparsity_weight
        :math:`\\lambda` (0.01).
    epochs, lr, mask_lr
        Joint training: passes over the data, Adam learning rates of the weights and the logits.
    init_logit
        Initial keep-minus-drop logit margin (keep probability :math:`\\sigma(\\text{init\\_logit})`).
    mask_bias
        Also mask the biases (weight granularity).
    device, progress, seed
        Where to train, a tqdm bar, and a seed for the Gumbel draws.
    """

    def __init__(
        self,
        target_density: float = 0.05,
        *,
        granularity: str = "weight",
        temperature: float = 3.0,
        final_temperature: float | None = None,
        sparsity_weight: float = 0.01,
        epochs: int = 10,
        lr: float = 1e-3,
        mask_lr: float = 0.05,
        init_logit: float = 3.0,
        mask_bias: bool = True,
        device: str | torch.device | None = None,
        progress: bool = True,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if granularity not in ("weight", "node"):
            raise ValueError(f"granularity must be 'weight' or 'node', got {granularity!r}")
        density = float(target_density)
        if not 0.0 < density <= 1.0:
            raise ValueError(
                f"target_density is the fraction of units to keep, in (0, 1], got {target_density}"
            )
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs}")
        self.target_density = density
        self.granularity = granularity
        self.structured = granularity == "node"
        self.name = "gumbel (nodes)" if self.structured else "gumbel"
        self.temperature = _positive("temperature", temperature)
        self.final_temperature = (
            None if final_temperature is None else _positive("final_temperature", final_temperature)
        )
        self.sparsity_weight = float(sparsity_weight)
        if self.sparsity_weight < 0:
            raise ValueError(f"sparsity_weight must be >= 0, got {sparsity_weight}")
        self.epochs = epochs
        self.lr = _positive("lr", lr)
        self.mask_lr = _positive("mask_lr", mask_lr)
        self.init_logit = float(init_logit)
        self.mask_bias = bool(mask_bias)
        self.device = device
        self.progress = progress
        self.seed = seed
        self.logits: dict[str, torch.Tensor] = {}
        self.trained_level: float = float("nan")
        self.history: list[dict[str, float]] = []
        self._after_bn: dict[str, str] | None = None

    # -- temperature -----------------------------------------------------------------------------
    def temperature_at(self, fraction: float) -> float:
        """:math:`\\tau` after ``fraction`` of training: constant, or exponential decay."""
        if self.final_temperature is None:
            return self.temperature
        return self.temperature * (self.final_temperature / self.temperature) ** fraction

    # -- training --------------------------------------------------------------------------------
    def _units(self, net: nn.Module) -> dict[str, tuple[int, ...]]:
        if self.structured:
            layers = hidden_layers(net, self._device_input())
            if not layers:
                raise ValueError(
                    "the network has no hidden Linear / Conv layer whose nodes can be removed"
                )
            return {n: (net.get_submodule(n).weight.shape[0],) for n in layers}
        return {
            n: tuple(p.shape)
            for n, p in prunable_parameters(net).items()
            if self.mask_bias or not n.endswith("bias")
        }

    def _node_hooks(
        self, net: nn.Module, masks: dict[str, torch.Tensor]
    ) -> list[torch.utils.hooks.RemovableHandle]:
        # a node followed directly by a BatchNorm is gated after it, so the gated-off channel is
        # exactly zero, as in the network prune_module builds
        if self._after_bn is None:
            self._after_bn = {
                g.producers[0]: g.norms[0]
                for g in dependency_groups(net, self._device_input())
                if len(g.producers) == 1 and g.norms
            }
        after_bn = self._after_bn
        hooks = []
        for name in masks:
            target = net.get_submodule(after_bn.get(name, name))

            def hook(_m, _inp, out, name=name):
                shape = (1, -1) + (1,) * (out.dim() - 2)
                return out * masks[name].view(shape)

            hooks.append(target.register_forward_hook(hook))
        return hooks

    def _fit(
        self,
        net: nn.Module,
        train_loader: Iterable | None,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(f"GumbelPruning.fit got unexpected arguments {sorted(kwargs)}")
        if train_loader is None:
            raise ValueError("GumbelPruning trains masks and weights: pass a train_loader")
        dev = (
            resolve_device(self.device)
            if self.device is not None
            else next(net.parameters()).device
        )
        net.to(dev).train()
        units = self._units(net)
        logits = {}
        for n, shape in units.items():
            t = torch.zeros(*shape, 2, device=dev)
            t[..., 1] = self.init_logit
            logits[n] = nn.Parameter(t)
        gen_state = torch.random.get_rng_state()
        if self.seed is not None:
            torch.manual_seed(self.seed)
        opt = torch.optim.Adam(
            [
                {"params": list(net.parameters()), "lr": self.lr},
                # the density term's gradient per logit is ~ sparsity_weight / n_units (1e-8 for
                # LeNet-300-100), below Adam's default eps: with it the term would never act
                {"params": list(logits.values()), "lr": self.mask_lr, "eps": 1e-16},
            ]
        )
        steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
        total = self.epochs * steps_per_epoch if steps_per_epoch else None
        bar = tqdm(total=total, disable=not self.progress, desc=self.name, leave=False)
        params = dict(net.named_parameters())
        n_units = sum(t[..., 0].numel() for t in logits.values())
        step = 0
        try:
            for epoch in range(self.epochs):
                for batch in train_loader:
                    x, y = batch_xy(batch, "train_loader")
                    x, y = x.to(dev), y.to(dev)
                    frac = step / total if total else epoch / self.epochs
                    tau = self.temperature_at(frac)
                    m = {n: straight_through_mask(l, tau) for n, l in logits.items()}
                    if self.structured:
                        hooks = self._node_hooks(net, m)
                        try:
                            out = net(x)
                        finally:
                            for h in hooks:
                                h.remove()
                    else:
                        eff = {n: params[n] * m[n] for n in m}
                        out = functional_call(net, eff, (x,), strict=False)
                    density = sum(v.sum() for v in m.values()) / n_units
                    task = loss_fn(out, y)
                    loss = task + self.sparsity_weight * (self.target_density - density).abs()
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"loss became {loss.item()} at epoch {epoch + 1}; lower lr / mask_lr"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    bar.update()
                    bar.set_postfix(
                        loss=f"{task.item():.3f}", density=f"{density.item():.4f}", refresh=False
                    )
                self.history.append(
                    {"epoch": epoch + 1, "loss": task.item(), "density": density.item(), "tau": tau}
                )
        finally:
            bar.close()
            if self.seed is not None:
                torch.random.set_rng_state(gen_state)
        net.eval()
        self.logits = {n: l.detach().cpu() for n, l in logits.items()}
        self.scores = {n: (l[..., 1] - l[..., 0]) for n, l in self.logits.items()}
        kept = sum(int((s > 0).sum()) for s in self.scores.values())
        self.trained_level = 1.0 - kept / n_units
        if self.trained_level >= 1.0:  # every unit dropped: keep the best one so prune() works
            self.trained_level = 1.0 - 1.0 / n_units

    def argmax_masks(self) -> dict[str, torch.Tensor]:
        """The paper's final mask: keep where the keep logit is larger."""
        self._require_fit()
        return {n: s > 0 for n, s in self.scores.items()}

    def _masks(self, level: float) -> dict[str, torch.Tensor]:
        if self.structured:
            return global_node_masks(self.scores, level)
        full = global_weight_masks(self.scores, level)
        return full

    def prune_trained(self) -> torch.nn.Module:
        """The network with the paper's argmax mask (``prune(trained_level)``)."""
        return self.prune(self.trained_level)
