r"""The group horseshoe: half-Cauchy node scales (:class:`HalfCauchyScale`) and :class:`GroupHorseshoe`.

The node scales :math:`s_j = \tau \lambda_j` of a layer, :math:`\lambda_j \sim \mathcal C^+(0, 1)`,
:math:`\tau \sim \mathcal C^+(0, A)`, optionally regularised to
:math:`\tilde s_j = c\, s_j / \sqrt{c^2 + s_j^2}` (Piironen and Vehtari 2017), multiply the
outputs of the nodes. :class:`HalfCauchyScale` holds their variational factors on a layer and
everything computed from them (moments, draws, posterior mean, KL, Pyro sites, inclusion
probabilities); :class:`GroupHorseshoe` is the prior with Gaussian standardised weights under
those scales, and :class:`~bayesprune.priors.SpikeAndSlab` uses the same scales for its
``slab="horseshoe"``.

Example
-------
>>> import torch
>>> from torch import nn
>>> from bayesprune.layers import BayesianLinear
>>> from bayesprune.priors import GroupHorseshoe
>>> from bayesprune.priors.horseshoe import HalfCauchyScale
>>> layer = BayesianLinear.from_module(nn.Linear(4, 3), GroupHorseshoe(global_scale=0.5))
>>> scale = HalfCauchyScale(global_scale=0.5, slab_width=2.0)
>>> scale.mean(layer).shape, scale.sample(layer, batch=8).shape
(torch.Size([3]), torch.Size([8, 3]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import pyro
import pyro.distributions as dist
import torch

from ._checks import check_positive
from ._math import gauss_hermite, kl_lognormal_gamma, kl_lognormal_invgamma
from ._weights import as_event, guide_weight_sites, node_kl, node_view, site_prefix, weight_sites
from .base import Prior, register_prior

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import BayesianLayer

__all__ = ["GroupHorseshoe", "HalfCauchyScale"]


@dataclass(frozen=True, kw_only=True)
class HalfCauchyScale:
    r"""The half-Cauchy node scales of one layer and their log-normal variational factors.

    Each half-Cauchy scale is written :math:`\sqrt{a b}` with
    :math:`a \sim \mathrm{Gamma}(1/2, \text{rate } 1/A^2)` and
    :math:`b \sim \mathrm{InvGamma}(1/2, 1)` (:math:`\sqrt{ab}` is then exactly
    :math:`\mathcal C^+(0, A)`): :math:`\lambda_j = \sqrt{a_j b_j}` with :math:`A = 1`,
    :math:`\tau = \sqrt{a b}` with :math:`A` = ``global_scale``. Every one of :math:`a_j, b_j, a, b`
    has a log-normal factor :math:`q = \mathrm{LogNormal}(\nu, \psi^2)`, stored on the layer as
    ``<name>_loc`` (:math:`\nu`) and ``<name>_log_scale`` (:math:`\log \psi`) for the names
    ``lambda_a``, ``lambda_b`` (one per node), ``tau_a``, ``tau_b`` (scalars), which are also the
    sample sites (``"<path>.lambda_a"``, ...). So every KL term is analytic (``E[log x]``,
    ``E[x]``, ``E[1/x]`` of a log-normal are closed form) and

    .. math:: \log s_j = \tfrac12(\log a_j + \log b_j) + \tfrac12(\log a + \log b)

    is Gaussian under :math:`q`, the nodes of a layer sharing the :math:`\tau` part.

    Parameters
    ----------
    global_scale
        :math:`A`, the scale of the layer's half-Cauchy :math:`\tau`.
    slab_width
        :math:`c` of the regularised scale :math:`\tilde s_j = c\, s_j / \sqrt{c^2 + s_j^2}`, or
        ``None`` for the plain :math:`s_j`.
    """

    global_scale: float = 1.0
    slab_width: float | None = 2.0

    #: the layer parameters :meth:`setup` registers, in registration order
    parameter_names: ClassVar[tuple[str, ...]] = (
        "lambda_a_loc",
        "lambda_b_loc",
        "lambda_a_log_scale",
        "lambda_b_log_scale",
        "tau_a_loc",
        "tau_b_loc",
        "tau_a_log_scale",
        "tau_b_log_scale",
    )

    def __post_init__(self) -> None:
        check_positive("HalfCauchyScale", "global_scale", self.global_scale)
        if self.slab_width is not None:
            check_positive("HalfCauchyScale", "slab_width", self.slab_width)

    # -- parameters ---------------------------------------------------------------------------
    def setup(self, layer: BayesianLayer) -> None:
        r"""Register the log-normal factors on ``layer``, initialised so that the regularised node
        scale :math:`\tilde s_j` starts at the RMS of node :math:`j`'s pretrained weights
        (``layer.row_rms``), so that :math:`\tilde s_j \beta_j` reproduces them with
        :math:`\beta_j` of order one."""
        row_rms, c = layer.row_rms, self.slab_width
        n = row_rms.shape[0]
        target = row_rms.clamp_min(1e-4)
        if c is not None:  # invert s~ = c s / sqrt(c^2 + s^2)
            target = target.clamp_max(0.95 * c)
            target = target * c / torch.sqrt(c**2 - target**2)
        log_tau = math.log(self.global_scale)
        log_lam = torch.log(target) - log_tau
        dev, dt = row_rms.device, row_rms.dtype
        init_log_sd = math.log(0.1)
        # split each log scale equally between a and b: log s = (log a + log b) / 2
        layer.lambda_a_loc = torch.nn.Parameter(log_lam.clone().to(dev, dt))
        layer.lambda_b_loc = torch.nn.Parameter(log_lam.clone().to(dev, dt))
        layer.lambda_a_log_scale = torch.nn.Parameter(
            torch.full((n,), init_log_sd, device=dev, dtype=dt)
        )
        layer.lambda_b_log_scale = torch.nn.Parameter(
            torch.full((n,), init_log_sd, device=dev, dtype=dt)
        )
        layer.tau_a_loc = torch.nn.Parameter(torch.tensor(log_tau, device=dev, dtype=dt))
        layer.tau_b_loc = torch.nn.Parameter(torch.tensor(log_tau, device=dev, dtype=dt))
        layer.tau_a_log_scale = torch.nn.Parameter(torch.tensor(init_log_sd, device=dev, dtype=dt))
        layer.tau_b_log_scale = torch.nn.Parameter(torch.tensor(init_log_sd, device=dev, dtype=dt))

    # -- moments, draws, mean -----------------------------------------------------------------
    def regularize(self, s: torch.Tensor) -> torch.Tensor:
        r""":math:`\tilde s = c s / \sqrt{c^2 + s^2}` (``s`` itself without a slab width)."""
        c = self.slab_width
        return s if c is None else c * s / torch.sqrt(c**2 + s**2)

    @staticmethod
    def log_scale_parts(
        layer: BayesianLayer,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""Means and sds under q of the node part :math:`\tfrac12(\log a_j + \log b_j)` (``[out]``)
        and of the layer part :math:`\tfrac12(\log a + \log b) = \log \tau` (scalars) of
        :math:`\log s_j`."""
        node_mean = 0.5 * (layer.lambda_a_loc + layer.lambda_b_loc)
        node_sd = 0.5 * torch.sqrt(
            torch.exp(2 * layer.lambda_a_log_scale) + torch.exp(2 * layer.lambda_b_log_scale)
        )
        tau_mean = 0.5 * (layer.tau_a_loc + layer.tau_b_loc)
        tau_sd = 0.5 * torch.sqrt(
            torch.exp(2 * layer.tau_a_log_scale) + torch.exp(2 * layer.tau_b_log_scale)
        )
        return node_mean, node_sd, tau_mean, tau_sd

    def log_scale_moments(self, layer: BayesianLayer) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Mean and sd of :math:`\log s_j` under q (the marginal of each node; the nodes of a
        layer share the :math:`\tau` part)."""
        node_mean, node_sd, tau_mean, tau_sd = self.log_scale_parts(layer)
        return node_mean + tau_mean, torch.sqrt(node_sd**2 + tau_sd**2)

    def sample(self, layer: BayesianLayer, batch: int | None = None) -> torch.Tensor:
        r"""Reparameterised draw of the regularised node scales, ``[out]`` or ``[batch, out]``.

        :math:`\log s_j = \tfrac12(\log a_j + \log b_j) + \log \tau` is Gaussian under q: one normal
        draw per node for its own part and one per example (or per call) for the layer's
        :math:`\tau`, which all nodes share. Drawing :math:`\log s_j` in one piece per node would give
        each node the right marginal but make the nodes independent, and bias the expected
        log-likelihood (the output variance that :math:`\tau` causes would be understated).
        """
        node_mean, node_sd, tau_mean, tau_sd = self.log_scale_parts(layer)
        shape = node_mean.shape if batch is None else (batch, *node_mean.shape)
        tau_shape = () if batch is None else (batch, 1)
        eps = torch.randn(shape, device=node_mean.device, dtype=node_mean.dtype)
        eps_tau = torch.randn(tau_shape, device=node_mean.device, dtype=node_mean.dtype)
        log_s = node_mean + node_sd * eps + tau_mean + tau_sd * eps_tau
        return self.regularize(torch.exp(log_s))

    def mean(self, layer: BayesianLayer) -> torch.Tensor:
        """Posterior mean of the regularised node scale by 32-point Gauss-Hermite quadrature."""
        mean, sd = self.log_scale_moments(layer)
        x, w = gauss_hermite()
        x, w = x.to(mean.device, mean.dtype), w.to(mean.device, mean.dtype)
        s = torch.exp(mean[:, None] + sd[:, None] * x[None, :])
        return (self.regularize(s) * w).sum(1)

    # -- KL and Pyro sites --------------------------------------------------------------------
    def kl(self, layer: BayesianLayer) -> torch.Tensor:
        r"""KL of the four log-normal factors against :math:`a \sim \mathrm{Gamma}(1/2, \text{rate } 1/A^2)`,
        :math:`b \sim \mathrm{InvGamma}(1/2, 1)` (:math:`A = 1` for the local, :math:`A` =
        ``global_scale`` for the layer scale)."""
        # the log-normal's loc/scale are those of log a; kl_* take the log-normal's (nu, log psi)
        kl = kl_lognormal_gamma(layer.lambda_a_loc, layer.lambda_a_log_scale, 0.5, 1.0).sum()
        kl = (
            kl + kl_lognormal_invgamma(layer.lambda_b_loc, layer.lambda_b_log_scale, 0.5, 1.0).sum()
        )
        kl = kl + kl_lognormal_gamma(
            layer.tau_a_loc, layer.tau_a_log_scale, 0.5, self.global_scale**-2
        )
        kl = kl + kl_lognormal_invgamma(layer.tau_b_loc, layer.tau_b_log_scale, 0.5, 1.0)
        return kl

    def model_sites(self, layer: BayesianLayer, path: str) -> torch.Tensor:
        """Sample ``<path>.lambda_a`` ... ``<path>.tau_b`` from the prior (and record ``lambda``,
        ``tau`` and ``scale`` as deterministic sites); return the regularised node scales."""
        pre = site_prefix(path)
        n = layer.weight_loc.shape[0]
        ones = layer.weight_loc.new_ones(n)
        half = layer.weight_loc.new_tensor(0.5)
        a = pyro.sample(f"{pre}lambda_a", dist.Gamma(0.5 * ones, ones).to_event(1))
        b = pyro.sample(f"{pre}lambda_b", dist.InverseGamma(0.5 * ones, ones).to_event(1))
        ta = pyro.sample(f"{pre}tau_a", dist.Gamma(half, half.new_tensor(self.global_scale**-2)))
        tb = pyro.sample(f"{pre}tau_b", dist.InverseGamma(half, half.new_tensor(1.0)))
        lam = pyro.deterministic(f"{pre}lambda", torch.sqrt(a * b), event_dim=1)
        tau = pyro.deterministic(f"{pre}tau", torch.sqrt(ta * tb))
        return pyro.deterministic(f"{pre}scale", self.regularize(lam * tau), event_dim=1)

    def guide_sites(self, layer: BayesianLayer, path: str) -> torch.Tensor:
        """Sample the same four sites from their log-normal factors; return the node scales."""

        def ln(name: str, event: int) -> torch.Tensor:
            loc, log_scale = getattr(layer, f"{name}_loc"), getattr(layer, f"{name}_log_scale")
            return pyro.sample(
                f"{site_prefix(path)}{name}",
                as_event(dist.LogNormal(loc, torch.exp(log_scale)), event),
            )

        a, b, ta, tb = ln("lambda_a", 1), ln("lambda_b", 1), ln("tau_a", 0), ln("tau_b", 0)
        return self.regularize(torch.sqrt(a * b) * torch.sqrt(ta * tb))

    # -- inclusion ----------------------------------------------------------------------------
    def inclusion_probs(self, layer: BayesianLayer, threshold: torch.Tensor) -> torch.Tensor:
        r"""Closed-form :math:`P_q(\tilde s_j > t)` for a threshold :math:`t` (one per layer or node).

        The regularisation is monotone, so :math:`\tilde s_j > t \iff s_j > s^* = t c / \sqrt{c^2 - t^2}`
        (:math:`s^* = t` unregularised; no node passes when :math:`t \ge c`), and :math:`\log s_j` is
        Gaussian under the log-normal factors: the probability is
        :math:`1 - \Phi(z_j)`, :math:`z_j = (\log s^* - \mathbb E \log s_j) / \mathrm{sd} \log s_j`.
        """
        z = self.inclusion_z(layer, threshold)
        return 0.5 * torch.erfc(z / math.sqrt(2))

    def inclusion_logits(self, layer: BayesianLayer, threshold: torch.Tensor) -> torch.Tensor:
        r"""Log-odds of :meth:`inclusion_probs`, :math:`\log \Phi(-z_j) - \log \Phi(z_j)`, in float64.

        The probability itself is exactly 1 in float32 once :math:`z_j < -5.5` (and in float64 once
        :math:`z_j < -8.3`), which a short fit of a pretrained net easily reaches; the log-odds keep
        ranking such nodes by how far their scale is above the threshold.
        """
        z = self.inclusion_z(layer, threshold).double()
        return torch.special.log_ndtr(-z) - torch.special.log_ndtr(z)

    def inclusion_z(self, layer: BayesianLayer, threshold: torch.Tensor) -> torch.Tensor:
        r""":math:`z_j = (\log s^* - \mathbb E \log s_j) / \mathrm{sd} \log s_j` (see
        :meth:`inclusion_probs`)."""
        mean, sd = self.log_scale_moments(layer)
        t = threshold.to(mean.device, mean.dtype)
        c = self.slab_width
        if c is not None:
            s_star = t * c / torch.sqrt((c**2 - t**2).clamp_min(0))
        else:
            s_star = t
        return (torch.log(s_star) - mean) / sd


@torch.no_grad()
def _standardised_rms(layer: BayesianLayer) -> torch.Tensor:
    """Per node: RMS of the posterior mean of its standardised weights and bias (:math:`b_j`)."""
    return layer.node_rows(layer.weight_loc, layer.bias_loc).pow(2).mean(1).sqrt()


@register_prior
@dataclass(frozen=True, kw_only=True)
class GroupHorseshoe(Prior):
    r"""Node-wise (group) horseshoe, non-centred, optionally regularised (Louizos et al. 2017 BC-GHS;
    Ghosh, Yao and Doshi-Velez 2019; Piironen and Vehtari 2017).

    .. math::
        \text{output}_j = \tilde s_j\,(\beta_j^\top x + \beta^{b}_j), \quad
        \beta \sim \mathcal N(0, 1), \quad s_j = \tau \lambda_j, \quad
        \tilde s_j = \frac{c\, s_j}{\sqrt{c^2 + s_j^2}} \ (\text{regularised}) \text{ or } s_j,

    :math:`\lambda_j \sim \mathcal C^+(0, 1)`, :math:`\tau \sim \mathcal C^+(0, A)` with
    :math:`A` = ``global_scale``. Each half-Cauchy scale is written :math:`\sqrt{a b}` with
    :math:`a \sim \mathrm{Gamma}(1/2, \text{rate } 1/A^2)` and :math:`b \sim \mathrm{InvGamma}(1/2, 1)`
    (:math:`\sqrt{ab}` is then exactly :math:`\mathcal C^+(0, A)`), sample sites
    ``<path>.lambda_a``, ``<path>.lambda_b``, ``<path>.tau_a``, ``<path>.tau_b`` (the model also records
    ``<path>.lambda``, ``<path>.tau`` and the node scale ``<path>.scale`` as deterministic sites) and
    ``<path>.weight`` / ``<path>.bias`` for the standardised :math:`\beta`. Every scale variable has a
    log-normal variational factor, so every KL term is analytic (``E[log x]``, ``E[x]``, ``E[1/x]`` of
    a log-normal are closed form) and :math:`\log s_j` is Gaussian under :math:`q`.

    **Shrinkage factor and PIP.** In the normal-means model the horseshoe's shrinkage factor is
    :math:`\kappa = 1 / (1 + \lambda^2\tau^2 / \sigma^2)`: the prior scale against the scale
    :math:`\sigma` at which a coefficient can no longer be told from noise. For a node, two things
    change that picture. First, the size of node :math:`j`'s weights in the posterior-mean network
    is :math:`\tilde s_j b_j`, with :math:`b_j` the RMS of the posterior mean of its standardised
    weights :math:`\beta_j` (bias included). The likelihood only sees that product, and the
    :math:`\mathcal N(0, 1)` prior on :math:`\beta` often makes it cheaper to shrink :math:`\beta_j`
    than :math:`\tilde s_j` (in fits of LeNet-300-100 on Fashion-MNIST the first layer's node
    scales grew while its standardised weights shrank). When a BatchNorm follows the layer, the
    multiplier acts after it and the BatchNorm removes the weights' scale, so there :math:`b_j = 1`.
    Second, what a "small" node is depends on the layer (its inputs' scale and correlation), not on
    the fan-in alone: a 5x5 filter on raw pixels works at a larger scale than :math:`1/\sqrt{25}`
    suggests. So the reference is the layer's own:
    :math:`r_l` is the median over the layer's nodes of :math:`\mathbb E_q \tilde s_j` at
    initialisation. For a pretrained net that is the median RMS of the nodes' trained weights,
    since :math:`b_j = 1` then. It is stored as the buffer ``hs_reference``. We define

    .. math:: \kappa_j = \frac{1}{1 + \tilde s_j^2 b_j^2 / (\rho\, r_l)^2}, \qquad
              \mathrm{PIP}_j = P_q(\kappa_j < 1/2) = P_q(\tilde s_j > \rho\, r_l / b_j),

    with :math:`\rho` = ``pip_reference`` (default 1/2) and :math:`b_j` at its current value. A node
    is included while its weights stay above half the typical size of the layer's nodes before the
    fit. It is pruned once the posterior has shrunk them below that, through its scale or its
    standardised weights. The probability is in closed form because :math:`\tilde s_j` is monotone
    in :math:`s_j` and :math:`\log s_j` is Gaussian under :math:`q`. Without regularization it
    does not change when a layer's weights are rescaled (as when the next layer compensates,
    leaving the function as it was); with it (the default), the slab width :math:`c` is an absolute
    scale, so a rescaled layer's PIPs move. A fan-in reference does change: on LeNet-5-Caffe, trained 5x5 first-layer filters sit
    near :math:`1/\sqrt{25}`, so :math:`\tilde s_j > 1/\sqrt{m_j}` excluded most of them before
    any fitting, and the fitted posterior then emptied that layer (``benchmarks/compare.py``).

    **It rarely prunes with its defaults.** Under the mean-field posterior the KL of the
    standardised weights dominates the objective, and the node scales, moved by Adam, seldom take
    a node below the PIP's threshold: on the cells of ``benchmarks/README.md#robustness`` it keeps
    every node, or nearly every node, of the pretrained nets, and from random weights ResNet-20
    stays far below the dense net. A smaller ``global_scale`` prunes some nodes but, in most of
    the cells tried, leaves most PIPs between 0.1 and 0.9, and point standardised weights prune
    nothing (``docs/notes/gate-decisions.md``, points 6 and 17). :func:`bayesprune.fit` warns when
    a fit keeps every node. For pruning, the default prior
    (:func:`bayesprune.priors.default_prior`) is the one measured to separate nodes; this prior is
    for the posterior of the node scales themselves.

    Parameters
    ----------
    global_scale
        :math:`A`, the scale of the layer's half-Cauchy. Smaller values prune more: the
        group-horseshoe rows of ``benchmarks/README.md#compression`` use 0.01.
    regularized
        Use the regularised (slab-width ``slab_scale`` = :math:`c`) scale.
    slab_scale
        :math:`c`.
    pip_reference
        :math:`\rho`: the node scale, as a fraction of the layer's initial median node scale,
        at which :math:`\kappa_j = 1/2`.

    >>> from bayesprune.priors import GroupHorseshoe
    >>> GroupHorseshoe(global_scale=0.1).node_level
    True
    """

    global_scale: float = 1.0
    regularized: bool = True
    slab_scale: float = 2.0
    pip_reference: float = 0.5

    node_level = True
    noncentred = True

    def __post_init__(self) -> None:
        check_positive("GroupHorseshoe", "global_scale", self.global_scale)
        check_positive("GroupHorseshoe", "slab_scale", self.slab_scale)
        check_positive("GroupHorseshoe", "pip_reference", self.pip_reference)
        if not isinstance(self.regularized, bool):
            raise TypeError(f"regularized must be True or False, got {self.regularized!r}")
        if not self.regularized and self.slab_scale != 2.0:
            raise ValueError("slab_scale acts only with regularized=True")

    @cached_property
    def scales(self) -> HalfCauchyScale:
        """The node scales' variational factors (:class:`HalfCauchyScale`) of this prior."""
        return HalfCauchyScale(
            global_scale=self.global_scale, slab_width=self.slab_scale if self.regularized else None
        )

    def base_scale(self, layer):
        return 1.0

    def setup(self, layer, init_scale):
        self.scales.setup(layer)
        with torch.no_grad():
            reference = self.scales.mean(layer).median()
        # a buffer: it is part of the fitted model (state_dict, save / load), not a parameter
        layer.register_buffer("hs_reference", reference)

    def structure_parameter_names(self, layer):
        return HalfCauchyScale.parameter_names

    def init_weight_loc(self, layer, weight):
        return weight / node_view(layer, self.scales.mean(layer), w=True)

    def init_bias_loc(self, layer, bias):
        return bias / self.scales.mean(layer)

    def node_multiplier(self, layer, batch=None):
        return self.scales.sample(layer, batch)

    def mean_multiplier(self, layer):
        return self.scales.mean(layer)

    def kl(self, layer):
        return node_kl(layer, 1.0).sum() + self.scales.kl(layer)

    def model_sites(self, layer, path):
        s = self.scales.model_sites(layer, path)
        w, b = weight_sites(layer, path, 1.0)
        return w, b, s

    def guide_sites(self, layer, path):
        s = self.scales.guide_sites(layer, path)
        w, b = guide_weight_sites(layer, path)
        return w, b, s

    def inclusion_probs(self, layer):
        return self.scales.inclusion_probs(layer, self._pip_threshold(layer))

    def inclusion_logits(self, layer):
        return self.scales.inclusion_logits(layer, self._pip_threshold(layer))

    def _pip_threshold(self, layer: BayesianLayer) -> torch.Tensor:
        threshold = self.pip_reference * layer.hs_reference
        if not layer.batchnorm_follows:
            threshold = threshold / _standardised_rms(layer).clamp_min(1e-12)
        return threshold
