r"""ArviZ conversion of a fitted :class:`~bayesprune.BayesianModule`: :func:`to_arviz`.

``az.from_pyro`` accepts only MCMC objects, so :func:`to_arviz` draws from the *variational
posterior* :math:`q(\theta)` (the guide) and builds the :class:`arviz.InferenceData` with
``az.from_dict``. Every variable is named after its Pyro sample site (``"1.gate"``,
``"features.0.lambda_a"``, ``"1.weight"``), the name it has in a trace and in a checkpoint, and its
dimensions after the layer: ``"<layer>.node"`` (one entry per output unit / filter), then
``"<layer>.input"`` (and the kernel dimensions) for weights.

Reading the diagnostics of variational draws
--------------------------------------------
The draws are **independent** samples from :math:`q`, not a Markov chain targeting the posterior.
``r_hat`` is therefore close to 1 and the effective sample size close to the number of draws *by
construction*: they only report Monte-Carlo error of the summaries of :math:`q` and say nothing
about how well :math:`q` approximates the true posterior. (For a gate whose draws are all 1 or all
0, i.e. a PIP of 1 or 0 to within Monte-Carlo error, ``sd`` is 0 and ``r_hat``/``ess`` are NaN.)
The mean of a gate ``"<layer>.gate"`` is a Monte-Carlo estimate of the node's posterior inclusion
probability, the exact value of which is ``bnet.inclusion_probs()``.

What *does* speak to the quality of :math:`q` is the Pareto :math:`\hat k` of the importance
ratios (Yao, Vehtari, Simpson and Gelman 2018, "Yes, but did it work?"):

.. math::
    \log r_s = \log p(\theta_s, \mathcal D) - \log q(\theta_s), \qquad \theta_s \sim q,

computed with PSIS (:func:`arviz.psislw`) when ``data`` is given. :math:`\log p(\theta,
\mathcal D)` uses the given examples with the likelihood scaled by :math:`N / n` to the training-set
size :math:`N` (the same unbiased estimate as the minibatch ELBO). :math:`\hat k < 0.7` means
importance sampling from :math:`q` could correct it (``inf``: one draw carries all the weight);
for networks with 10^4-10^6 weights expect :math:`\hat k \gg 0.7`: a mean-field :math:`q` is far
from the exact posterior in that many dimensions even when its predictions and inclusion
probabilities are good. That is normal and is
why bayesprune's guarantees (:mod:`bayesprune.conformal`) do not rely on the posterior being exact.

With ``data``, ``az.loo`` works on the ``log_likelihood`` group; it then estimates the
leave-one-out predictive accuracy of the *variational* predictive distribution, and its own
per-observation :math:`\hat k` diagnose the leave-one-out importance sampling, not :math:`q`.

:func:`to_arviz` is a thin function over ``_GuideConverter``, which follows ArviZ's own converters
(``arviz.data.io_pyro.PyroConverter``): it draws once (:meth:`_GuideConverter.draw`), then builds
each group it writes with a method of its own (``posterior``, ``posterior_predictive``,
``log_likelihood``, ``observed_data``, ``sample_stats``) and assembles them in
:meth:`_GuideConverter.to_inference_data`.

Example
-------
>>> import arviz as az
>>> import bayesprune as bp
>>> from bayesprune.models import lenet_300_100
>>> bnet = bp.bayesianize(lenet_300_100(in_features=64), prior=bp.priors.SpikeAndSlab(level="node"))
>>> idata = bp.to_arviz(bnet, num_samples=50)
>>> az.summary(idata, var_names=["5.gate"], kind="stats").index[0]
'5.gate[0]'
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from .data import examples_of

__all__ = ["to_arviz"]

_KERNEL_DIMS = ("kh", "kw", "kd")


@torch.no_grad()
def to_arviz(
    bnet: Any,
    num_samples: int = 200,
    data: Any = None,
    *,
    weights: Sequence[str] | Literal["all"] | None = None,
    max_examples: int | None = 1000,
    num_chains: int = 4,
    seed: int | None = 0,
    progress: bool = False,
):
    r"""Draws from the variational posterior of ``bnet`` as an :class:`arviz.InferenceData`.

    Parameters
    ----------
    bnet
        A fitted :class:`~bayesprune.BayesianModule`.
    num_samples
        Number of independent draws :math:`\theta_s \sim q` (rounded up to a multiple of
        ``num_chains``).
    data
        Optional labelled examples: ``(x, y)`` tensors, a ``TensorDataset`` or a ``DataLoader``
        (at most ``max_examples`` are used). Adds the ``posterior_predictive``, ``log_likelihood``
        and ``observed_data`` groups (variable ``"obs"``, the model's likelihood site) and the PSIS
        :math:`\hat k` of the variational approximation (see the module docstring).
    weights
        Layers whose ``weight`` / ``bias`` draws to include (``"all"``, a list of layer paths, or
        ``None``: none, the default, since weight tensors make the result large).
    max_examples
        Cap on the examples taken from ``data``.
    num_chains
        The independent draws are laid out as this many "chains" so that ArviZ's split-chain
        diagnostics run (it needs at least 2). Any arrangement of independent draws is equally
        valid; ``r_hat`` is then about 1 by construction (see the module docstring).
    seed
        Seeds torch and Pyro before drawing; ``None`` leaves the random state alone.
    progress
        Show a progress bar over draws.

    Returns
    -------
    arviz.InferenceData
        ``posterior``: every per-node or per-layer latent of the guide (``"<layer>.gate"`` for
        spike-and-slab; ``"<layer>.lambda_a"``, ``"lambda_b"``, ``"tau_a"``, ``"tau_b"`` and the
        derived node scale ``"<layer>.scale"`` :math:`= \tau\lambda_j` for the group horseshoe;
        ``"<layer>.tau2"`` for the group-lasso slab), plus the selected weights. With ``data`` also
        ``posterior_predictive``, ``log_likelihood``, ``observed_data`` and ``sample_stats``
        (``log_importance_ratio``); ``posterior.attrs["psis_khat"]`` holds :math:`\hat k`.

    Example
    -------
    >>> import arviz as az  # doctest: +SKIP
    >>> import bayesprune as bp
    >>> from bayesprune.data import loader
    >>> idata = bp.to_arviz(bnet, 200, data=loader(splits.val, 256))  # doctest: +SKIP
    >>> az.plot_forest(idata, var_names=["3.gate"], combined=True)  # doctest: +SKIP
    >>> az.loo(idata)  # doctest: +SKIP
    """
    return _GuideConverter(
        bnet,
        num_samples,
        data,
        weights=weights,
        max_examples=max_examples,
        num_chains=num_chains,
        seed=seed,
        progress=progress,
    ).to_inference_data()


class _GuideConverter:
    """Draws from the guide of a :class:`~bayesprune.BayesianModule`, and the
    :class:`arviz.InferenceData` groups made from them, one method per group.

    The arguments are those of :func:`to_arviz`, checked here; ``num_samples`` is rounded up to a
    multiple of the number of chains, which may be lowered (at least 4 draws per chain).
    """

    def __init__(
        self,
        bnet: Any,
        num_samples: int,
        data: Any,
        *,
        weights: Sequence[str] | Literal["all"] | None,
        max_examples: int | None,
        num_chains: int,
        seed: int | None,
        progress: bool,
    ) -> None:
        import arviz as az

        self._az = az
        _check_bnet(bnet)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if not isinstance(num_chains, int) or num_chains < 1:
            raise ValueError(f"num_chains must be a positive integer, got {num_chains!r}")
        # at least 4 draws per chain, so that ArviZ does not mistake draws for chains
        num_chains = max(1, min(num_chains, num_samples // 4))
        if num_chains < 2:
            warnings.warn(
                f"the {num_samples} draws form one chain (num_chains={num_chains} requested; at least "
                "4 draws per chain): ArviZ's split-chain diagnostics (r_hat, ess) will be NaN. Pass "
                "num_chains >= 2 and num_samples >= 8",
                stacklevel=3,  # the frame to_arviz's own warning pointed at
            )
        self.bnet = bnet
        self.num_chains = num_chains
        self.per_chain = -(-num_samples // num_chains)
        self.num_samples = self.per_chain * num_chains
        self.progress = progress
        self.layers = bnet.bayesian_layers
        self.keep_weights = set(_weight_layers(weights, list(self.layers)))
        x, y = (None, None) if data is None else examples_of(data, max_examples)
        if x is not None:
            x, y = x.to(bnet.device), y.to(bnet.device)
        self.x, self.y = x, y
        if seed is not None:
            pyro.set_rng_seed(seed)
        # site name -> draws, and the layer it belongs to; per draw with data: the likelihood
        # site's log-likelihood and predictive draw, and the log importance ratio
        self.draws: dict[str, list[np.ndarray]] = {}
        self.site_layer: dict[str, str] = {}
        self.ll: list[np.ndarray] = []
        self.pp: list[np.ndarray] = []
        self.log_ratio: list[float] = []

    # -- drawing --------------------------------------------------------------------------------
    def draw(self) -> None:
        """``num_samples`` independent draws from the guide (and, with data, a replay of the
        model on each), with the module in eval mode (BatchNorm running statistics)."""
        bnet, x, y = self.bnet, self.x, self.y
        was_training = bnet.training
        bnet.eval()  # BatchNorm running statistics, as in prediction
        try:
            for _ in tqdm(
                range(self.num_samples),
                desc="posterior draws",
                disable=not self.progress,
                leave=False,
            ):
                guide_tr = poutine.trace(bnet.guide).get_trace(x, y)
                self._record_guide(guide_tr)
                if x is not None:
                    self._record_model(guide_tr)
        finally:
            bnet.train(was_training)
        if not self.draws:
            raise ValueError(
                "the guide of this BayesianModule has no per-node latent variables to convert (a "
                "Gaussian prior); pass weights='all' or a list of layer paths to convert weight draws"
            )

    def _record_guide(self, guide_tr: Any) -> None:
        """The per-layer sites of one guide trace (weights only of the layers asked for), and the
        group-horseshoe node scale derived from them."""
        draws, site_layer = self.draws, self.site_layer
        for path in self.layers:
            for name, site in guide_tr.nodes.items():
                if site["type"] != "sample" or not name.startswith(path + "."):
                    continue
                kind = _kind(name, path)
                if "." in kind:  # belongs to a deeper layer whose path extends this one
                    continue
                value = site["value"]
                if kind in ("weight", "bias") and path not in self.keep_weights:
                    continue
                draws.setdefault(name, []).append(value.detach().float().cpu().numpy())
                site_layer[name] = path
            scale = _node_scale(guide_tr, path)
            if scale is not None:
                draws.setdefault(f"{path}.scale", []).append(scale)
                site_layer[f"{path}.scale"] = path

    def _record_model(self, guide_tr: Any) -> None:
        r"""The model replayed on one guide draw: the likelihood site's log-likelihood and a
        predictive draw, and the log importance ratio :math:`\log p(\theta, \mathcal D) - \log q(\theta)`."""
        model_tr = poutine.trace(poutine.replay(self.bnet.model, trace=guide_tr)).get_trace(
            self.x, self.y
        )
        obs = model_tr.nodes["obs"]
        self.ll.append(obs["fn"].log_prob(obs["value"]).float().cpu().numpy())
        self.pp.append(obs["fn"].sample().cpu().numpy())
        model_tr.compute_log_prob()
        guide_tr.compute_log_prob()
        self.log_ratio.append(float(model_tr.log_prob_sum() - guide_tr.log_prob_sum()))

    def _chains(self, a: list) -> np.ndarray:
        """Per-draw values laid out as ``(chain, draw, ...)``."""
        arr = np.stack(a) if isinstance(a[0], np.ndarray) else np.asarray(a)
        return arr.reshape(self.num_chains, self.per_chain, *arr.shape[1:])

    # -- the groups -----------------------------------------------------------------------------
    def posterior(self) -> dict[str, np.ndarray]:
        """``posterior``: every per-node or per-layer latent of the guide, the derived node
        scales and the selected weights, as ``(chain, draw, ...)``."""
        posterior = {}
        for name, values in self.draws.items():
            arr = np.stack(values)
            posterior[name] = arr.reshape(self.num_chains, self.per_chain, *arr.shape[1:])
        return posterior

    def posterior_predictive(self) -> dict[str, np.ndarray]:
        """``posterior_predictive``: a draw of the likelihood site ``"obs"`` per posterior draw."""
        return {"obs": self._chains(self.pp)}

    def log_likelihood(self) -> dict[str, np.ndarray]:
        """``log_likelihood``: each example's log-likelihood under each posterior draw."""
        return {"obs": self._chains(self.ll)}

    def observed_data(self) -> dict[str, np.ndarray]:
        """``observed_data``: the labels of the examples used."""
        return {"obs": self.y.cpu().numpy()}

    def sample_stats(self) -> dict[str, np.ndarray]:
        """``sample_stats``: the log importance ratio of each draw."""
        return {"log_importance_ratio": self._chains(self.log_ratio)}

    def dims_and_coords(
        self, posterior: dict[str, np.ndarray]
    ) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
        """Named dimensions of every variable, and their coordinates: ``"<layer>.node"``,
        ``"<layer>.input"``, ... for the posterior, ``"obs_id"`` for the examples."""
        dims: dict[str, list[str]] = {}
        coords: dict[str, np.ndarray] = {}
        for name, arr in posterior.items():
            d = _dims_for(name, self.site_layer[name], arr.shape[2:])
            dims[name] = d
            for dim, size in zip(d, arr.shape[2:], strict=True):
                coords.setdefault(dim, np.arange(size))
        if self.x is not None:
            # only the example dimension is named: a multi-output likelihood has per-output draws
            # but one log-likelihood per example, and ArviZ names the remaining dimensions itself
            coords["obs_id"] = np.arange(len(self.y))
            dims["obs"] = ["obs_id"]
        return dims, coords

    def attrs(self) -> dict[str, Any]:
        r"""The attributes of every group: how the draws were made, :math:`N`, and with data the
        PSIS :math:`\hat k` of the importance ratios (at least 5 draws: PSIS needs a tail)."""
        bnet = self.bnet
        attrs = {
            "inference_library": "pyro",
            "inference_method": "variational (SVI): independent draws from the guide q, not MCMC",
            "num_data": int(bnet.num_data) if getattr(bnet, "num_data", None) else -1,
        }
        if self.x is not None and self.num_samples >= 5:
            _, khat = self._az.psislw(np.asarray(self.log_ratio, dtype=float))
            attrs["psis_khat"] = float(khat)
            attrs["psis_examples"] = len(self.y)
        return attrs

    def to_inference_data(self):
        """Draw, then the :class:`arviz.InferenceData` of every group (those of the data only
        with data), each group carrying :meth:`attrs`."""
        self.draw()
        posterior = self.posterior()
        dims, coords = self.dims_and_coords(posterior)
        groups: dict[str, Any] = {}
        if self.x is not None:
            groups = {
                "posterior_predictive": self.posterior_predictive(),
                "log_likelihood": self.log_likelihood(),
                "observed_data": self.observed_data(),
                "sample_stats": self.sample_stats(),
            }
        attrs = self.attrs()
        idata = self._az.from_dict(posterior=posterior, coords=coords, dims=dims, **groups)
        for group in idata.groups():
            idata[group].attrs.update(attrs)
        return idata


def _check_bnet(bnet: Any) -> None:
    if not (hasattr(bnet, "bayesian_layers") and hasattr(bnet, "guide") and hasattr(bnet, "model")):
        raise TypeError(
            f"to_arviz expects a BayesianModule (from bp.bayesianize), got {type(bnet).__name__}"
        )


def _weight_layers(
    weights: Sequence[str] | Literal["all"] | None, layers: Sequence[str]
) -> list[str]:
    if weights is None:
        return []
    if isinstance(weights, str):
        if weights == "all":
            return list(layers)
        weights = [weights]
    unknown = [w for w in weights if w not in layers]
    if unknown:
        raise KeyError(
            f"weights names layers that are not Bayesian layers: {unknown}; valid names: "
            f"{list(layers)}"
        )
    return list(weights)


def _dims_for(name: str, path: str, shape: tuple[int, ...]) -> list[str]:
    """Named dimensions of one site's value (without the sample dimension)."""
    if len(shape) == 0:
        return []
    dims = [f"{path}.node"]
    if len(shape) >= 2:
        dims.append(f"{path}.input")
    dims += [f"{path}.{k}" for k in _KERNEL_DIMS[: max(0, len(shape) - 2)]]
    return dims


def _kind(site_name: str, path: str) -> str:
    return site_name[len(path) + 1 :]


def _node_scale(guide_tr: Any, path: str) -> np.ndarray | None:
    r"""The group-horseshoe node scale :math:`\tau\lambda_j = \sqrt{a_j b_j}\sqrt{a b}` of one draw.

    (Unregularised: the regularised :math:`\tilde s_j = c s_j / \sqrt{c^2 + s_j^2}` is monotone in
    :math:`s_j`, so the ranking of nodes and the PIP :math:`P(\tilde s_j > 1/\sqrt{m_j})` read the
    same; see :class:`bayesprune.priors.GroupHorseshoe`.)
    """
    names = [f"{path}.{k}" for k in ("lambda_a", "lambda_b", "tau_a", "tau_b")]
    if not all(n in guide_tr.nodes for n in names):
        return None
    a, b, ta, tb = (guide_tr.nodes[n]["value"] for n in names)
    return torch.sqrt(a * b * ta * tb).detach().float().cpu().numpy()
