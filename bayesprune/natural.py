r"""Natural-gradient steps for the node gates :math:`q(z_j) = \mathrm{Bernoulli}(\sigma(\theta_j))`.

:func:`bayesprune.fit` moves the gate logits of point-weight layers (the default node
spike-and-slab) with :class:`BernoulliNaturalGradient`, not with Adam. Write the tempered objective (``kl_weight`` :math:`\beta`; 1 is the ELBO) as a function of
:math:`q_j = \sigma(\theta_j)` with everything else held:

.. math::
    \mathcal L(q_j) = q_j\,G_j - \beta\big[\mathrm{KL}(\mathrm{Bern}(q_j) \| \mathrm{Bern}(\gamma))
                      + q_j K_j\big] + \text{const},

with :math:`G_j = \mathbb E[\log p(y \mid z_j{=}1)] - \mathbb E[\log p(y \mid z_j{=}0)]` the
likelihood the node is worth (full-data scale) and :math:`K_j` the KL of its weights given
inclusion (0 for point weights). The Bernoulli is an exponential family with natural parameter
:math:`\theta_j`, so the natural gradient of :math:`\mathcal L` in :math:`\theta_j` is its
ordinary gradient in the mean parameter :math:`q_j`, and a step of size :math:`\rho` is

.. math::
    \theta_j \leftarrow (1 - \rho)\,\theta_j + \rho\,\big(\operatorname{logit}\gamma
                         + G_j / \beta - K_j\big),

a damped coordinate-ascent (CAVI) update: :math:`\rho = 1` jumps to the optimum of
:math:`q(z_j)` given the rest (Hoffman et al. 2013, stochastic variational inference). It is
computed from the gradient the loss already has, :math:`\partial \mathcal L / \partial q_j =
(\partial \mathcal L / \partial \theta_j) / (q_j (1 - q_j))`, so any gate-gradient estimator
works; :math:`G_j` comes from the minibatch (``N / B`` times its sum), and the small step
averages it over about :math:`1/\rho` steps.

Why not Adam: Adam divides each gradient by its running scale, so every gate with a consistent
sign moves about ``lr`` per step, whatever :math:`G_j`. All gates of a layer then move in
lockstep, and where they end depends on the number of steps, not on the data (a short fit
prunes nothing; a long one switches everything off). The natural step moves each gate toward its
own optimum at a rate set by :math:`\rho`, so gates that the data need stay on and the others
go off, within a few hundred steps.

With Bayesian weights (:math:`K_j > 0`) the same step reaches the mean-field optimum, and there
that optimum is usually the empty network: each node alone is worth less likelihood than the KL of
its weights (hundreds of nats for a 784-input node), although the nodes together are worth far
more. Those gates stay with Adam (:meth:`bayesprune.BayesianModule.gate_parameters`).

**What** :func:`bayesprune.fit` **runs (measured, not yet resolved).** ``fit`` clears Adam's
gradients before each step but not the gates', so :meth:`step` sees the *sum* of the gate
gradients of all steps so far, :math:`\sum_{s \le t} g_s`, not the current one. The update is then
:math:`\theta_{t+1} = \theta_t - (\rho/\beta) \sum_{s \le t} g_s / (q(1-q))`: an integral
(momentum-one) controller around the CAVI target above, bounded by ``max_logit``. It drives each
gate to a decision (PIPs near :math:`3 \cdot 10^{-4}` or :math:`1 - 3 \cdot 10^{-4}`) where the
damped step with fresh gradients settles at its fixed point, which on the digits nets of
``tests/test_inference.py`` leaves most PIPs between 0.1 and 0.9 (the random-dropout-ensemble
failure). So the default PIPs are the end point of this procedure, not the mean-field optimum
written above.

``fit`` does not take a gate's change of side on this step's word alone: every sign change it
proposes is tested exactly first (:mod:`bayesprune.gate_tests`, ``fit(gate_tests=...)``). The
step's estimate of :math:`G_j` is first-order, blind to a node's worth at :math:`q_j` near 1, and
it moves many gates at once; on a trained ResNet-20 that alone switched off channels the data
need (``docs/notes/gate-decisions.md``).

Logits are kept in ``[-max_logit, max_logit]`` (PIPs in about :math:`[3 \cdot 10^{-4},
1 - 3 \cdot 10^{-4}]` by default): at a saturated :math:`q_j` the division by
:math:`q_j(1-q_j)` would otherwise amplify the noise of a rare draw.

Example
-------
>>> import torch
>>> from bayesprune.natural import BernoulliNaturalGradient
>>> logit = torch.nn.Parameter(torch.zeros(3))
>>> step = BernoulliNaturalGradient([logit], lr=1.0)
>>> q = torch.sigmoid(logit)
>>> (q * torch.tensor([-4.0, 0.0, 4.0])).sum().backward()  # loss = -G . q, G = (4, 0, -4)
>>> step.step()
>>> logit.detach()
tensor([ 4.,  0., -4.])
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["BernoulliNaturalGradient"]


class BernoulliNaturalGradient(torch.optim.Optimizer):
    r"""Damped natural-gradient step on Bernoulli gate logits (see the module docstring).

    ``theta <- theta - lr * (dloss / dtheta) / (q (1 - q)) / beta``, then clipped to
    ``[-max_logit, max_logit]``. ``lr`` is :math:`\rho`; ``beta`` (attribute, default 1) is the
    KL weight of the loss at this step, so that the step lands at :math:`\rho` of the way to the
    optimum of the tempered objective.

    Parameters
    ----------
    params
        Gate-logit parameters (or parameter groups).
    lr
        :math:`\rho` in (0, 1].
    max_logit
        Bound on :math:`|\theta_j|`.
    """

    def __init__(self, params: Iterable, lr: float = 0.01, *, max_logit: float = 8.0) -> None:
        if not 0 < lr <= 1:
            raise ValueError(f"the natural-gradient step lr must be in (0, 1], got {lr}")
        if not max_logit > 0:
            raise ValueError(f"max_logit must be positive, got {max_logit}")
        super().__init__(params, {"lr": lr, "max_logit": max_logit})
        self.beta = 1.0

    @torch.no_grad()
    def step(self, closure=None):
        """One damped step of every logit that has a gradient."""
        if closure is not None:
            raise ValueError("BernoulliNaturalGradient takes no closure")
        if not self.beta > 0:
            return None  # a KL warm-up at weight 0: the optimum is not defined, hold the gates
        for group in self.param_groups:
            lr, bound = group["lr"], group["max_logit"]
            if lr == 0:
                continue
            same_kind: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    same_kind.setdefault((p.device, p.dtype), []).append(p)
            for params in same_kind.values():
                _step(params, [p.grad for p in params], lr / self.beta, bound)
        return None


def _step(params: list[torch.Tensor], grads: list[torch.Tensor], rate: float, bound: float) -> None:
    """``p <- clamp(p - rate * g / (q (1 - q)), -bound, bound)`` for every ``p`` at once: one
    multi-tensor (``torch._foreach_*``) operator per arithmetic step for all the layers, not one
    per layer (the numbers of the per-tensor operators, in the same order)."""
    var = torch._foreach_sigmoid(params)  # q
    one_minus = torch._foreach_neg(var)
    torch._foreach_add_(one_minus, 1.0)  # 1 - q
    torch._foreach_mul_(var, one_minus)  # q (1 - q)
    torch._foreach_clamp_min_(var, 1e-12)
    torch._foreach_sub_(params, torch._foreach_div(grads, var), alpha=rate)
    torch._foreach_clamp_min_(params, -bound)
    torch._foreach_clamp_max_(params, bound)
