r"""The prior contract (:class:`Prior`) and the registry that :func:`bayesprune.load` rebuilds priors from.

A prior is a small frozen dataclass whose fields are its options. :func:`bayesprune.bayesianize`
hands it to every Bayesian layer (:mod:`bayesprune.layers`), and the layer asks it, through the
methods of :class:`Prior`, for everything that depends on the prior: its own variational
parameters, the node multipliers and the analytic KL of the fast training path, the Pyro sample
sites of the model and the guide, and the inclusion probabilities.

Notation for one layer: node (output unit / filter) :math:`j`, its incoming weights and bias form
the group :math:`w_j` of size :math:`m_j` (``layer.group_size``: ``fan_in * kernel_size``, +1 with
a bias). Whatever the prior, the layer's base weights have a mean-field Gaussian variational
factor :math:`q(w) = \mathcal N(\mu, \sigma^2)`, stored as ``layer.weight_loc`` and
``layer.weight_log_sd`` (``layer.weight_scale`` = :math:`\sigma`), the same for the bias
(``layer.bias_loc``, ``layer.bias_log_scale``; ``None`` without a bias).

Writing a prior
---------------
Subclass :class:`Prior` (or a built-in prior) as a ``@dataclass(frozen=True, kw_only=True)`` whose
fields are the options (JSON scalars: numbers, strings, booleans, ``None``), check the options in
``__post_init__``, implement :meth:`Prior.kl`, :meth:`Prior.model_sites` and
:meth:`Prior.guide_sites` (and whichever optional methods apply), and register the class with
:func:`register_prior`. A saved :class:`~bayesprune.BayesianModule` records each layer's prior as
:meth:`Prior.to_dict` (the registered name under ``"type"``, then the options);
:func:`bayesprune.load` rebuilds it with :func:`prior_from_dict`, so a prior of your own must be
registered, in the session that loads the file, before :func:`bayesprune.load` is called.

Example
-------
>>> from bayesprune.priors import Gaussian, prior_from_dict, registered_priors
>>> {"Gaussian", "GroupHorseshoe", "SpikeAndSlab"} <= set(registered_priors())
True
>>> Gaussian(scale=0.5).to_dict()
{'type': 'Gaussian', 'scale': 0.5}
>>> prior_from_dict({"type": "Gaussian", "scale": 0.5})
Gaussian(scale=0.5)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..layers import BayesianLayer

__all__ = ["Prior", "prior_from_dict", "register_prior", "registered_priors"]


@dataclass(frozen=True)
class Prior:
    r"""The contract between a prior and the Bayesian layers: every method a prior must or may
    implement, with its meaning.

    **Must implement**: :meth:`kl`, :meth:`model_sites`, :meth:`guide_sites`. Everything else
    has a default that fits a prior with Gaussian base weights and no node multiplier.

    The three must agree: :meth:`kl` is
    :math:`\mathbb E_{\text{guide}}[\log q - \log p]` over the sites that :meth:`guide_sites` and
    :meth:`model_sites` sample (the same names, ``"<layer path>.<site>"``), in closed form, and the
    fast path (:meth:`node_multiplier`, :meth:`weight_gate`) draws the same variables as the guide.

    ========================================  ==========================================================
    member                                    meaning
    ========================================  ==========================================================
    ``to_dict()`` / ``from_dict(options)``    serialised form (``"type"``: the registered name); inverse
    ``for_data(num_data)``                    the prior for N training examples (itself by default)
    ``setup(layer, init_scale)``              register the prior's own variational parameters on ``layer``
    ``structure_parameter_names(layer)``      which of them get ``structure_lr`` in :func:`bayesprune.fit`
    ``natural_gate_names(layer)``             Bernoulli gate logits that ``fit`` moves by natural steps
    ``init_weight_loc`` / ``init_bias_loc``   initial posterior means of the base weights
    ``base_scale(layer)``                     prior sd of the base weights
    ``weight_gate(layer)``                    per-weight multiplier of the fast path, or ``None``
    ``node_multiplier(layer, batch)``         per-node multiplier of the fast path, or ``None``
    ``mean_multiplier(layer)``                posterior-mean node multiplier (``mean_module``), or ``None``
    ``kl(layer)``                             analytic :math:`\mathrm{KL}(q \,\|\, p)` of the layer (must)
    ``model_sites(layer, path)``              ``pyro.sample`` from the prior (must)
    ``guide_sites(layer, path)``              ``pyro.sample`` from the variational posterior (must)
    ``inclusion_probs(layer)``                PIP per output node, or ``None``
    ``inclusion_logits(layer)``               log-odds of the PIPs (float64), or ``None``
    ``weight_inclusion_probs(layer)``         PIP per weight, or ``None``
    ``node_level``, ``weight_level``          flags: which of the inclusion methods give values
    ``noncentred``                            the base weight is a standardised :math:`\beta`
    ``point_weights``                         the weights are point estimates (no noise, no KL)
    ``uses_row_stats``                        :meth:`kl` reads the layer's per-node row statistics
    ========================================  ==========================================================

    Register a subclass with :func:`register_prior` so that :func:`bayesprune.load` can rebuild
    it (see the module docstring).
    """

    #: whether :meth:`inclusion_probs` gives one probability per output node
    node_level = False
    #: whether :meth:`weight_inclusion_probs` gives one probability per weight
    weight_level = False
    #: whether the base weight is the standardised ``beta`` of a non-centred scale mixture (the
    #: layer then sets its initial posterior sds relative to the initial ``weight_loc`` that
    #: :meth:`init_weight_loc` returns, not to the pretrained weights)
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
        """JSON-able description: ``{"type": <registered name>, **options}``; :func:`prior_from_dict`
        inverts it. An unregistered class writes its class name."""
        return {"type": _registered_name(type(self)), **asdict(self)}

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> Prior:
        """The prior with these options (:meth:`to_dict` without ``"type"``); an option the class
        does not have is an error, not silently the default.

        Override it (calling ``super().from_dict``) to read files written before an option
        existed, as :class:`~bayesprune.priors.SpikeAndSlab` does."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"{_registered_name(cls)} has no option(s) {unknown}; its options are {known}"
            )
        return cls(**options)

    def for_data(self, num_data: int) -> Prior:
        """The prior for a training set of ``num_data`` examples: :func:`bayesprune.fit` hands
        each layer this before it fits (itself by default; a prior whose options depend on the
        data size returns a copy that records it, so that a saved fit reloads with it)."""
        return self

    # -- variational family -----------------------------------------------------------------
    def setup(self, layer: BayesianLayer, init_scale: float) -> None:
        """Register the prior's own variational parameters on ``layer`` (none by default).

        Called once, when the layer is built, after ``weight_loc`` / ``bias_loc`` (the pretrained
        weights) and before the base weights' sds exist. ``init_scale`` is the initial posterior sd
        of the base weights relative to their RMS. Parameters are plain ``nn.Parameter``
        attributes of the layer; their names must not start with ``weight_`` or ``bias_``."""

    def structure_parameter_names(self, layer: BayesianLayer) -> tuple[str, ...]:
        """Names of the layer parameters, among those :meth:`setup` registered, that decide which
        nodes stay (gate logits, shrinkage scales): :func:`bayesprune.fit` gives them
        ``structure_lr`` and holds them during ``structure_delay``. None by default."""
        return ()

    def natural_gate_names(self, layer: BayesianLayer) -> tuple[str, ...]:
        """Names of Bernoulli gate logits (a subset of :meth:`structure_parameter_names`) that
        :func:`bayesprune.fit` moves with natural-gradient steps (:mod:`bayesprune.natural`)
        instead of Adam. None by default."""
        return ()

    def structure_parameters(self, layer: BayesianLayer) -> list[nn.Parameter]:
        """The parameters of :meth:`structure_parameter_names`, in the layer's registration order."""
        names = set(self.structure_parameter_names(layer))
        own = dict(layer.named_parameters(recurse=False))
        missing = sorted(names - set(own))
        if missing:
            raise ValueError(
                f"{type(self).__name__}.structure_parameter_names gives {missing}, which are not "
                f"parameters of the layer; its parameters are {sorted(own)}"
            )
        return [p for n, p in own.items() if n in names]

    def base_scale(self, layer: BayesianLayer) -> float:
        """Prior scale of the base weights (of the standardised weights for a non-centred prior)."""
        raise NotImplementedError

    def init_weight_loc(self, layer: BayesianLayer, weight: torch.Tensor) -> torch.Tensor:
        """Initial posterior mean of the base weight given the pretrained weight."""
        return weight

    def init_bias_loc(self, layer: BayesianLayer, bias: torch.Tensor) -> torch.Tensor:
        """Initial posterior mean of the base bias given the pretrained bias."""
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
        horseshoe's layer scale :math:`\\tau`) must share it within each example's draw.
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
        """``pyro.sample`` the layer's latents from the prior; return (weight, bias, node multiplier).

        Sites are named ``"<path>.<site>"`` (``"<site>"`` for a root layer, ``path == ""``): the
        base weights ``"<path>.weight"`` / ``"<path>.bias"``, and the prior's own latents."""
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
        """Posterior inclusion probability per weight (weight-shaped), or ``None``."""
        return None


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
#: registered name -> prior class (the built-ins register themselves on import)
_REGISTRY: dict[str, type[Prior]] = {}

