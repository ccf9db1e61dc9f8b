r"""The slabs of :class:`~bayesprune.priors.SpikeAndSlab`: what an included node's weights follow.

A slab is a small strategy object per ``slab`` option of the prior: :class:`GaussianSlab`
(:math:`w_j \sim \mathcal N(0, \sigma_0^2 I)`), :class:`GroupLassoSlab` (a Gamma-mixed Gaussian
per node, Jantre et al. 2023) and :class:`HorseshoeSlab` (the group horseshoe's node scales over
standardised weights). Each holds its own latent variables (:meth:`Slab.setup`), the node scale
it puts on the fast path, its part of the KL given inclusion and its Pyro sites; the gates and
their KL are the prior's.

Example
-------
>>> from bayesprune.priors._slabs import GroupLassoSlab
>>> GroupLassoSlab(slab_scale="he", lasso_rate=None).parameter_names
('tau2_loc', 'tau2_log_scale')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch

from ._math import kl_lognormal_gamma
from ._weights import guide_weight_sites, node_kl, node_view, row_stats, site_prefix, weight_sites
from .horseshoe import HalfCauchyScale

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import BayesianLayer

__all__ = ["GaussianSlab", "GroupLassoSlab", "HorseshoeSlab", "Slab", "slab_sd"]


def slab_sd(slab_scale: float | str, layer: BayesianLayer) -> float:
    r"""Slab scale :math:`\sigma_0` of a layer: ``slab_scale``, or He's :math:`\sqrt{2 / \text{fan-in}}`."""
    if slab_scale == "he":
        return math.sqrt(2.0 / layer.weight_loc[0].numel())
    return float(slab_scale)


