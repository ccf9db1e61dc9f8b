r"""The spike-and-slab prior: a Bernoulli gate per node (or per weight) over a slab.

:class:`SpikeAndSlab` owns the gates: their Bernoulli factors, the gate draws of the fast path,
their KL and their Pyro sites. What an included node's weights follow is the *slab*, a small
strategy object per ``slab`` option (Gaussian, group lasso, group horseshoe;
:mod:`bayesprune.priors._slabs`) with the slab's own latent variables, its KL given inclusion
and its sample sites. :func:`theory_inclusion` is the layer-wise prior inclusion of
``prior_inclusion="theory"``.

Example
-------
>>> from bayesprune.priors import SpikeAndSlab
>>> prior = SpikeAndSlab(level="node", slab="horseshoe")
>>> prior.weights, prior.noncentred
('gaussian', True)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import pyro
import pyro.distributions as dist
import torch

from ._checks import check_positive, check_probability
from ._math import (
    bernoulli_logs,
    decided_gate,
    hard_concrete,
    kl_bernoulli_logs,
    kl_normal,
    log_sigmoid,
    trapezoid_gate,
)
from ._slabs import GaussianSlab, GroupLassoSlab, HorseshoeSlab, Slab, slab_sd
from ._weights import (
    bias_kl,
    guide_weight_sites,
    site_prefix,
    weight_sites,
)
from .base import Prior, register_prior
from .horseshoe import HalfCauchyScale

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import BayesianLayer

__all__ = ["SpikeAndSlab", "theory_inclusion"]


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


# --------------------------------------------------------------------------------------------
# the prior
# --------------------------------------------------------------------------------------------
@register_prior
@dataclass(frozen=True, kw_only=True)
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
    example; its logit gets the trapezoid-rule gradient of
    :func:`~bayesprune.priors._math.trapezoid_gate` (default) or
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
    * ``"horseshoe"`` (SS-GHS): the slab is the group horseshoe of
      :class:`~bayesprune.priors.GroupHorseshoe`, with the same node scales
      (:class:`~bayesprune.priors.horseshoe.HalfCauchyScale`):
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
        With point weights a node stays only if it lowers the training NLL by more than about
        :math:`\log((1 - \gamma) / \gamma)` nats: the prior is the size knob
        (``docs/USAGE.md``, "How small").
    prior_log_odds
        The same prior given by its log-odds :math:`a = \log(\gamma / (1 - \gamma))`, for
        priors stronger than a double holds (:math:`\gamma` below about :math:`10^{-300}`,
        :math:`a` below about -690): ``prior_log_odds=-1500.0`` charges a node 1,500 nats. Give it
        or ``prior_inclusion``, not both.
    per_parameter
        With ``prior_log_odds``: price a node by the parameters of its group (``group_size``: a
        unit's incoming weights and bias; a head's q, k, v rows and out_proj columns), its
        log-odds ``prior_log_odds * group_size``. One number then prices a 4,000-parameter
        attention head and a 100-parameter unit alike per parameter
        (``prior_log_odds=-0.25, per_parameter=True``: 0.25 nats per parameter).
    price_per_example
        :math:`\lambda`, a price per parameter and per training example: node :math:`j` of a
        layer has log-odds :math:`\min(\log(\gamma / (1 - \gamma)), -\lambda N m_j)`, with
        :math:`m_j` its group size and :math:`N` the training-set size (``num_data``): its
        prior inclusion is at most :math:`\gamma` and at most what its parameters' price allows.
        With point weights a node then stays only if it lowers the *mean* training NLL by more
        than about :math:`\lambda m_j` nats (or :math:`\log((1 - \gamma)/\gamma) / N` where
        that is more): the :math:`L_0` penalty of Louizos, Welling and Kingma (2018) in the
        ELBO's scale, the same trade of mean loss against parameters at every data size (a
        per-node prior alone is outweighed by a likelihood that grows with :math:`N`; the
        per-node charge still rules small nodes on small data). The prior then depends on
        :math:`N`: the PIPs are of this data-size-dependent prior, and a fit on N examples is
        not a fit on fewer examples updated with more. Node level only; not with
        ``per_parameter``.
    num_data
        :math:`N` of ``price_per_example``. :func:`bayesprune.fit` sets it to its training-set
        size (:meth:`for_data`); give it only to use the prior outside a fit.
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
        Bernoulli draw either way): ``"trapezoid"`` (default,
        :func:`~bayesprune.priors._math.trapezoid_gate`) or ``"concrete"`` (Jantre et al.'s
        straight-through binary Concrete, :func:`~bayesprune.priors._math.hard_concrete`).
    init_inclusion
        Initial :math:`q_j`; high for a pretrained net so it starts near its accuracy.
    global_scale
        Scale of the layer half-Cauchy of the horseshoe slab.
    lasso_rate
        :math:`\lambda` of the group-lasso slab (``None``: :math:`\sqrt{m_j + 1}`).

    >>> from bayesprune.priors import SpikeAndSlab
    >>> SpikeAndSlab(level="node", slab="group_lasso").slab
    'group_lasso'
    >>> SpikeAndSlab(price_per_example=5e-6).for_data(10_000).num_data
    10000
    """

    level: Literal["node", "weight"] = "node"
    prior_inclusion: float | Literal["theory"] | None = 0.1
    slab: Literal["gaussian", "group_lasso", "horseshoe"] = "gaussian"
    slab_scale: float | Literal["he"] = "he"
    temperature: float = 0.5
    init_inclusion: float = 0.95
    gate_gradient: Literal["trapezoid", "concrete"] = "trapezoid"
    global_scale: float = 1.0
    lasso_rate: float | None = None
    weights: Literal["point", "gaussian"] | None = None
    prior_log_odds: float | None = None
    per_parameter: bool = False
    price_per_example: float | None = None
    num_data: int | None = None

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
        if self.prior_log_odds is not None:
            a = self.prior_log_odds
            if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a):
                raise ValueError(f"prior_log_odds must be a finite number, got {a!r}")
            if self.prior_inclusion not in (0.1, None):  # 0.1: the default; None: from to_dict
                raise ValueError(
                    "give prior_inclusion or prior_log_odds, not both: prior_log_odds=a is "
                    f"prior_inclusion=1/(1+exp(-a)) (got prior_inclusion={self.prior_inclusion!r}, "
                    f"prior_log_odds={a!r})"
                )
            object.__setattr__(self, "prior_log_odds", float(a))
            object.__setattr__(self, "prior_inclusion", None)  # so to_dict records one of them
        elif self.prior_inclusion != "theory":
            p = self.prior_inclusion
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
                raise ValueError(
                    f"prior_inclusion must be a probability in (0, 1) or 'theory', got {p!r}"
                )
        if not isinstance(self.per_parameter, bool):
            raise TypeError(f"per_parameter must be True or False, got {self.per_parameter!r}")
        if self.per_parameter and (self.prior_log_odds is None or self.level != "node"):
            raise ValueError(
                "per_parameter=True prices each node by its parameters: it needs level='node' "
                "and prior_log_odds, the log-odds per parameter (e.g. prior_log_odds=-0.25)"
            )
        self._check_price()
        if self.gate_gradient not in ("trapezoid", "concrete"):
            raise ValueError(
                f"gate_gradient must be 'trapezoid' or 'concrete', got {self.gate_gradient!r}"
            )
        check_probability("SpikeAndSlab", "init_inclusion", self.init_inclusion)
        if self.slab_scale != "he":
            check_positive("SpikeAndSlab", "slab_scale", self.slab_scale)
        check_positive("SpikeAndSlab", "temperature", self.temperature)
        check_positive("SpikeAndSlab", "global_scale", self.global_scale)
        if self.lasso_rate is not None:
            check_positive("SpikeAndSlab", "lasso_rate", self.lasso_rate)
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

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if d["prior_log_odds"] is None:  # files stay readable by versions without the options
            del d["prior_log_odds"]
        for name in ("per_parameter", "price_per_example", "num_data"):
            if d[name] in (None, False):
                del d[name]
        return d

    def _check_price(self) -> None:
        lam, n = self.price_per_example, self.num_data
        if lam is not None:
            if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0 < lam < math.inf:
                raise ValueError(
                    "price_per_example must be a positive finite number (nats of mean training "
                    f"loss per parameter, e.g. 5e-6; None for no price), got {lam!r}"
                )
            object.__setattr__(self, "price_per_example", float(lam))
            if self.level != "node" or self.per_parameter:
                raise ValueError(
                    "price_per_example prices each node by its parameters: it needs level='node' "
                    "and no per_parameter (both price parameters; give one)"
                )
        if n is not None:
            if lam is None:
                raise ValueError("num_data is the N of price_per_example; give price_per_example")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"num_data must be a positive integer, got {n!r}")

    def for_data(self, num_data: int) -> SpikeAndSlab:
        """This prior for a training set of ``num_data`` examples (itself without
        ``price_per_example``, which is the only option that depends on it)."""
        if self.price_per_example is None or self.num_data == num_data:
            return self
        return dataclasses.replace(self, num_data=num_data)

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> SpikeAndSlab:
        if "weights" not in options:
            # saved before point weights existed: those fits had the Gaussian weight posterior
            options = {**options, "weights": "gaussian"}
        return super().from_dict(options)

    @property
    def node_level(self) -> bool:  # type: ignore[override]
        return self.level == "node"

    @property
    def weight_level(self) -> bool:  # type: ignore[override]
        return self.level == "weight"

    @property
    def noncentred(self) -> bool:  # type: ignore[override]
        return self._slab.noncentred

    @property
    def uses_row_stats(self) -> bool:  # type: ignore[override]
        # the weight-level KL is a per-weight gated sum, not a function of the row sums; point
        # weights have no KL
        return self.level == "node" and self.weights == "gaussian"

    @property
    def point_weights(self) -> bool:  # type: ignore[override]
        return self.weights == "point"

    @cached_property
    def _slab(self) -> Slab:
        """The slab strategy of the ``slab`` option."""
        if self.slab == "group_lasso":
            return GroupLassoSlab(self.slab_scale, self.lasso_rate)
        if self.slab == "horseshoe":
            # slab width c of the horseshoe slab; "he" means the GroupHorseshoe default c = 2
            c = 2.0 if self.slab_scale == "he" else float(self.slab_scale)
            return HorseshoeSlab(HalfCauchyScale(global_scale=self.global_scale, slab_width=c))
        return GaussianSlab(self.slab_scale)

    # -- hyperparameters per layer ----------------------------------------------------------
    @property
    def _via_log_odds(self) -> bool:
        """Whether the prior is computed from its log-odds (:meth:`log_odds` is exact where the
        inclusion underflows a double) rather than from ``prior_inclusion``."""
        return self.prior_log_odds is not None or self.price_per_example is not None

    def _stated_inclusion(self, layer: BayesianLayer) -> float:
        """``prior_inclusion``, with ``"theory"`` resolved for the layer."""
        if self.prior_inclusion == "theory":
            return theory_inclusion(layer.weight_loc.shape[0], layer.group_size)
        return float(self.prior_inclusion)

    def gamma(self, layer: BayesianLayer) -> float:
        """Prior inclusion of the layer (resolves ``"theory"``; an error where ``prior_log_odds``
        is below what a double holds: :meth:`log_odds` is exact)."""
        if not self._via_log_odds:
            return self._stated_inclusion(layer)
        a = self.log_odds(layer)
        gamma = math.exp(log_sigmoid(a))
        if gamma < sys.float_info.min:
            raise ValueError(
                f"prior log-odds {a:g} is a prior inclusion below what a double holds; use "
                "log_odds(layer) or kl_gates(layer, logit) instead of gamma"
            )
        return gamma

    def log_odds(self, layer: BayesianLayer) -> float:
        r"""Prior log-odds :math:`\log(\gamma / (1 - \gamma))` of the layer's gates."""
        if self.prior_log_odds is not None:
            scale = layer.group_size if self.per_parameter else 1
            a = float(self.prior_log_odds) * scale
        else:
            gamma = self._stated_inclusion(layer)
            a = math.log(gamma) - math.log1p(-gamma)
        if self.price_per_example is None:
            return a
        if self.num_data is None:
            raise ValueError(
                "price_per_example charges lam * N nats per parameter, N the training-set size, "
                "which this prior does not know yet: bayesprune.fit sets it; outside a fit call "
                "bnet.set_num_data(N) on the BayesianModule, or use prior.for_data(N)"
            )
        return min(a, -self.price_per_example * self.num_data * layer.group_size)

    def kl_gates(self, layer: BayesianLayer, logit: torch.Tensor) -> torch.Tensor:
        """Elementwise KL of gates with logits ``logit`` against this layer's prior inclusion."""
        return kl_bernoulli_logs(logit, *self.inclusion_logs(layer))

    def inclusion_logs(self, layer: BayesianLayer) -> tuple[float, float]:
        r""":math:`(\log \gamma, \log(1 - \gamma))` of the layer's prior inclusion, as
        :meth:`kl_gates` uses them (from :meth:`log_odds` where ``prior_log_odds`` or
        ``price_per_example`` is set: exact where :math:`\gamma` underflows a double)."""
        if self._via_log_odds:
            return bernoulli_logs(None, self.log_odds(layer))
        return bernoulli_logs(self.gamma(layer), None)

    def base_scale(self, layer: BayesianLayer) -> float:
        return self._slab.base_scale(layer)

    # -- parameters ---------------------------------------------------------------------------
    def setup(self, layer: BayesianLayer, init_scale: float) -> None:
        shape = layer.weight_loc.shape if self.level == "weight" else layer.weight_loc.shape[:1]
        logit = math.log(self.init_inclusion / (1 - self.init_inclusion))
        layer.gate_logit = torch.nn.Parameter(layer.weight_loc.new_full(shape, logit))
        self._slab.setup(layer)

    def structure_parameter_names(self, layer: BayesianLayer) -> tuple[str, ...]:
        return ("gate_logit", *self._slab.parameter_names)

    def natural_gate_names(self, layer: BayesianLayer) -> tuple[str, ...]:
        # only with point weights: with Bayesian weights the natural step reaches the mean-field
        # optimum, the empty network (BayesianModule.gate_parameters)
        return ("gate_logit",) if self.point_weights else ()

    def init_weight_loc(self, layer, weight):
        return self._slab.init_weight_loc(layer, weight)

    def init_bias_loc(self, layer, bias):
        return self._slab.init_bias_loc(layer, bias)

    # -- fast path ----------------------------------------------------------------------------
    def _gate(self, logit: torch.Tensor, batch: int | None) -> torch.Tensor:
        if self.gate_gradient == "concrete":
            return hard_concrete(logit, self.temperature, batch)
        return trapezoid_gate(logit, batch)

    def weight_gate(self, layer):
        if self.level != "weight":
            return None
        return self._gate(layer.gate_logit, None)

    def node_multiplier(self, layer, batch=None):
        if self.level != "node":
            return None
        if layer.gates_decided and self.point_weights:  # (point weights: the gates alone)
            return decided_gate(layer.gate_logit, batch)
        z = self._gate(layer.gate_logit, batch)
        s = self._slab.sample_scale(layer, batch)
        return z if s is None else z * s

    def mean_multiplier(self, layer):
        # conditional on inclusion (the median-probability model): the gate is 1 for kept nodes
        return self._slab.mean_scale(layer)

    def kl(self, layer):
        kl_z = self.kl_gates(layer, layer.gate_logit)
        q = torch.sigmoid(layer.gate_logit)
        if self.level == "weight":
            s0 = slab_sd(self.slab_scale, layer)
            kl_w = q * kl_normal(layer.weight_loc, layer.weight_log_sd, s0)
            kb = bias_kl(layer, s0)
            total = kl_z.sum() + kl_w.sum()
            return total if kb is None else total + kb.sum()
        if self.point_weights:
            return kl_z.sum()
        return self._slab.kl(layer, kl_z, q)

    # -- Pyro sites ---------------------------------------------------------------------------
    def model_sites(self, layer, path):
        shape = layer.gate_logit.shape
        logits = layer.weight_loc.new_full(shape, self.log_odds(layer))
        z = pyro.sample(
            f"{site_prefix(path)}gate", dist.Bernoulli(logits=logits).to_event(len(shape))
        )
        if self.level == "weight":
            w, b = weight_sites(layer, path, slab_sd(self.slab_scale, layer))
            return z * w, b, None
        if self.point_weights:  # the weights are parameters of the model, not sample sites
            return layer.weight_loc, layer.bias_loc, z
        w, b, s = self._slab.model_sites(layer, path)
        return w, b, z if s is None else z * s

    def guide_sites(self, layer, path):
        q = torch.sigmoid(layer.gate_logit)
        z = pyro.sample(f"{site_prefix(path)}gate", dist.Bernoulli(q).to_event(q.dim()))
        if self.level == "weight":
            s0 = slab_sd(self.slab_scale, layer)
            w, b = guide_weight_sites(layer, path, gate=z, pseudo_scale=s0, gate_is_per_weight=True)
            return z * w, b, None
        if self.point_weights:
            return layer.weight_loc, layer.bias_loc, z
        w, b, s = self._slab.guide_sites(layer, path, z)
        return w, b, z if s is None else z * s

    # -- inclusion ------------------------------------------------------------------------------
    def inclusion_probs(self, layer):
        return torch.sigmoid(layer.gate_logit) if self.level == "node" else None

    def inclusion_logits(self, layer):
        return layer.gate_logit.double() if self.level == "node" else None

    def weight_inclusion_probs(self, layer):
        return torch.sigmoid(layer.gate_logit) if self.level == "weight" else None
