r"""The prior that :func:`bayesprune.bayesianize` and ``bayesprune fit`` use when none is given.

:func:`default_prior` is node-level spike-and-slab with a price per parameter and per training
example (:class:`~bayesprune.priors.spike_slab.SpikeAndSlab`, ``price_per_example``):

.. math::

    z_j \sim \mathrm{Bernoulli}(\gamma_j), \qquad
    \operatorname{logit} \gamma_j = \min\bigl(\operatorname{logit} 0.1,\; -\lambda N m_j\bigr),
    \qquad \lambda = 2 \times 10^{-6},

node :math:`j` with :math:`m_j` parameters, :math:`N` training examples (which
:func:`bayesprune.fit` hands to the prior, :meth:`~bayesprune.priors.base.Prior.for_data`). On a
small data set every node is charged the prior inclusion 0.1's 2.2 nats; on a large one, where a
fixed charge is outweighed by a likelihood that grows with :math:`N`, a node stays only if it
lowers the mean training loss by about :math:`\lambda m_j` nats (the L0 trade of Louizos, Welling
and Kingma 2018, "Learning Sparse Neural Networks through L0 Regularization", at every data size).
The PIPs are therefore those of a prior that depends on :math:`N`; the fit reports it.

Why this prior and not ``SpikeAndSlab(level="node")`` alone (the per-node charge, which keeps too
many nodes from 5,000 images up): the measurements on nets, data sizes and budgets that neither
was chosen on are in ``docs/default-candidates.md`` (table ``default-candidates``) and the
robustness table of ``benchmarks/README.md``.

Example
-------
>>> import bayesprune as bp
>>> prior = bp.priors.default_prior()
>>> prior.price_per_example == bp.priors.DEFAULT_PRICE_PER_EXAMPLE
True
>>> prior.prior_inclusion, prior.level
(0.1, 'node')
"""

from __future__ import annotations

from .spike_slab import SpikeAndSlab

__all__ = ["DEFAULT_PRICE_PER_EXAMPLE", "default_prior"]

#: nats of mean training loss a parameter must be worth to keep its node (``default_prior``)
DEFAULT_PRICE_PER_EXAMPLE = 2e-6


def default_prior() -> SpikeAndSlab:
    """``SpikeAndSlab(level="node", price_per_example=DEFAULT_PRICE_PER_EXAMPLE)``: the prior of
    :func:`bayesprune.bayesianize` when ``prior`` is not given (the maths: this module's
    docstring)."""
    return SpikeAndSlab(level="node", price_per_example=DEFAULT_PRICE_PER_EXAMPLE)
