r"""The base weights' Gaussian factor, shared by every prior (private).

Every Bayesian layer holds a mean-field Gaussian :math:`q(w) = \mathcal N(\mu, \sigma^2)` over its
base weights (``layer.weight_loc``, ``layer.weight_log_sd``) and bias (``layer.bias_loc``,
``layer.bias_log_scale``). A prior says what :math:`p(w)` is; the pieces here turn that into the
per-node KL of the fast path and into the ``<path>.weight`` / ``<path>.bias`` sample sites of the
Pyro model and guide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch

from ._math import kl_normal

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import BayesianLayer

__all__ = [
    "as_event",
    "bias_kl",
    "guide_weight_sites",
    "node_kl",
    "node_view",
    "row_stats",
    "site_prefix",
    "weight_sites",
]


def site_prefix(path: str) -> str:
    """Site-name prefix of a layer: ``"1."`` for path ``"1"``, nothing for a root layer."""
    return f"{path}." if path else ""


def as_event(d: dist.Distribution, ndim: int) -> dist.Distribution:
    """``d.to_event(ndim)``, or ``d`` itself for a scalar site."""
    return d.to_event(ndim) if ndim else d


def node_view(layer: BayesianLayer, t: torch.Tensor, w: bool) -> torch.Tensor:
    """Reshape a per-node vector (or scalar) so that it broadcasts over the weight tensor."""
    if t.dim() == 0:
        return t
    return t.view(-1, *([1] * (layer.weight_loc.dim() - 1))) if w else t


def row_stats(layer: BayesianLayer) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per node: :math:`\tfrac12 \sum (\sigma^2 + \mu^2)` and :math:`\sum \log \sigma` over its
    incoming weights (:meth:`~bayesprune.layers.BayesianLayer.weight_row_stats`) and its bias."""
    half_sq, ls_sum = layer.weight_row_stats()
    if layer.bias_loc is not None:
        b, bls = layer.bias_loc, layer.bias_log_scale
        half_sq = half_sq + 0.5 * (torch.exp(2 * bls) + b * b)
        ls_sum = ls_sum + bls
    return half_sq, ls_sum


def node_kl(layer: BayesianLayer, scale: float | torch.Tensor) -> torch.Tensor:
    r"""Per-node KL of the weight row and bias from :math:`\mathcal N(0, s^2)` (``scale`` a scalar or
    one value per node): :math:`\sum_i \log(s/\sigma_i) + (\sigma_i^2 + \mu_i^2) / (2 s^2) - \tfrac12`."""
    half_sq, ls_sum = row_stats(layer)
    s = torch.as_tensor(scale, dtype=half_sq.dtype, device=half_sq.device)
    return half_sq / s**2 - ls_sum + layer.group_size * (torch.log(s) - 0.5)


def bias_kl(layer: BayesianLayer, scale: float | torch.Tensor) -> torch.Tensor | None:
    """Elementwise KL of the bias from :math:`\\mathcal N(0, s^2)` (``None`` without a bias)."""
    if layer.bias_loc is None:
        return None
    return kl_normal(layer.bias_loc, layer.bias_log_scale, scale)


def weight_sites(
    layer: BayesianLayer, path: str, scale: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prior sample sites ``<path>.weight`` / ``<path>.bias`` ~ N(0, scale^2) (scale per node ok)."""
    w_shape = layer.weight_loc.shape
    zeros = layer.weight_loc.new_zeros(w_shape)
    s = node_view(layer, torch.as_tensor(scale, device=zeros.device, dtype=zeros.dtype), w=True)
    w = pyro.sample(
        f"{site_prefix(path)}weight", as_event(dist.Normal(zeros, s.expand(w_shape)), len(w_shape))
    )
    b = None
    if layer.bias_loc is not None:
        sb = torch.as_tensor(scale, device=zeros.device, dtype=zeros.dtype).expand(
            layer.bias_loc.shape
        )
        b = pyro.sample(
            f"{site_prefix(path)}bias", dist.Normal(torch.zeros_like(sb), sb).to_event(1)
        )
    return w, b


def guide_weight_sites(
    layer: BayesianLayer,
    path: str,
    gate: torch.Tensor | None = None,
    pseudo_scale: float | torch.Tensor = 1.0,
    gate_is_per_weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Guide sites for the base weights.

    Without a gate: :math:`q(w) = \mathcal N(\mu, \sigma^2)`. With a gate :math:`z` the guide uses the
    *pseudo-prior* construction: :math:`q(w \mid z=1) = \mathcal N(\mu, \sigma^2)` and
    :math:`q(w \mid z=0) = p(w)` (the slab), so the effective weight :math:`z w` has the variational
    law :math:`z\,\mathcal N(\mu, \sigma^2) + (1-z)\,\delta_0` of Jantre et al. and
    :math:`\mathrm{KL}(q(z, w) \| p(z, w)) = \mathrm{KL}(q(z) \| p(z)) + q(z{=}1)\,
    \mathrm{KL}(\mathcal N(\mu,\sigma^2) \| p(w))`, the analytic KL of the fast path.
    """
    loc, scale = layer.weight_loc, layer.weight_scale
    if gate is not None:
        zw = gate if gate_is_per_weight else node_view(layer, gate, w=True)
        ps = node_view(
            layer, torch.as_tensor(pseudo_scale, dtype=loc.dtype, device=loc.device), w=True
        )
        loc = zw * loc
        scale = zw * scale + (1 - zw) * ps.expand_as(scale)
    w = pyro.sample(f"{site_prefix(path)}weight", dist.Normal(loc, scale).to_event(loc.dim()))
    b = None
    if layer.bias_loc is not None:
        bloc, bscale = layer.bias_loc, layer.bias_scale
        if gate is not None and not gate_is_per_weight:
            ps = torch.as_tensor(pseudo_scale, dtype=bloc.dtype, device=bloc.device).expand_as(
                bscale
            )
            bloc = gate * bloc
            bscale = gate * bscale + (1 - gate) * ps
        b = pyro.sample(f"{site_prefix(path)}bias", dist.Normal(bloc, bscale).to_event(1))
    return w, b
