r"""Prior specifications: hyperparameters, Pyro sample sites, analytic KL terms and inclusion probabilities.

A prior object is a small frozen dataclass. :func:`bayesprune.bayesianize` hands it to every
Bayesian layer (:mod:`bayesprune.layers`); the prior then

* registers its variational parameters on the layer (:meth:`Prior.setup`),
* draws the per-minibatch node multipliers of the fast training path (:meth:`Prior.node_multiplier`,
  :meth:`Prior.weight_gate`),
* computes the analytic :math:`\mathrm{KL}(q \,\|\, p)` of the layer (:meth:`Prior.kl`),
* writes the genuine Pyro ``pyro.sample`` statements of the model and the guide
  (:meth:`Prior.model_sites`, :meth:`Prior.guide_sites`), named ``"<layer path>.<site>"``,
* and reads inclusion probabilities off the variational posterior (:meth:`Prior.inclusion_probs`).

Notation for one layer: node (output unit / filter) :math:`j`, its incoming weights and bias form the
group :math:`w_j` of size :math:`m_j` (``fan_in * kernel_size + 1`` with a bias), the layer has
:math:`N_l` nodes. Every layer's base weights have a mean-field Gaussian variational factor
:math:`q(w) = \mathcal N(\mu, \sigma^2)` stored as ``layer.weight_loc`` and ``layer.weight_log_scale``
(``layer.weight_scale`` = :math:`\sigma`), same for the bias.

Priors
------
``Gaussian(scale)``
    :math:`w \sim \mathcal N(0, s^2)` elementwise. No inclusion probabilities.
``SpikeAndSlab(level="node" | "weight", prior_inclusion, slab="gaussian" | "group_lasso" | "horseshoe")``
    :math:`z_j \sim \mathrm{Bernoulli}(\gamma)` multiplies node :math:`j`'s output (``level="node"``) or
    each weight (``level="weight"``); the slab is Gaussian, group-lasso or group-horseshoe.
``GroupHorseshoe(global_scale, regularized, slab_scale, pip_reference)``
    node-wise half-Cauchy scales times a layer-wise half-Cauchy scale, non-centred.

Example
-------
>>> import bayesprune as bp
>>> prior = bp.priors.SpikeAndSlab(level="node", prior_inclusion=0.1)
>>> prior.node_level
True
>>> bp.priors.prior_from_dict(prior.to_dict()) == prior
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from .layers import BayesianLayer

__all__ = [
    "Gaussian",
    "GroupHorseshoe",
    "Prior",
    "SpikeAndSlab",
    "prior_from_dict",
    "theory_inclusion",
]

_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------
# closed-form pieces
# --------------------------------------------------------------------------------------------
def _kl_normal(
    loc: torch.Tensor, log_scale: torch.Tensor, prior_scale: float | torch.Tensor
) -> torch.Tensor:
    r"""Elementwise :math:`\mathrm{KL}(\mathcal N(\mu, \sigma^2) \,\|\, \mathcal N(0, s^2))`."""
    prior_scale = torch.as_tensor(prior_scale, dtype=loc.dtype, device=loc.device)
    var_ratio = torch.exp(2 * log_scale) / prior_scale**2
    return 0.5 * (var_ratio + (loc / prior_scale) ** 2 - 1) - log_scale + torch.log(prior_scale)


def _row_stats(layer: BayesianLayer) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per node: :math:`\tfrac12 \sum (\sigma^2 + \mu^2)` and :math:`\sum \log \sigma` over its
    incoming weights (:meth:`~bayesprune.layers.BayesianLayer.weight_row_stats`) and its bias."""
    half_sq, ls_sum = layer.weight_row_stats()
    if layer.bias_loc is not None:
        b, bls = layer.bias_loc, layer.bias_log_scale
        half_sq = half_sq + 0.5 * (torch.exp(2 * bls) + b * b)
        ls_sum = ls_sum + bls
    return half_sq, ls_sum


def _kl_bernoulli(logit: torch.Tensor, prior_inclusion: float) -> torch.Tensor:
    r""":math:`\mathrm{KL}(\mathrm{Bern}(\sigma(\theta)) \,\|\, \mathrm{Bern}(\gamma))`, stable in the logit."""
    q = torch.sigmoid(logit)
    log_q, log_1mq = F.logsigmoid(logit), F.logsigmoid(-logit)
    return q * (log_q - math.log(prior_inclusion)) + (1 - q) * (
        log_1mq - math.log1p(-prior_inclusion)
    )