P = TypeVar("P", bound=type[Prior])


def register_prior(cls: P | None = None, /, *, name: str | None = None) -> P | Callable[[P], P]:
    """Register a prior class so that :func:`prior_from_dict` and :func:`bayesprune.load` can
    rebuild it from a saved file; returns the class (usable as a class decorator).

    Parameters
    ----------
    cls
        A subclass of :class:`Prior` that is a dataclass (its fields are the options that
        :meth:`Prior.to_dict` saves).
    name
        The name saved under ``"type"`` (default: the class name). Registering the class again
        under its name does nothing; a *different* class under a taken name is an error, except a
        redefinition of the same class (same module and qualified name, e.g. a re-run notebook
        cell), which replaces it.

    Raises
    ------
    TypeError
        ``cls`` is not a dataclass subclass of :class:`Prior`.
    ValueError
        The name is taken by another class, or the class is registered under another name.

    Example
    -------
    (Not run by the doctests: a run in another module would register a second ``WideGaussian``;
    ``tests/test_priors_registry.py`` runs a prior of its own through fit, save and load.)

    >>> from dataclasses import dataclass
    >>> import bayesprune as bp
    >>> @bp.register_prior  # doctest: +SKIP
    ... @dataclass(frozen=True)
    ... class WideGaussian(bp.priors.Gaussian):
    ...     scale: float = 3.0
    >>> bp.priors.prior_from_dict(WideGaussian().to_dict())  # doctest: +SKIP
    WideGaussian(scale=3.0)
    """
    if cls is None:
        return lambda c: register_prior(c, name=name)
    if not (isinstance(cls, type) and issubclass(cls, Prior)):
        raise TypeError(f"register_prior takes a subclass of bayesprune.priors.Prior, got {cls!r}")
    if not is_dataclass(cls) or (
        "__dataclass_fields__" not in cls.__dict__ and inspect.get_annotations(cls)
    ):
        # an undecorated subclass's annotated options are not fields: to_dict would drop them
        raise TypeError(
            f"{cls.__qualname__} must be a dataclass (@dataclass(frozen=True)): its fields are "
            "the options that to_dict saves and prior_from_dict passes back"
        )
    key = cls.__name__ if name is None else name
    if not isinstance(key, str) or not key:
        raise ValueError(f"a prior's registered name must be a non-empty string, got {key!r}")
    held = _REGISTRY.get(key)
    if held is cls:
        return cls
    if held is not None and _where(held) != _where(cls):
        raise ValueError(
            f"the prior name {key!r} is taken by {_where(held)}; register "
            f"{_where(cls)} under another name: bp.register_prior({cls.__name__}, name=...)"
        )
    other = [n for n, c in _REGISTRY.items() if c is cls]
    if other:
        raise ValueError(f"{_where(cls)} is already registered as {other[0]!r}")
    _REGISTRY[key] = cls
    return cls


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _registered_name(cls: type[Prior]) -> str:
    """The name ``cls`` is registered under (its class name when it is not registered)."""
    return next((n for n, c in _REGISTRY.items() if c is cls), cls.__name__)


