r"""Closed-form pieces shared by the priors (private): KL divergences, gate estimators, quadrature.

Everything here works on tensors alone (no layer, no Pyro):

* :func:`kl_normal`, :func:`kl_bernoulli`, :func:`kl_lognormal_gamma`,
  :func:`kl_lognormal_invgamma`: the analytic KL terms of the variational factors
  (:func:`kl_bernoulli_logs`: the Bernoulli KL given :math:`\log\gamma` and
  :math:`\log(1-\gamma)`, numbers or one per gate, which :func:`bernoulli_logs` computes);
* :func:`hard_concrete` and :func:`trapezoid_gate`: exact Bernoulli draws of the node / weight
  gates with two gradient estimators for their logits (:func:`decided_gate`: their draw where
  every logit is infinite, without random numbers);
* :func:`gauss_hermite`: the quadrature rule of the horseshoe's posterior-mean node scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "bernoulli_logs",
    "decided_gate",
    "gauss_hermite",
    "hard_concrete",
    "kl_bernoulli",
    "kl_bernoulli_logs",
    "kl_lognormal_gamma",
    "kl_lognormal_invgamma",
    "kl_normal",
    "log_sigmoid",
    "trapezoid_gate",
]

_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------
# KL divergences
# --------------------------------------------------------------------------------------------
def kl_normal(
    loc: torch.Tensor, log_scale: torch.Tensor, prior_scale: float | torch.Tensor
) -> torch.Tensor:
    r"""Elementwise :math:`\mathrm{KL}(\mathcal N(\mu, \sigma^2) \,\|\, \mathcal N(0, s^2))`."""
    prior_scale = torch.as_tensor(prior_scale, dtype=loc.dtype, device=loc.device)
    var_ratio = torch.exp(2 * log_scale) / prior_scale**2
    return 0.5 * (var_ratio + (loc / prior_scale) ** 2 - 1) - log_scale + torch.log(prior_scale)


def log_sigmoid(a: float) -> float:
    r""":math:`\log \sigma(a)` of a Python float, exact for any finite :math:`a` (no underflow of
    :math:`\sigma(a)` itself: ``log_sigmoid(-2000.0) == -2000.0``)."""
    return -math.log1p(math.exp(-a)) if a >= 0 else a - math.log1p(math.exp(a))


def kl_bernoulli(
    logit: torch.Tensor,
    prior_inclusion: float | None = None,
    *,
    prior_log_odds: float | None = None,
) -> torch.Tensor:
    r""":math:`\mathrm{KL}(\mathrm{Bern}(\sigma(\theta)) \,\|\, \mathrm{Bern}(\gamma))`, stable in the logit.

    The prior is given by :math:`\gamma` (``prior_inclusion``) or by its log-odds
    :math:`a = \log(\gamma / (1 - \gamma))` (``prior_log_odds``), which reaches priors below the
    smallest double (:math:`\log \gamma = \log \sigma(a)` is computed without forming
    :math:`\gamma`)."""
    if (prior_inclusion is None) == (prior_log_odds is None):
        raise ValueError("kl_bernoulli needs exactly one of prior_inclusion and prior_log_odds")
    return kl_bernoulli_logs(logit, *bernoulli_logs(prior_inclusion, prior_log_odds))


def bernoulli_logs(
    prior_inclusion: float | None, prior_log_odds: float | None
) -> tuple[float, float]:
    r""":math:`(\log \gamma, \log(1 - \gamma))` of a prior given by :math:`\gamma` or by its
    log-odds (the second wins where both are given), as :func:`kl_bernoulli` uses them."""
    if prior_log_odds is None:
        return math.log(prior_inclusion), math.log1p(-prior_inclusion)
    return log_sigmoid(prior_log_odds), log_sigmoid(-prior_log_odds)


def kl_bernoulli_logs(
    logit: torch.Tensor, log_g: float | torch.Tensor, log_1mg: float | torch.Tensor
) -> torch.Tensor:
    r""":func:`kl_bernoulli` with the prior given by :math:`\log \gamma` and
    :math:`\log(1 - \gamma)`: numbers, or tensors that broadcast with ``logit`` (one prior per
    gate; the same value gives the same bits as the number)."""
    q = torch.sigmoid(logit)
    log_q, log_1mq = F.logsigmoid(logit), F.logsigmoid(-logit)
    return q * (log_q - log_g) + (1 - q) * (log_1mq - log_1mg)


def _lognormal_neg_entropy(log_scale: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathbb E_q[\log q(x)]` for :math:`q = \mathrm{LogNormal}(\nu, \psi^2)`:
    :math:`-(\nu + \tfrac12 + \tfrac12 \log(2\pi\psi^2))`."""
    return -(loc + 0.5 + 0.5 * _LOG_2PI + log_scale)