class Slab:
    r"""A node-level slab :math:`p_{\text{slab}}(w_j)` and its variational factor.

    The gates are :class:`SpikeAndSlab`'s; a slab adds its own latents (registered by
    :meth:`setup`, named in ``parameter_names``), the node scale they put on the fast path, and its
    part of the KL: :math:`q_j\, \mathrm{KL}(q(w_j \mid z_j{=}1) \| p_{\text{slab}})` plus the KL
    of its own latents.
    """

    #: the layer parameters :meth:`setup` registers, in registration order
    parameter_names: tuple[str, ...] = ()
    #: whether the base weights are the standardised ``beta`` of a scale mixture
    noncentred = False

    def setup(self, layer: BayesianLayer) -> None:
        """Register the slab's own variational parameters (none by default)."""

    def base_scale(self, layer: BayesianLayer) -> float:
        raise NotImplementedError

    def init_weight_loc(self, layer: BayesianLayer, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def init_bias_loc(self, layer: BayesianLayer, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def sample_scale(self, layer: BayesianLayer, batch: int | None) -> torch.Tensor | None:
        """A draw of the node scales that multiply the gates on the fast path (``None`` = 1)."""
        return None

    def mean_scale(self, layer: BayesianLayer) -> torch.Tensor | None:
        """Posterior-mean node scale (``None`` = 1)."""
        return None

    def kl(self, layer: BayesianLayer, kl_z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The layer's KL given the gates' Bernoulli KL ``kl_z`` and inclusion ``q`` per node."""
        raise NotImplementedError

    def model_sites(self, layer: BayesianLayer, path: str):
        """Prior sites of the slab's latents and of the weights: (weight, bias, scale or None)."""
        raise NotImplementedError

    def guide_sites(self, layer: BayesianLayer, path: str, z: torch.Tensor):
        """Guide sites given the gate draw ``z``: (weight, bias, scale or None)."""
        raise NotImplementedError


@dataclass(frozen=True)
class GaussianSlab(Slab):
    r""":math:`w_j \sim \mathcal N(0, \sigma_0^2 I)`."""

    slab_scale: float | str

    def base_scale(self, layer):
        return slab_sd(self.slab_scale, layer)

    def kl(self, layer, kl_z, q):
        return (kl_z + q * node_kl(layer, slab_sd(self.slab_scale, layer))).sum()

    def model_sites(self, layer, path):
        w, b = weight_sites(layer, path, slab_sd(self.slab_scale, layer))
        return w, b, None

    def guide_sites(self, layer, path, z):
        s0 = slab_sd(self.slab_scale, layer)
        w, b = guide_weight_sites(layer, path, gate=z, pseudo_scale=s0)
        return w, b, None


@dataclass(frozen=True)
class GroupLassoSlab(Slab):
    r""":math:`w_j \mid \tau_j^2 \sim \mathcal N(0, \sigma_0^2 \tau_j^2 I)`,
    :math:`\tau_j^2 \sim \mathrm{Gamma}((m_j + 1)/2, \text{rate } \lambda^2/2)`,
    :math:`q(\tau_j^2) = \mathrm{LogNormal}(\nu_j, \psi_j^2)`."""

    slab_scale: float | str
    lasso_rate: float | None

    parameter_names = ("tau2_loc", "tau2_log_scale")

    def _rate2(self, layer: BayesianLayer) -> float:
        return (layer.group_size + 1.0) if self.lasso_rate is None else self.lasso_rate**2

    def setup(self, layer):
        n = layer.weight_loc.shape[0]
        layer.tau2_loc = torch.nn.Parameter(layer.weight_loc.new_zeros(n))
        layer.tau2_log_scale = torch.nn.Parameter(layer.weight_loc.new_full((n,), math.log(0.1)))

    def base_scale(self, layer):
        return slab_sd(self.slab_scale, layer)

    def kl(self, layer, kl_z, q):
        nu, log_psi = layer.tau2_loc, layer.tau2_log_scale
        inv_tau2 = torch.exp(-nu + 0.5 * torch.exp(2 * log_psi))  # E[1/tau^2]
        s0 = slab_sd(self.slab_scale, layer)
        c = inv_tau2 / s0**2
        half_sq, ls_sum = row_stats(layer)
        kl_w = c * half_sq - ls_sum + layer.group_size * (0.5 * (nu - 1) + math.log(s0))
        shape = (layer.group_size + 1) / 2
        kl_tau = kl_lognormal_gamma(nu, log_psi, shape, self._rate2(layer) / 2)
        return (kl_z + q * kl_w + kl_tau).sum()

    def model_sites(self, layer, path):
        n = layer.weight_loc.shape[0]
        conc = layer.weight_loc.new_full((n,), (layer.group_size + 1) / 2)
        rate = layer.weight_loc.new_full((n,), self._rate2(layer) / 2)
        tau2 = pyro.sample(f"{site_prefix(path)}tau2", dist.Gamma(conc, rate).to_event(1))
        s0 = slab_sd(self.slab_scale, layer)
        w, b = weight_sites(layer, path, s0 * torch.sqrt(tau2))
        return w, b, None

    def guide_sites(self, layer, path, z):
        tau2 = pyro.sample(
            f"{site_prefix(path)}tau2",
            dist.LogNormal(layer.tau2_loc, torch.exp(layer.tau2_log_scale)).to_event(1),
        )
        s0 = slab_sd(self.slab_scale, layer)
        w, b = guide_weight_sites(layer, path, gate=z, pseudo_scale=s0 * torch.sqrt(tau2))
        return w, b, None


@dataclass(frozen=True)
class HorseshoeSlab(Slab):
    r"""Node output :math:`z_j \tilde s_j (\beta_j^\top x)`, :math:`\beta \sim \mathcal N(0, 1)`:
    the standardised weights under the group horseshoe's node scales (not gated)."""

    scales: HalfCauchyScale

    parameter_names = HalfCauchyScale.parameter_names
    noncentred = True

    def setup(self, layer):
        self.scales.setup(layer)

    def base_scale(self, layer):
        return 1.0

    def init_weight_loc(self, layer, weight):
        return weight / node_view(layer, self.scales.mean(layer), w=True)

    def init_bias_loc(self, layer, bias):
        return bias / self.scales.mean(layer)

    def sample_scale(self, layer, batch):
        return self.scales.sample(layer, batch)

    def mean_scale(self, layer):
        return self.scales.mean(layer)

    def kl(self, layer, kl_z, q):
        # beta ~ N(0, 1) pseudo-prior, scales are not gated
        return (kl_z + q * node_kl(layer, 1.0)).sum() + self.scales.kl(layer)

    def model_sites(self, layer, path):
        s = self.scales.model_sites(layer, path)
        w, b = weight_sites(layer, path, 1.0)
        return w, b, s

    def guide_sites(self, layer, path, z):
        s = self.scales.guide_sites(layer, path)
        w, b = guide_weight_sites(layer, path, gate=z, pseudo_scale=1.0)
        return w, b, s