def _lognormal_neg_entropy(log_scale: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathbb E_q[\log q(x)]` for :math:`q = \mathrm{LogNormal}(\nu, \psi^2)`:
    :math:`-(\nu + \tfrac12 + \tfrac12 \log(2\pi\psi^2))`."""
    return -(loc + 0.5 + 0.5 * _LOG_2PI + log_scale)


def _kl_lognormal_gamma(
    loc: torch.Tensor, log_scale: torch.Tensor, shape: float | torch.Tensor, rate: float
) -> torch.Tensor:
    r""":math:`\mathrm{KL}(\mathrm{LogNormal}(\nu,\psi^2) \,\|\, \mathrm{Gamma}(\alpha, \beta))` (rate
    :math:`\beta`), using :math:`\mathbb E[\log x] = \nu` and :math:`\mathbb E[x] = e^{\nu + \psi^2/2}`."""
    shape = torch.as_tensor(shape, dtype=loc.dtype, device=loc.device)
    log_p = (
        shape * math.log(rate)
        - torch.lgamma(shape)
        + (shape - 1) * loc
        - rate * torch.exp(loc + 0.5 * torch.exp(2 * log_scale))
    )
    return _lognormal_neg_entropy(log_scale, loc) - log_p


def _kl_lognormal_invgamma(
    loc: torch.Tensor, log_scale: torch.Tensor, shape: float, rate: float
) -> torch.Tensor:
    r""":math:`\mathrm{KL}(\mathrm{LogNormal}(\nu,\psi^2) \,\|\, \mathrm{InvGamma}(\alpha, \beta))`, using
    :math:`\mathbb E[1/x] = e^{-\nu + \psi^2/2}`."""
    log_p = (
        shape * math.log(rate)
        - math.lgamma(shape)
        - (shape + 1) * loc
        - rate * torch.exp(-loc + 0.5 * torch.exp(2 * log_scale))
    )
    return _lognormal_neg_entropy(log_scale, loc) - log_p


def _hard_concrete(
    logit: torch.Tensor, temperature: float, batch: int | None = None
) -> torch.Tensor:
    r"""A Bernoulli(:math:`\sigma(\theta)`) sample with a binary-Concrete straight-through gradient.

    :math:`u \sim U(0,1)`, :math:`\tilde z = \sigma((\theta + \log u - \log(1-u)) / T)`; the forward value
    is :math:`\mathbb 1[\tilde z > 1/2]`, which is *exactly* Bernoulli(:math:`\sigma(\theta)`)
    distributed, and the backward pass uses :math:`\partial \tilde z / \partial \theta` (Jantre et al.'s
    estimator, temperature 0.5 by default).
    """
    shape = logit.shape if batch is None else (batch, *logit.shape)
    u = torch.rand(shape, device=logit.device, dtype=logit.dtype).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # forward value exactly 0 or 1


def _trapezoid_gate(logit: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    r"""An exact Bernoulli(:math:`q = \sigma(\theta)`) draw whose gradient follows the trapezoid rule.

    The forward value is :math:`z \sim \mathrm{Bernoulli}(q)`. The backward pass uses
    :math:`\partial z / \partial \theta = q(1-q) / (2q)` when :math:`z = 1` and
    :math:`q(1-q) / (2(1-q))` when :math:`z = 0`, so that

    .. math:: \mathbb E_z\Big[\ell'(z) \frac{\partial z}{\partial \theta}\Big]
              = q(1-q)\, \tfrac12\big(\ell'(0) + \ell'(1)\big)
              \approx q(1-q)\,\big(\ell(1) - \ell(0)\big)
              = \frac{\partial}{\partial\theta} \mathbb E_z[\ell(z)],

    exact when the loss is quadratic in the gate. The straight-through binary Concrete
    (:func:`_hard_concrete`) weights :math:`\ell'(1)`, the derivative along the node's *scale*, by
    about :math:`q`, so it understates the gradient of necessary nodes; on the planted teacher of
    ``tests/test_inference.py`` the trapezoid rule gives 50-200% of the exact gradient (asserted
    there).
    """
    return _TrapezoidGate.apply(logit, batch)


class _TrapezoidGate(torch.autograd.Function):
    r""":func:`_trapezoid_gate` in one node: with :math:`dq/d\theta = q(1-q)`, the logit's gradient
    is :math:`\tfrac12 (1-q) \sum_{z=1} g + \tfrac12 q \sum_{z=0} g` over the draws; the same
    expression in autograd costs a dozen passes over the ``[batch, nodes]`` gates per layer."""

    @staticmethod
    def forward(ctx, logit: torch.Tensor, batch: int | None) -> torch.Tensor:
        q = torch.sigmoid(logit)
        shape = logit.shape if batch is None else (batch, *logit.shape)
        hard = (torch.rand(shape, device=logit.device, dtype=logit.dtype) < q).to(logit.dtype)
        ctx.save_for_backward(q, hard)
        ctx.batched = batch is not None
        return hard

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        q, hard = ctx.saved_tensors
        g_on = g * hard
        if ctx.batched:
            g_all, g_on = g.sum(0), g_on.sum(0)
        else:
            g_all = g
        return 0.5 * ((1 - q) * g_on + q * (g_all - g_on)), None


def _gauss_hermite(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of probabilists' Gauss-Hermite quadrature, normalised to sum to 1."""
    import numpy as np

    x, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(
        w / w.sum(), dtype=torch.float32
    )


def theory_inclusion(num_nodes: int, group_size: int) -> float:
    r"""Layer-wise prior inclusion :math:`\gamma_l` derived from the posterior-contraction theory.

    Following the rate condition of Jantre, Bhattacharya and Maiti (2023), which asks for
    :math:`-\log \gamma_l \asymp \log N_l` up to lower-order terms in the fan-in, we use

    .. math:: \gamma_l = \exp\{-(\log N_l + 0.1 \log m_l)\} = N_l^{-1} \, m_l^{-0.1},

    with :math:`N_l` the number of nodes of the layer and :math:`m_l` the size of one node's weight
    group (fan-in, +1 with a bias). The constant 0.1 is ours. For a 400-unit layer with fan-in 784
    this gives about 0.0013; for LeNet-300-100's first layer about 0.0017.

    >>> from bayesprune.priors import theory_inclusion
    >>> round(theory_inclusion(400, 785), 4)
    0.0013
    """
    if num_nodes < 1 or group_size < 1:
        raise ValueError("num_nodes and group_size must be positive")
    return float(math.exp(-(math.log(num_nodes) + 0.1 * math.log(group_size))))


def _pre(path: str) -> str:
    """Site-name prefix of a layer: ``"1."`` for path ``"1"``, nothing for a root layer."""
    return f"{path}." if path else ""


def _event(d: dist.Distribution, ndim: int) -> dist.Distribution:
    return d.to_event(ndim) if ndim else d


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prior:
    """Base class of the prior specifications (see the module docstring for the maths)."""

    #: whether :meth:`inclusion_probs` gives one probability per output node
    node_level = False
    #: whether :meth:`weight_inclusion_probs` gives one probability per weight
    weight_level = False
    #: whether the base weight is the standardised ``beta`` of a non-centred scale mixture
    noncentred = False
    #: whether the weights are point estimates (type-II maximum likelihood) rather than random
    #: variables: the layer then runs its posterior-mean weights, with no weight noise or KL
    point_weights = False
    #: whether :meth:`kl` reads the per-node row statistics of the weights
    #: (:meth:`~bayesprune.layers.BayesianLayer.weight_row_stats`); the training forward pass
    #: computes them alongside the variances only when it does
    uses_row_stats = True

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description; :func:`prior_from_dict` inverts it."""
        return {"type": type(self).__name__, **asdict(self)}

    # -- variational family -----------------------------------------------------------------
    def base_scale(self, layer: BayesianLayer) -> float:
        """Prior scale of the base weights (used for the pseudo-prior of the guide)."""
        raise NotImplementedError

    def setup(self, layer: BayesianLayer, init_scale: float) -> None:
        """Register the prior's own variational parameters on ``layer`` (none by default)."""

    def init_weight_loc(self, layer: BayesianLayer, weight: torch.Tensor) -> torch.Tensor:
        """Initial posterior mean of the base weight given the pretrained weight."""
        return weight

    def init_bias_loc(self, layer: BayesianLayer, bias: torch.Tensor) -> torch.Tensor:
        return bias

    # -- fast path --------------------------------------------------------------------------
    def weight_gate(self, layer: BayesianLayer) -> torch.Tensor | None:
        """Per-weight multiplier of the fast path (weight-level spike-and-slab), or ``None``."""
        return None

    def node_multiplier(
        self, layer: BayesianLayer, batch: int | None = None
    ) -> torch.Tensor | None:
        """Per-node multiplier (gate x scale) of the fast path, or ``None``.

        Shape ``[out]`` (one draw shared by the minibatch) or, with ``batch``, ``[batch, out]``: an
        independent draw per example of the layer's whole multiplier vector, which has the same
        per-example joint law and hence the same expected log-likelihood (the argument of local
        reparameterization), with far less variance. Nodes that share a variable under q (the
        horseshoe's layer scale :math:`\tau`) must share it within each example's draw.
        """
        return None

    def mean_multiplier(self, layer: BayesianLayer) -> torch.Tensor | None:
        """Posterior-mean node multiplier used by ``mean_module`` (``None`` = 1)."""
        return None

    def kl(self, layer: BayesianLayer) -> torch.Tensor:
        """Analytic :math:`\\mathrm{KL}(q \\,\\|\\, p)` of all of the layer's latent variables."""
        raise NotImplementedError

    # -- Pyro model / guide -----------------------------------------------------------------
    def model_sites(
        self, layer: BayesianLayer, path: str
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``pyro.sample`` the layer's latents from the prior; return (weight, bias, node multiplier)."""
        raise NotImplementedError

    def guide_sites(
        self, layer: BayesianLayer, path: str
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``pyro.sample`` the same sites from the variational posterior."""
        raise NotImplementedError

    # -- inclusion --------------------------------------------------------------------------
    def inclusion_probs(self, layer: BayesianLayer) -> torch.Tensor | None:
        """Posterior inclusion probability per output node, or ``None`` for priors without one."""
        return None

    def inclusion_logits(self, layer: BayesianLayer) -> torch.Tensor | None:
        r"""Log-odds :math:`\log(\mathrm{PIP} / (1 - \mathrm{PIP}))` per output node, in float64,
        computed where they do not saturate (a PIP of exactly 1.0 still has a finite log-odds),
        or ``None``. The default takes the logit of :meth:`inclusion_probs`."""
        p = self.inclusion_probs(layer)
        return None if p is None else torch.logit(p.double())

    def weight_inclusion_probs(self, layer: BayesianLayer) -> torch.Tensor | None:
        return None


def _weight_sites_normal(
    layer: BayesianLayer, path: str, scale: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prior sample sites ``<path>.weight`` / ``<path>.bias`` ~ N(0, scale^2) (scale per node ok)."""
    w_shape = layer.weight_loc.shape
    zeros = layer.weight_loc.new_zeros(w_shape)
    s = _node_view(layer, torch.as_tensor(scale, device=zeros.device, dtype=zeros.dtype), w=True)
    w = pyro.sample(
        f"{_pre(path)}weight", _event(dist.Normal(zeros, s.expand(w_shape)), len(w_shape))
    )
    b = None
    if layer.bias_loc is not None:
        sb = torch.as_tensor(scale, device=zeros.device, dtype=zeros.dtype).expand(
            layer.bias_loc.shape
        )
        b = pyro.sample(f"{_pre(path)}bias", dist.Normal(torch.zeros_like(sb), sb).to_event(1))
    return w, b


def _node_view(layer: BayesianLayer, t: torch.Tensor, w: bool) -> torch.Tensor:
    """Reshape a per-node vector (or scalar) so that it broadcasts over the weight tensor."""
    if t.dim() == 0:
        return t
    return t.view(-1, *([1] * (layer.weight_loc.dim() - 1))) if w else t


def _guide_weight_sites(
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
        zw = gate if gate_is_per_weight else _node_view(layer, gate, w=True)
        ps = _node_view(
            layer, torch.as_tensor(pseudo_scale, dtype=loc.dtype, device=loc.device), w=True
        )
        loc = zw * loc
        scale = zw * scale + (1 - zw) * ps.expand_as(scale)
    w = pyro.sample(f"{_pre(path)}weight", dist.Normal(loc, scale).to_event(loc.dim()))
    b = None
    if layer.bias_loc is not None:
        bloc, bscale = layer.bias_loc, layer.bias_scale
        if gate is not None and not gate_is_per_weight:
            ps = torch.as_tensor(pseudo_scale, dtype=bloc.dtype, device=bloc.device).expand_as(
                bscale
            )
            bloc = gate * bloc
            bscale = gate * bscale + (1 - gate) * ps
        b = pyro.sample(f"{_pre(path)}bias", dist.Normal(bloc, bscale).to_event(1))
    return w, b


def _bias_kl(layer: BayesianLayer, scale: float | torch.Tensor) -> torch.Tensor | None:
    if layer.bias_loc is None:
        return None
    return _kl_normal(layer.bias_loc, layer.bias_log_scale, scale)


def _node_kl(layer: BayesianLayer, scale: float | torch.Tensor) -> torch.Tensor:
    r"""Per-node KL of the weight row and bias from :math:`\mathcal N(0, s^2)` (``scale`` a scalar or
    one value per node): :math:`\sum_i \log(s/\sigma_i) + (\sigma_i^2 + \mu_i^2) / (2 s^2) - \tfrac12`."""
    half_sq, ls_sum = _row_stats(layer)
    s = torch.as_tensor(scale, dtype=half_sq.dtype, device=half_sq.device)
    return half_sq / s**2 - ls_sum + layer.group_size * (torch.log(s) - 0.5)


# --------------------------------------------------------------------------------------------
# Gaussian
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gaussian(Prior):
    r"""Mean-field Gaussian prior :math:`w_i \sim \mathcal N(0, s^2)`, :math:`q(w_i) = \mathcal N(\mu_i, \sigma_i^2)`.

    .. math:: \mathrm{KL} = \sum_i \log\frac{s}{\sigma_i} + \frac{\sigma_i^2 + \mu_i^2}{2 s^2} - \frac12 .

    It has no node inclusion variable, so :meth:`bayesprune.BayesianModule.inclusion_probs` returns an
    empty dict for layers under this prior. The per-weight signal-to-noise ratio
    :math:`|\mu_i| / \sigma_i` is available as ``layer.weight_loc.abs() / layer.weight_scale``.

    Parameters
    ----------
    scale
        Prior standard deviation :math:`s` of every weight and bias.

    >>> from bayesprune.priors import Gaussian
    >>> Gaussian(scale=0.5).scale
    0.5
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        _positive("Gaussian", "scale", self.scale)

    def base_scale(self, layer: BayesianLayer) -> float:
        return self.scale

    def kl(self, layer: BayesianLayer) -> torch.Tensor:
        return _node_kl(layer, self.scale).sum()

    def model_sites(self, layer, path):
        w, b = _weight_sites_normal(layer, path, self.scale)
        return w, b, None

    def guide_sites(self, layer, path):
        w, b = _guide_weight_sites(layer, path)
        return w, b, None


# --------------------------------------------------------------------------------------------
# half-Cauchy scales (shared by GroupHorseshoe and the horseshoe slab)
# --------------------------------------------------------------------------------------------
_HS_PARAMS = ("lambda_a", "lambda_b", "tau_a", "tau_b")


def _hs_setup(
    layer: BayesianLayer, row_rms: torch.Tensor, global_scale: float, c: float | None
) -> None:
    r"""Log-normal variational parameters of :math:`\lambda_j = \sqrt{a_j b_j}`, :math:`\tau = \sqrt{a b}`.

    They are initialised so that the regularised node scale :math:`\tilde s_j` starts at the RMS of
    node :math:`j`'s pretrained weights, so that :math:`\tilde s_j \beta_j` reproduces them with
    :math:`\beta_j` of order one.
    """
    n = row_rms.shape[0]
    target = row_rms.clamp_min(1e-4)
    if c is not None:  # invert s~ = c s / sqrt(c^2 + s^2)
        target = target.clamp_max(0.95 * c)
        target = target * c / torch.sqrt(c**2 - target**2)
    log_tau = math.log(global_scale)
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


def _hs_log_scale_parts(
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


def _hs_log_scale_moments(layer: BayesianLayer) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and sd of :math:`\log s_j = \tfrac12(\log a_j + \log b_j + \log a + \log b)` under q
    (the marginal of each node; the nodes of a layer share the :math:`\tau` part)."""
    node_mean, node_sd, tau_mean, tau_sd = _hs_log_scale_parts(layer)
    return node_mean + tau_mean, torch.sqrt(node_sd**2 + tau_sd**2)


def _regularize(s: torch.Tensor, c: float | None) -> torch.Tensor:
    return s if c is None else c * s / torch.sqrt(c**2 + s**2)


def _hs_sample_scale(
    layer: BayesianLayer, c: float | None, batch: int | None = None
) -> torch.Tensor:
    r"""Reparameterised draw of the regularised node scales, ``[out]`` or ``[batch, out]``.

    :math:`\log s_j = \tfrac12(\log a_j + \log b_j) + \log \tau` is Gaussian under q: one normal
    draw per node for its own part and one per example (or per call) for the layer's
    :math:`\tau`, which all nodes share. Drawing :math:`\log s_j` in one piece per node would give
    each node the right marginal but make the nodes independent, and bias the expected
    log-likelihood (the output variance that :math:`\tau` causes would be understated).
    """
    node_mean, node_sd, tau_mean, tau_sd = _hs_log_scale_parts(layer)
    shape = node_mean.shape if batch is None else (batch, *node_mean.shape)
    tau_shape = () if batch is None else (batch, 1)
    eps = torch.randn(shape, device=node_mean.device, dtype=node_mean.dtype)
    eps_tau = torch.randn(tau_shape, device=node_mean.device, dtype=node_mean.dtype)
    log_s = node_mean + node_sd * eps + tau_mean + tau_sd * eps_tau
    return _regularize(torch.exp(log_s), c)


def _hs_mean_scale(layer: BayesianLayer, c: float | None) -> torch.Tensor:
    """Posterior mean of the regularised node scale by 32-point Gauss-Hermite quadrature."""
    mean, sd = _hs_log_scale_moments(layer)
    x, w = _gauss_hermite()
    x, w = x.to(mean.device, mean.dtype), w.to(mean.device, mean.dtype)
    s = torch.exp(mean[:, None] + sd[:, None] * x[None, :])
    return (_regularize(s, c) * w).sum(1)


def _hs_kl(layer: BayesianLayer, global_scale: float) -> torch.Tensor:
    r"""KL of the four log-normal factors against :math:`a \sim \mathrm{Gamma}(1/2, \text{rate } 1/A^2)`,
    :math:`b \sim \mathrm{InvGamma}(1/2, 1)` (:math:`A = 1` for the local, :math:`A` = ``global_scale``
    for the layer scale)."""
    # the log-normal's loc/scale are those of log a; _kl_* take the log-normal's (nu, log psi)
    kl = _kl_lognormal_gamma(layer.lambda_a_loc, layer.lambda_a_log_scale, 0.5, 1.0).sum()
    kl = kl + _kl_lognormal_invgamma(layer.lambda_b_loc, layer.lambda_b_log_scale, 0.5, 1.0).sum()
    kl = kl + _kl_lognormal_gamma(layer.tau_a_loc, layer.tau_a_log_scale, 0.5, global_scale**-2)
    kl = kl + _kl_lognormal_invgamma(layer.tau_b_loc, layer.tau_b_log_scale, 0.5, 1.0)
    return kl


def _hs_model_sites(layer: BayesianLayer, path: str, global_scale: float, c: float | None):
    n = layer.weight_loc.shape[0]
    ones = layer.weight_loc.new_ones(n)
    half = layer.weight_loc.new_tensor(0.5)
    a = pyro.sample(f"{_pre(path)}lambda_a", dist.Gamma(0.5 * ones, ones).to_event(1))
    b = pyro.sample(f"{_pre(path)}lambda_b", dist.InverseGamma(0.5 * ones, ones).to_event(1))
    ta = pyro.sample(f"{_pre(path)}tau_a", dist.Gamma(half, half.new_tensor(global_scale**-2)))
    tb = pyro.sample(f"{_pre(path)}tau_b", dist.InverseGamma(half, half.new_tensor(1.0)))
    lam = pyro.deterministic(f"{_pre(path)}lambda", torch.sqrt(a * b), event_dim=1)
    tau = pyro.deterministic(f"{_pre(path)}tau", torch.sqrt(ta * tb))
    return pyro.deterministic(f"{_pre(path)}scale", _regularize(lam * tau, c), event_dim=1)


def _hs_guide_sites(layer: BayesianLayer, path: str, c: float | None):
    def ln(name: str, event: int) -> torch.Tensor:
        loc, log_scale = getattr(layer, f"{name}_loc"), getattr(layer, f"{name}_log_scale")
        return pyro.sample(
            f"{_pre(path)}{name}", _event(dist.LogNormal(loc, torch.exp(log_scale)), event)
        )

    a, b, ta, tb = ln("lambda_a", 1), ln("lambda_b", 1), ln("tau_a", 0), ln("tau_b", 0)
    return _regularize(torch.sqrt(a * b) * torch.sqrt(ta * tb), c)


@torch.no_grad()
def _standardised_rms(layer: BayesianLayer) -> torch.Tensor:
    """Per node: RMS of the posterior mean of its standardised weights and bias (:math:`b_j`)."""
    return layer.node_rows(layer.weight_loc, layer.bias_loc).pow(2).mean(1).sqrt()


def _hs_inclusion(layer: BayesianLayer, c: float | None, threshold: torch.Tensor) -> torch.Tensor:
    r"""Closed-form :math:`P_q(\tilde s_j > t)` for a threshold :math:`t` (one per layer or node).

    The regularisation is monotone, so :math:`\tilde s_j > t \iff s_j > s^* = t c / \sqrt{c^2 - t^2}`
    (:math:`s^* = t` unregularised; no node passes when :math:`t \ge c`), and :math:`\log s_j` is
    Gaussian under the log-normal factors: the probability is
    :math:`1 - \Phi(z_j)`, :math:`z_j = (\log s^* - \mathbb E \log s_j) / \mathrm{sd} \log s_j`.
    """
    z = _hs_inclusion_z(layer, c, threshold)
    return 0.5 * torch.erfc(z / math.sqrt(2))


def _hs_inclusion_logit(
    layer: BayesianLayer, c: float | None, threshold: torch.Tensor
) -> torch.Tensor:
    r"""Log-odds of :func:`_hs_inclusion`, :math:`\log \Phi(-z_j) - \log \Phi(z_j)`, in float64.

    The probability itself is exactly 1 in float32 once :math:`z_j < -5.5` (and in float64 once
    :math:`z_j < -8.3`), which a short fit of a pretrained net easily reaches; the log-odds keep
    ranking such nodes by how far their scale is above the threshold.
    """
    z = _hs_inclusion_z(layer, c, threshold).double()
    return torch.special.log_ndtr(-z) - torch.special.log_ndtr(z)


def _hs_inclusion_z(layer: BayesianLayer, c: float | None, threshold: torch.Tensor) -> torch.Tensor:
    mean, sd = _hs_log_scale_moments(layer)
    t = threshold.to(mean.device, mean.dtype)
    if c is not None:
        s_star = t * c / torch.sqrt((c**2 - t**2).clamp_min(0))
    else:
        s_star = t
    return (torch.log(s_star) - mean) / sd


# --------------------------------------------------------------------------------------------
# spike-and-slab
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpikeAndSlab(Prior):
    r"""Spike-and-slab prior at node or weight level (SS-IG / SS-GL of Jantre et al. 2023, and SS-GHS).

    **Node level** (``level="node"``). For node :math:`j` with weight group :math:`w_j`:

    .. math::
        z_j \sim \mathrm{Bernoulli}(\gamma), \qquad
        w_j \mid z_j \sim z_j\, p_{\text{slab}}(w_j) + (1 - z_j)\, \delta_0 ,

    implemented as the node's output multiplied by :math:`z_j` (which is the same thing, and lets the
    gate act after a following BatchNorm). Variational family (Jantre et al.):
    :math:`q(z_j) = \mathrm{Bernoulli}(\sigma(\theta_j))`,
    :math:`q(w_j \mid z_j) = z_j \mathcal N(\mu_j, \mathrm{diag}\,\sigma_j^2) + (1 - z_j)\delta_0`, so

    .. math::
        \mathrm{KL} = \sum_j \mathrm{KL}(\mathrm{Bern}(q_j) \| \mathrm{Bern}(\gamma))
                      + q_j\, \mathrm{KL}(q(w_j \mid z_j{=}1) \| p_{\text{slab}}),
        \qquad q_j = \sigma(\theta_j).

    The PIP of node :math:`j` is :math:`q_j`. In training :math:`z_j` is an exact Bernoulli draw per
    example; its logit gets the trapezoid-rule gradient of :func:`_trapezoid_gate` (default) or
    Jantre et al.'s straight-through binary Concrete at ``temperature`` (``gate_gradient="concrete"``).

    Slabs:

    * ``"gaussian"``: :math:`p_{\text{slab}} = \mathcal N(0, \sigma_0^2 I)`, :math:`\sigma_0` = ``slab_scale``.
    * ``"group_lasso"``: :math:`w_j \mid \tau_j^2 \sim \mathcal N(0, \sigma_0^2 \tau_j^2 I)`,
      :math:`\tau_j^2 \sim \mathrm{Gamma}((m_j + 1)/2, \text{rate } \lambda^2/2)` (marginally a group
      lasso), :math:`q(\tau_j^2) = \mathrm{LogNormal}(\nu_j, \psi_j^2)`. With
      :math:`\mathbb E[\log \tau^2] = \nu`, :math:`\mathbb E[1/\tau^2] = e^{-\nu + \psi^2/2}`:

      .. math::
          \mathbb E_q\,\mathrm{KL}(\mathcal N(\mu_j, \sigma_j^2) \| \mathcal N(0, \sigma_0^2\tau_j^2))
          = \sum_i \tfrac12\Big[\frac{\sigma_{ij}^2 + \mu_{ij}^2}{\sigma_0^2} e^{-\nu_j + \psi_j^2/2}
            - 1 + \nu_j + \log\sigma_0^2 - \log \sigma_{ij}^2\Big],

      plus :math:`\mathrm{KL}(q(\tau_j^2) \| p(\tau_j^2))` in closed form. ``lasso_rate`` is
      :math:`\lambda`; by default :math:`\lambda^2 = m_j + 1`, so that :math:`\mathbb E[\tau_j^2] = 1`.
    * ``"horseshoe"`` (SS-GHS): the slab is the group horseshoe of :class:`GroupHorseshoe`:
      node output :math:`= z_j \tilde s_j (\beta_j^\top x)`, :math:`\beta \sim \mathcal N(0, 1)`.

    **Point weights** (``weights="point"``, the default at node level with the Gaussian slab).
    The node gates are the only random variables: :math:`q(z_j) = \mathrm{Bern}(\sigma(\theta_j))`
    and the weights are parameters of the model, fitted by type-II maximum likelihood (empirical
    Bayes), as the weights of Structured Bayesian Pruning (Neklyudov et al. 2017) and of
    :math:`L_0` gates (Louizos, Welling and Kingma 2018) are. The objective is
    :math:`\mathbb E_{q(z)}[\log p(y \mid x, w, z)] - \mathrm{KL}(q(z) \| p(z))`, a lower
    bound on :math:`\log p(y \mid x, w)`, and the PIP :math:`q_j` approximates
    :math:`p(z_j = 1 \mid \mathcal D, \hat w)`: the posterior inclusion of node :math:`j` given
    the fitted weights. The slab is not used. Why: under the mean-field Gaussian weight posterior
    (``weights="gaussian"``) an included node pays the KL of all its incoming weights, at least
    :math:`\tfrac12 \log(1 + \mu^2/\sigma^2)` nats each; a 784-input node costs hundreds to
    thousands of nats, which a few thousand examples cannot pay, and the ELBO's optimum switches
    off nearly every node (variational over-pruning, Trippe and Turner 2018). With point weights
    a node costs :math:`\log(q_j / \gamma)` nats of prior odds, whatever its fan-in, and stays
    when it is worth that much likelihood (``benchmarks/robustness.py``).

    **Weight level** (``level="weight"``): one gate per weight,
    :math:`w_i = z_i \theta_i`, Gaussian slab only; PIPs per weight from
    :meth:`bayesprune.BayesianModule.weight_inclusion_probs`. Biases keep a Gaussian prior.
    These PIPs are for inspection: :func:`bayesprune.prune`, :func:`bayesprune.conformal.certify`
    and the PIP plots remove or rank whole nodes, so they need ``level="node"``.

    Parameters
    ----------
    level
        ``"node"`` or ``"weight"``.
    weights
        ``"point"`` (type-II maximum-likelihood weights, see above) or ``"gaussian"`` (the
        mean-field Gaussian posterior with the slab's KL). Default ``None``: ``"point"`` for
        ``level="node"`` with the Gaussian slab, ``"gaussian"`` otherwise (the group-lasso and
        horseshoe slabs are priors on the weights, and weight gates multiply Bayesian weights).
    prior_inclusion
        :math:`\gamma` in (0, 1), or ``"theory"`` for the layer-wise :func:`theory_inclusion`.
    slab
        ``"gaussian"``, ``"group_lasso"`` or ``"horseshoe"``.
    slab_scale
        :math:`\sigma_0` (Gaussian / group-lasso slabs), or ``"he"`` (default) for
        :math:`\sigma_0 = \sqrt{2 / \text{fan-in}}` per layer, the scale that keeps activations of
        order one (a unit slab makes every node of a 784-input layer cost thousands of nats of
        KL and prunes everything); the horseshoe slab's width :math:`c` (``"he"``: 2).
    temperature
        Binary Concrete temperature (``gate_gradient="concrete"`` only).
    gate_gradient
        Gradient estimator of the gate logits on the training path (the forward value is an exact
        Bernoulli draw either way): ``"trapezoid"`` (default, :func:`_trapezoid_gate`) or
        ``"concrete"`` (Jantre et al.'s straight-through binary Concrete, :func:`_hard_concrete`).
    init_inclusion
        Initial :math:`q_j`; high for a pretrained net so it starts near its accuracy.
    global_scale
        Scale of the layer half-Cauchy of the horseshoe slab.
    lasso_rate
        :math:`\lambda` of the group-lasso slab (``None``: :math:`\sqrt{m_j + 1}`).

    >>> from bayesprune.priors import SpikeAndSlab
    >>> SpikeAndSlab(level="node", slab="group_lasso").slab
    'group_lasso'
    """

    level: Literal["node", "weight"] = "node"
    prior_inclusion: float | Literal["theory"] = 0.1
    slab: Literal["gaussian", "group_lasso", "horseshoe"] = "gaussian"
    slab_scale: float | Literal["he"] = "he"
    temperature: float = 0.5
    init_inclusion: float = 0.95
    gate_gradient: Literal["trapezoid", "concrete"] = "trapezoid"
    global_scale: float = 1.0
    lasso_rate: float | None = None
    weights: Literal["point", "gaussian"] | None = None

    def __post_init__(self) -> None:
        if self.level not in ("node", "weight"):
            raise ValueError(f"SpikeAndSlab level must be 'node' or 'weight', got {self.level!r}")
        if self.slab not in ("gaussian", "group_lasso", "horseshoe"):
            raise ValueError(
                f"SpikeAndSlab slab must be 'gaussian', 'group_lasso' or 'horseshoe', got {self.slab!r}"
            )
        if self.level == "weight" and self.slab != "gaussian":
            raise ValueError(
                f"slab={self.slab!r} is a group prior over a node's weights and needs level='node'; "
                "use slab='gaussian' with level='weight'"
            )
        if self.prior_inclusion != "theory":
            p = self.prior_inclusion
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
                raise ValueError(
                    f"prior_inclusion must be a probability in (0, 1) or 'theory', got {p!r}"
                )
        if self.gate_gradient not in ("trapezoid", "concrete"):
            raise ValueError(
                f"gate_gradient must be 'trapezoid' or 'concrete', got {self.gate_gradient!r}"
            )
        _probability("SpikeAndSlab", "init_inclusion", self.init_inclusion)
        if self.slab_scale != "he":
            _positive("SpikeAndSlab", "slab_scale", self.slab_scale)
        _positive("SpikeAndSlab", "temperature", self.temperature)
        _positive("SpikeAndSlab", "global_scale", self.global_scale)
        if self.lasso_rate is not None:
            _positive("SpikeAndSlab", "lasso_rate", self.lasso_rate)
        # an option of another slab would be silently ignored: refuse it
        if self.lasso_rate is not None and self.slab != "group_lasso":
            raise ValueError(f"lasso_rate acts only with slab='group_lasso', not {self.slab!r}")
        if self.global_scale != 1.0 and self.slab != "horseshoe":
            raise ValueError(f"global_scale acts only with slab='horseshoe', not {self.slab!r}")
        plain = self.level == "node" and self.slab == "gaussian"
        if self.weights is None:  # resolved here, so to_dict records what the fit used
            object.__setattr__(self, "weights", "point" if plain else "gaussian")
        if self.weights not in ("point", "gaussian"):
            raise ValueError(
                f"SpikeAndSlab weights must be 'point' or 'gaussian', got {self.weights!r}"
            )
        if self.weights == "point" and not plain:
            raise ValueError(
                "weights='point' needs level='node' and slab='gaussian' (the group-lasso and "
                "horseshoe slabs are priors on the weights); use weights='gaussian' with "
                f"level={self.level!r}, slab={self.slab!r}"
            )
        if self.weights == "point" and self.slab_scale != "he":
            raise ValueError(
                "slab_scale acts only with weights='gaussian': point weights have no slab"
            )

    @property
    def node_level(self) -> bool:  # type: ignore[override]
        return self.level == "node"

    @property
    def weight_level(self) -> bool:  # type: ignore[override]
        return self.level == "weight"

    @property
    def noncentred(self) -> bool:  # type: ignore[override]
        return self.slab == "horseshoe"

    @property
    def uses_row_stats(self) -> bool:  # type: ignore[override]
        # the weight-level KL is a per-weight gated sum, not a function of the row sums; point
        # weights have no KL
        return self.level == "node" and self.weights == "gaussian"

    @property
    def point_weights(self) -> bool:  # type: ignore[override]
        return self.weights == "point"

    # -- hyperparameters per layer ----------------------------------------------------------
    def gamma(self, layer: BayesianLayer) -> float:
        """Prior inclusion of the layer (resolves ``"theory"``)."""
        if self.prior_inclusion == "theory":
            return theory_inclusion(layer.weight_loc.shape[0], layer.group_size)
        return float(self.prior_inclusion)

    def _c(self) -> float:
        # slab width of the horseshoe slab; "he" means the GroupHorseshoe default c = 2
        return 2.0 if self.slab_scale == "he" else float(self.slab_scale)

    def base_scale(self, layer: BayesianLayer) -> float:
        return 1.0 if self.slab == "horseshoe" else self._s0(layer)

    def _s0(self, layer: BayesianLayer) -> float:
        r"""Slab scale of the layer: ``slab_scale``, or He's :math:`\sqrt{2 / \text{fan-in}}`."""
        if self.slab_scale == "he":
            return math.sqrt(2.0 / layer.weight_loc[0].numel())
        return float(self.slab_scale)

    def _lasso_rate2(self, layer: BayesianLayer) -> float:
        return (layer.group_size + 1.0) if self.lasso_rate is None else self.lasso_rate**2

    # -- parameters ---------------------------------------------------------------------------
    def setup(self, layer: BayesianLayer, init_scale: float) -> None:
        shape = layer.weight_loc.shape if self.level == "weight" else layer.weight_loc.shape[:1]
        logit = math.log(self.init_inclusion / (1 - self.init_inclusion))
        layer.gate_logit = torch.nn.Parameter(layer.weight_loc.new_full(shape, logit))
        if self.slab == "group_lasso":
            n = layer.weight_loc.shape[0]
            layer.tau2_loc = torch.nn.Parameter(layer.weight_loc.new_zeros(n))
            layer.tau2_log_scale = torch.nn.Parameter(
                layer.weight_loc.new_full((n,), math.log(0.1))
            )
        elif self.slab == "horseshoe":
            _hs_setup(layer, layer.row_rms, self.global_scale, self._c())

    def init_weight_loc(self, layer, weight):
        if self.slab != "horseshoe":
            return weight
        return weight / _node_view(layer, _hs_mean_scale(layer, self._c()), w=True)

    def init_bias_loc(self, layer, bias):
        if self.slab != "horseshoe":
            return bias
        return bias / _hs_mean_scale(layer, self._c())

    # -- fast path ----------------------------------------------------------------------------
    def _gate(self, logit: torch.Tensor, batch: int | None) -> torch.Tensor:
        if self.gate_gradient == "concrete":
            return _hard_concrete(logit, self.temperature, batch)
        return _trapezoid_gate(logit, batch)

    def weight_gate(self, layer):
        if self.level != "weight":
            return None
        return self._gate(layer.gate_logit, None)

    def node_multiplier(self, layer, batch=None):
        if self.level != "node":
            return None
        z = self._gate(layer.gate_logit, batch)
        if self.slab == "horseshoe":
            z = z * _hs_sample_scale(layer, self._c(), batch)
        return z

    def mean_multiplier(self, layer):
        # conditional on inclusion (the median-probability model): the gate is 1 for kept nodes
        if self.slab == "horseshoe":
            return _hs_mean_scale(layer, self._c())
        return None

    def kl(self, layer):
        gamma = self.gamma(layer)
        kl_z = _kl_bernoulli(layer.gate_logit, gamma)
        q = torch.sigmoid(layer.gate_logit)
        if self.level == "weight":
            kl_w = q * _kl_normal(layer.weight_loc, layer.weight_log_sd, self._s0(layer))
            kb = _bias_kl(layer, self._s0(layer))
            total = kl_z.sum() + kl_w.sum()
            return total if kb is None else total + kb.sum()
        if self.point_weights:
            return kl_z.sum()
        if self.slab == "gaussian":
            return (kl_z + q * _node_kl(layer, self._s0(layer))).sum()
        if self.slab == "group_lasso":
            nu, log_psi = layer.tau2_loc, layer.tau2_log_scale
            inv_tau2 = torch.exp(-nu + 0.5 * torch.exp(2 * log_psi))  # E[1/tau^2]
            s0 = self._s0(layer)
            c = inv_tau2 / s0**2
            half_sq, ls_sum = _row_stats(layer)
            kl_w = c * half_sq - ls_sum + layer.group_size * (0.5 * (nu - 1) + math.log(s0))
            shape = (layer.group_size + 1) / 2
            kl_tau = _kl_lognormal_gamma(nu, log_psi, shape, self._lasso_rate2(layer) / 2)
            return (kl_z + q * kl_w + kl_tau).sum()
        # horseshoe slab: beta ~ N(0, 1) pseudo-prior, scales are not gated
        return (kl_z + q * _node_kl(layer, 1.0)).sum() + _hs_kl(layer, self.global_scale)

    # -- Pyro sites ---------------------------------------------------------------------------
    def model_sites(self, layer, path):
        gamma = self.gamma(layer)
        shape = layer.gate_logit.shape
        probs = layer.weight_loc.new_full(shape, gamma)
        z = pyro.sample(f"{_pre(path)}gate", dist.Bernoulli(probs).to_event(len(shape)))
        if self.level == "weight":
            w, b = _weight_sites_normal(layer, path, self._s0(layer))
            return z * w, b, None
        if self.point_weights:  # the weights are parameters of the model, not sample sites
            return layer.weight_loc, layer.bias_loc, z
        if self.slab == "gaussian":
            w, b = _weight_sites_normal(layer, path, self._s0(layer))
            return w, b, z
        if self.slab == "group_lasso":
            n = shape[0]
            conc = layer.weight_loc.new_full((n,), (layer.group_size + 1) / 2)
            rate = layer.weight_loc.new_full((n,), self._lasso_rate2(layer) / 2)
            tau2 = pyro.sample(f"{_pre(path)}tau2", dist.Gamma(conc, rate).to_event(1))
            w, b = _weight_sites_normal(layer, path, self._s0(layer) * torch.sqrt(tau2))
            return w, b, z
        s = _hs_model_sites(layer, path, self.global_scale, self._c())
        w, b = _weight_sites_normal(layer, path, 1.0)
        return w, b, z * s

    def guide_sites(self, layer, path):
        q = torch.sigmoid(layer.gate_logit)
        z = pyro.sample(f"{_pre(path)}gate", dist.Bernoulli(q).to_event(q.dim()))
        if self.level == "weight":
            w, b = _guide_weight_sites(
                layer, path, gate=z, pseudo_scale=self._s0(layer), gate_is_per_weight=True
            )
            return z * w, b, None
        if self.point_weights:
            return layer.weight_loc, layer.bias_loc, z
        if self.slab == "gaussian":
            w, b = _guide_weight_sites(layer, path, gate=z, pseudo_scale=self._s0(layer))
            return w, b, z
        if self.slab == "group_lasso":
            tau2 = pyro.sample(
                f"{_pre(path)}tau2",
                dist.LogNormal(layer.tau2_loc, torch.exp(layer.tau2_log_scale)).to_event(1),
            )
            w, b = _guide_weight_sites(
                layer, path, gate=z, pseudo_scale=self._s0(layer) * torch.sqrt(tau2)
            )
            return w, b, z
        s = _hs_guide_sites(layer, path, self._c())
        w, b = _guide_weight_sites(layer, path, gate=z, pseudo_scale=1.0)
        return w, b, z * s

    # -- inclusion ------------------------------------------------------------------------------
    def inclusion_probs(self, layer):
        return torch.sigmoid(layer.gate_logit) if self.level == "node" else None

    def inclusion_logits(self, layer):
        return layer.gate_logit.double() if self.level == "node" else None

    def weight_inclusion_probs(self, layer):
        return torch.sigmoid(layer.gate_logit) if self.level == "weight" else None


# --------------------------------------------------------------------------------------------
# group horseshoe
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
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
        _positive("GroupHorseshoe", "global_scale", self.global_scale)
        _positive("GroupHorseshoe", "slab_scale", self.slab_scale)
        _positive("GroupHorseshoe", "pip_reference", self.pip_reference)
        if not isinstance(self.regularized, bool):
            raise TypeError(f"regularized must be True or False, got {self.regularized!r}")
        if not self.regularized and self.slab_scale != 2.0:
            raise ValueError("slab_scale acts only with regularized=True")

    def _c(self) -> float | None:
        return self.slab_scale if self.regularized else None

    def base_scale(self, layer):
        return 1.0

    def setup(self, layer, init_scale):
        _hs_setup(layer, layer.row_rms, self.global_scale, self._c())
        with torch.no_grad():
            reference = _hs_mean_scale(layer, self._c()).median()
        # a buffer: it is part of the fitted model (state_dict, save / load), not a parameter
        layer.register_buffer("hs_reference", reference)

    def init_weight_loc(self, layer, weight):
        return weight / _node_view(layer, _hs_mean_scale(layer, self._c()), w=True)

    def init_bias_loc(self, layer, bias):
        return bias / _hs_mean_scale(layer, self._c())

    def node_multiplier(self, layer, batch=None):
        return _hs_sample_scale(layer, self._c(), batch)

    def mean_multiplier(self, layer):
        return _hs_mean_scale(layer, self._c())

    def kl(self, layer):
        return _node_kl(layer, 1.0).sum() + _hs_kl(layer, self.global_scale)

    def model_sites(self, layer, path):
        s = _hs_model_sites(layer, path, self.global_scale, self._c())
        w, b = _weight_sites_normal(layer, path, 1.0)
        return w, b, s

    def guide_sites(self, layer, path):
        s = _hs_guide_sites(layer, path, self._c())
        w, b = _guide_weight_sites(layer, path)
        return w, b, s

    def inclusion_probs(self, layer):
        return _hs_inclusion(layer, self._c(), self._pip_threshold(layer))

    def inclusion_logits(self, layer):
        return _hs_inclusion_logit(layer, self._c(), self._pip_threshold(layer))

    def _pip_threshold(self, layer: BayesianLayer) -> torch.Tensor:
        threshold = self.pip_reference * layer.hs_reference
        if not layer.batchnorm_follows:
            threshold = threshold / _standardised_rms(layer).clamp_min(1e-12)
        return threshold


def _positive(cls: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{cls} {name} must be a positive finite number, got {value!r}")


def _probability(cls: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{cls} {name} must be a probability in (0, 1), got {value!r}")


_PRIORS = {c.__name__: c for c in (Gaussian, SpikeAndSlab, GroupHorseshoe)}


def prior_from_dict(spec: dict[str, Any]) -> Prior:
    """Rebuild a prior from :meth:`Prior.to_dict` (used by :func:`bayesprune.load`)."""
    spec = dict(spec)
    name = spec.pop("type", None)
    if name not in _PRIORS:
        raise ValueError(f"unknown prior type {name!r}; expected one of {sorted(_PRIORS)}")
    cls = _PRIORS[name]
    if cls is SpikeAndSlab and "weights" not in spec:
        # saved before point weights existed: those fits had the Gaussian weight posterior
        spec["weights"] = "gaussian"
    unknown = sorted(set(spec) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(
            f"{name} has no option(s) {unknown}; its options are {[f.name for f in fields(cls)]}"
        )
    return cls(**spec)
