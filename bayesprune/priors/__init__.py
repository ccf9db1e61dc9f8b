r"""Prior specifications: hyperparameters, Pyro sample sites, analytic KL terms and inclusion probabilities.

A prior object is a small frozen dataclass. :func:`bayesprune.bayesianize` hands it to every
Bayesian layer (:mod:`bayesprune.layers`); the prior then

* registers its variational parameters on the layer (:meth:`Prior.setup`) and names those that
  decide which nodes stay (:meth:`Prior.structure_parameter_names`),
* draws the per-minibatch node multipliers of the fast training path (:meth:`Prior.node_multiplier`,
  :meth:`Prior.weight_gate`),
* computes the analytic :math:`\mathrm{KL}(q \,\|\, p)` of the layer (:meth:`Prior.kl`),
* writes the genuine Pyro ``pyro.sample`` statements of the model and the guide
  (:meth:`Prior.model_sites`, :meth:`Prior.guide_sites`), named ``"<layer path>.<site>"``,
* and reads inclusion probabilities off the variational posterior (:meth:`Prior.inclusion_probs`).

The contract is written once, in :class:`Prior` (:mod:`bayesprune.priors.base`). A prior of your
own subclasses it and is registered with :func:`register_prior` (``bp.register_prior``), so that
:func:`bayesprune.load` rebuilds it from a saved file (:func:`prior_from_dict`).

Notation for one layer: node (output unit / filter) :math:`j`, its incoming weights and bias form the
group :math:`w_j` of size :math:`m_j` (``fan_in * kernel_size + 1`` with a bias), the layer has
:math:`N_l` nodes. Every layer's base weights have a mean-field Gaussian variational factor
:math:`q(w) = \mathcal N(\mu, \sigma^2)` stored as ``layer.weight_loc`` and ``layer.weight_log_scale``
(``layer.weight_scale`` = :math:`\sigma`), same for the bias.

Priors
------
Every option is keyword-only (``Gaussian(scale=0.5)``, not ``Gaussian(0.5)``).

``Gaussian(*, scale)`` (:mod:`~bayesprune.priors.gaussian`)
    :math:`w \sim \mathcal N(0, s^2)` elementwise. No inclusion probabilities.
``SpikeAndSlab(*, level="node" | "weight", prior_inclusion, slab="gaussian" | "group_lasso" | "horseshoe")`` (:mod:`~bayesprune.priors.spike_slab`)
    :math:`z_j \sim \mathrm{Bernoulli}(\gamma)` multiplies node :math:`j`'s output (``level="node"``) or
    each weight (``level="weight"``); the slab is Gaussian, group-lasso or group-horseshoe.
    ``prior_log_odds`` gives :math:`\gamma` by its log-odds, for priors below what a double holds;
    ``price_per_example`` :math:`\lambda` caps node :math:`j`'s log-odds at :math:`-\lambda N m_j`
    (:math:`m_j` parameters, :math:`N` training examples, which :func:`bayesprune.fit` supplies).
``default_prior()`` (:mod:`~bayesprune.priors.default`)
    what :func:`bayesprune.bayesianize` uses when no prior is given:
    ``SpikeAndSlab(level="node", price_per_example=DEFAULT_PRICE_PER_EXAMPLE)``.
``GroupHorseshoe(*, global_scale, regularized, slab_scale, pip_reference)`` (:mod:`~bayesprune.priors.horseshoe`)
    node-wise half-Cauchy scales times a layer-wise half-Cauchy scale, non-centred
    (:class:`~bayesprune.priors.horseshoe.HalfCauchyScale`).

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

# the built-in priors register themselves when their modules are imported, here
from .base import Prior, prior_from_dict, register_prior, registered_priors
from .default import DEFAULT_PRICE_PER_EXAMPLE, default_prior
from .gaussian import Gaussian
from .horseshoe import GroupHorseshoe
from .spike_slab import SpikeAndSlab, theory_inclusion

# isort: split
# private helpers that tests/test_layers.py and tests/test_natural.py import from here
from ._math import hard_concrete as _hard_concrete  # noqa: F401
from ._math import kl_bernoulli as _kl_bernoulli  # noqa: F401
from ._math import kl_normal as _kl_normal  # noqa: F401

__all__ = [
    "DEFAULT_PRICE_PER_EXAMPLE",
    "Gaussian",
    "GroupHorseshoe",
    "Prior",
    "SpikeAndSlab",
    "default_prior",
    "prior_from_dict",
    "register_prior",
    "registered_priors",
    "theory_inclusion",
]
