r"""Self-compression in Bayesian neural networks (Carannante, Dera, Rasool and Bouaynaya, arXiv 2111.05950).

A Bayesian network's posterior marks its own redundant parameters: nodes (kernels, filters) whose
posterior is concentrated at zero, or dominated by its uncertainty, carry no signal. With the
mean-field Gaussian posterior :math:`q(w_i) = \mathcal N(\mu_i, \sigma_i^2)` of
:class:`bayesprune.priors.Gaussian`, node :math:`j` (its incoming weights and bias, :math:`d_j` of
them) is scored by

.. math::
    \text{norm}_j = \frac{\|\mu_j\|_2}{\sqrt{d_j}}, \qquad
    \text{snr}_j = \frac{\|\mu_j\|_2}{\|\sigma_j\|_2}
                 = \frac{\mathrm{RMS}(|\mu_{ji}|)}{\mathrm{RMS}(\sigma_{ji})},

(the posterior kernel norm and the node's signal-to-noise ratio), each divided by its layer's mean
so that one global ranking compares nodes of layers of different fan-in and scale. Iterative self-compression: fit; remove the fraction ``round_fraction`` of the remaining
hidden nodes with the lowest score (globally ranked); keep them at exactly zero and refit for
``round_epochs``; ``rounds - 1`` such rounds after the first fit (the default ``rounds=1`` is one
fit and a one-shot ranking, not the paper's iteration). ``prune(level)`` then removes the fraction ``level`` of
all hidden nodes, the ones removed in earlier rounds first, then by final score, from the
posterior-mean network, physically (:func:`bayesprune.prune_module`).

What we followed: the two criteria (posterior norm of kernels, signal-to-noise ratio), the iterative
removal of kernels the posterior marks as redundant, MNIST / Fashion-MNIST-style networks.

Where we depart from the paper. The paper propagates the first two moments of the activations
through the layers (extended variational inference, with a first-order Taylor approximation through
the nonlinearities) and prunes kernels whose posterior norm falls near zero by a threshold. We use
our mean-field Gaussian BNN trained by SVI with the local reparameterization trick
(:func:`bayesprune.fit`): moments are not propagated, the likelihood is Monte-Carlo estimated. We
remove a fixed fraction per round instead of thresholding the norm (a threshold has no common scale
across networks), and removed nodes are frozen by zeroing their posterior means (their gradients are
masked) rather than deleted between rounds. A node followed by a BatchNorm keeps its BatchNorm's
bias during refitting; it is zeroed only in the final network (``mean_module(masks)``).

Example
-------
>>> import torch
>>> from torch import nn
>>> from torch.utils.data import DataLoader, TensorDataset
>>> from bayesprune.baselines import SelfCompression
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> x = torch.randn(256, 4)
>>> data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=64)
>>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
>>> m = SelfCompression(epochs=2, progress=False).fit(net, data)
>>> m.prune(0.5)[0].out_features
8
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .base import PruningMethod, global_node_masks, hidden_layers

__all__ = ["SelfCompression", "node_snr", "posterior_node_norm"]

_CRITERIA = ("snr", "norm")


def _rows(t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    r = t.detach().flatten(1)
    return r if b is None else torch.cat([r, b.detach()[:, None]], 1)


def posterior_node_norm(layer: nn.Module) -> torch.Tensor:
    """:math:`\\|\\mu_j\\|_2 / \\sqrt{d_j}` of each output node of a Bayesian layer."""
    mu = _rows(layer.weight_loc, layer.bias_loc)
    return (mu.norm(dim=1) / mu.shape[1] ** 0.5).cpu()


def node_snr(layer: nn.Module) -> torch.Tensor:
    """Signal-to-noise ratio :math:`\\|\\mu_j\\|_2 / \\|\\sigma_j\\|_2` of each output node."""
    mu = _rows(layer.weight_loc, layer.bias_loc)
    sd = _rows(layer.weight_scale, layer.bias_scale)
    return (mu.norm(dim=1) / sd.norm(dim=1).clamp_min(1e-12)).cpu()


class SelfCompression(PruningMethod):
    """Self-compressing Bayesian network: node pruning by posterior norm or SNR, iteratively.

    Parameters
    ----------
    criterion
        ``"snr"`` (:func:`node_snr`) or ``"norm"`` (:func:`posterior_node_norm`).
    prior_scale
        Standard deviation of the Gaussian prior :class:`bayesprune.priors.Gaussian`.
    epochs, lr
        SVI of the first fit (:func:`bayesprune.fit`).
    rounds, round_fraction, round_epochs
        Iterative compression: ``rounds - 1`` removal-and-refit rounds after the first fit, each
        removing ``round_fraction`` of the remaining hidden nodes and refitting ``round_epochs``.
    device, progress, seed
        Passed to :func:`bayesprune.fit`.
    """

    structured = True

    def __init__(
        self,
        criterion: str = "snr",
        *,
        prior_scale: float = 0.3,
        epochs: int = 10,
        lr: float = 3e-3,
        rounds: int = 1,
        round_fraction: float = 0.3,
        round_epochs: int = 3,
        device: str | torch.device | None = None,
        progress: bool = True,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if criterion not in _CRITERIA:
            raise ValueError(f"criterion must be one of {_CRITERIA}, got {criterion!r}")
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds}")
        if not 0.0 < round_fraction < 1.0:
            raise ValueError(f"round_fraction must be in (0, 1), got {round_fraction}")
        if not prior_scale > 0:
            raise ValueError(f"prior_scale must be positive, got {prior_scale}")
        self.criterion = criterion
        self.name = f"self-compression ({criterion})"
        self.prior_scale = float(prior_scale)
        self.epochs, self.lr = epochs, lr
        self.rounds, self.round_fraction, self.round_epochs = (
            rounds,
            float(round_fraction),
            round_epochs,
        )
        self.device, self.progress, self.seed = device, progress, seed
        self.bnet = None
        self.removed: dict[str, torch.Tensor] = {}

    def node_scores(self) -> dict[str, torch.Tensor]:
        """The criterion for every hidden node of the fitted BNN (including removed ones)."""
        if self.bnet is None:
            raise RuntimeError("SelfCompression is not fitted: call .fit(net, train_loader) first")
        fn = node_snr if self.criterion == "snr" else posterior_node_norm
        layers = self.bnet.bayesian_layers
        # removed nodes (exactly zero) are left out of the layer means
        return {
            n: fn(layers[n]) / fn(layers[n])[~r].mean().clamp_min(1e-12)
            for n, r in self.removed.items()
        }

    @torch.no_grad()
    def _freeze(self, keep: dict[str, torch.Tensor]) -> list:
        """Zero the removed nodes' posterior and mask their gradients (a fresh Adam never moves them)."""
        hooks = []
        for name, k in keep.items():
            layer = self.bnet.bayesian_layers[name]
            drop = ~k.to(layer.weight_loc.device)
            for p, value in (
                (layer.weight_loc, 0.0),
                (layer.bias_loc, 0.0),
                (layer.weight_log_scale, -20.0),
                (layer.bias_log_scale, -20.0),
            ):
                if p is None:
                    continue
                p[drop] = value
                mask = (~drop).view(-1, *([1] * (p.dim() - 1))).to(p.dtype)
                hooks.append(p.register_hook(lambda g, mask=mask: g * mask))
        return hooks

    def _fit(self, net: nn.Module, train_loader: Iterable | None, **kwargs: Any) -> None:
        from ..bayesianize import bayesianize
        from ..inference import fit
        from ..priors import Gaussian

        if kwargs:
            raise TypeError(f"SelfCompression.fit got unexpected arguments {sorted(kwargs)}")
        if train_loader is None:
            raise ValueError("SelfCompression fits a Bayesian network: pass a train_loader")
        layers = hidden_layers(net, self._device_input())
        if not layers:
            raise ValueError(
                "the network has no hidden Linear / Conv layer whose nodes can be removed"
            )
        self.bnet = bayesianize(net, prior=Gaussian(scale=self.prior_scale))
        fit_kw = {
            "lr": self.lr,
            "device": self.device,
            "progress": self.progress,
            "seed": self.seed,
        }
        fit(self.bnet, train_loader, epochs=self.epochs, **fit_kw)
        self.removed = {
            n: torch.zeros(self.bnet.bayesian_layers[n].out_features_, dtype=torch.bool)
            for n in layers
        }
        removed_round = {n: torch.zeros(len(v)) for n, v in self.removed.items()}
        for r in range(1, self.rounds):
            scores = self.node_scores()
            alive = {n: s[~self.removed[n]] for n, s in scores.items()}
            keep_alive = global_node_masks(alive, self.round_fraction)
            for n in layers:
                idx = (~self.removed[n]).nonzero().flatten()
                newly = idx[~keep_alive[n]]
                self.removed[n][newly] = True
                removed_round[n][newly] = r
            hooks = self._freeze({n: ~v for n, v in self.removed.items()})
            try:
                fit(self.bnet, train_loader, epochs=self.round_epochs, **fit_kw)
            finally:
                for h in hooks:
                    h.remove()
        scores = self.node_scores()
        # nodes removed in earlier rounds rank below every survivor, the earliest lowest
        self.scores = {
            n: torch.where(self.removed[n], removed_round[n] - self.rounds - 1.0, scores[n])
            for n in layers
        }
        self.net = self.bnet.mean_module({n: ~v for n, v in self.removed.items()}).eval()

    def _masks(self, level: float) -> dict[str, torch.Tensor]:
        # the nodes removed in the rounds are dead (zero posterior, also in self.net): every
        # level removes them, so levels below removed_fraction all give the same network
        if level < self.removed_fraction - 1e-9:
            warnings.warn(
                f"the rounds already removed {self.removed_fraction:.0%} of the hidden nodes, so "
                f"level {level:g} gives the network of level {self.removed_fraction:.3g}",
                stacklevel=3,
            )
        keep = global_node_masks(self.scores, level)
        return {n: k & ~self.removed[n].to(k.device) for n, k in keep.items()}

    @property
    def removed_fraction(self) -> float:
        """Fraction of hidden nodes removed by the iterative rounds."""
        total = sum(v.numel() for v in self.removed.values())
        return (
            sum(int(v.sum()) for v in self.removed.values()) / max(total, 1) if total else math.nan
        )