def registered_priors() -> dict[str, type[Prior]]:
    """Registered name -> prior class, the built-ins first (a copy: change it with
    :func:`register_prior`).

    >>> from bayesprune.priors import SpikeAndSlab, registered_priors
    >>> registered_priors()["SpikeAndSlab"] is SpikeAndSlab
    True
    """
    return dict(_REGISTRY)


def prior_from_dict(spec: Mapping[str, Any]) -> Prior:
    """Rebuild a prior from :meth:`Prior.to_dict` (used by :func:`bayesprune.load`): the class
    registered under ``spec["type"]``, built by its :meth:`Prior.from_dict` from the other keys.

    >>> from bayesprune.priors import GroupHorseshoe, prior_from_dict
    >>> prior_from_dict(GroupHorseshoe(global_scale=0.1).to_dict()) == GroupHorseshoe(global_scale=0.1)
    True
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"a prior spec is a dict such as Prior.to_dict() gives, got {spec!r}")
    options = dict(spec)
    name = options.pop("type", None)
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        hint = name if isinstance(name, str) and name.isidentifier() else "MyPrior"
        raise ValueError(
            f"unknown prior type {name!r}; the registered priors are {sorted(_REGISTRY)}. A prior "
            f"of your own must be registered before the file is read: define or import the class, "
            f"then call bp.register_prior({hint}) before bp.load"
        )
    return cls.from_dict(options)