def kl_lognormal_gamma(
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


def kl_lognormal_invgamma(
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


# --------------------------------------------------------------------------------------------
# gate estimators
# --------------------------------------------------------------------------------------------
def hard_concrete(
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


def trapezoid_gate(logit: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    r"""An exact Bernoulli(:math:`q = \sigma(\theta)`) draw whose gradient follows the trapezoid rule.

    The forward value is :math:`z \sim \mathrm{Bernoulli}(q)`. The backward pass uses
    :math:`\partial z / \partial \theta = q(1-q) / (2q)` when :math:`z = 1` and
    :math:`q(1-q) / (2(1-q))` when :math:`z = 0`, so that

    .. math:: \mathbb E_z\Big[\ell'(z) \frac{\partial z}{\partial \theta}\Big]
              = q(1-q)\, \tfrac12\big(\ell'(0) + \ell'(1)\big)
              \approx q(1-q)\,\big(\ell(1) - \ell(0)\big)
              = \frac{\partial}{\partial\theta} \mathbb E_z[\ell(z)],

    exact when the loss is quadratic in the gate. The straight-through binary Concrete
    (:func:`hard_concrete`) weights :math:`\ell'(1)`, the derivative along the node's *scale*, by
    about :math:`q`, so it understates the gradient of necessary nodes; on the planted teacher of
    ``tests/test_inference.py`` the trapezoid rule gives 50-200% of the exact gradient (asserted
    there).
    """
    return _TrapezoidGate.apply(logit, batch)


def decided_gate(logit: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    r"""The draw of :func:`trapezoid_gate` and :func:`hard_concrete` where every logit is
    :math:`\pm\infty`, without random numbers: :math:`q = \sigma(\theta)` is then exactly 1 or 0,
    so that every draw is :math:`\mathbb 1[\theta > 0]`, the same values (``[batch, *logit.shape]``
    with a ``batch``, contiguous) as theirs, with no gradient. It draws nothing from the random
    generator, unlike them: a caller whose later draws must stay as they were reseeds first.

    >>> import torch
    >>> from bayesprune.priors._math import decided_gate, trapezoid_gate
    >>> logit = torch.tensor([float("inf"), -float("inf"), float("inf")])
    >>> torch.equal(decided_gate(logit, 4), trapezoid_gate(logit, 4))
    True
    """
    z = (logit > 0).to(logit.dtype)
    return z if batch is None else z.expand(batch, *z.shape).contiguous()


class _TrapezoidGate(torch.autograd.Function):
    r""":func:`trapezoid_gate` in one node: with :math:`dq/d\theta = q(1-q)`, the logit's gradient
    is :math:`\tfrac12 (1-q) \sum_{z=1} g + \tfrac12 q \sum_{z=0} g` over the draws; the same
    expression in autograd costs a dozen passes over the ``[batch, nodes]`` gates per layer."""

    @staticmethod
    def forward(ctx, logit: torch.Tensor, batch: int | None) -> torch.Tensor:
        q = torch.sigmoid(logit)
        shape = logit.shape if batch is None else (batch, *logit.shape)
        # u < q, written into u as 0. or 1. (one operator fewer than a comparison and a cast)
        hard = torch.rand(shape, device=logit.device, dtype=logit.dtype).lt_(q)
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


# --------------------------------------------------------------------------------------------
# quadrature
# --------------------------------------------------------------------------------------------
def gauss_hermite(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of probabilists' Gauss-Hermite quadrature, normalised to sum to 1."""
    import numpy as np

    x, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(
        w / w.sum(), dtype=torch.float32
    )
