r"""The Bayesian network of :func:`bayesprune.bayesianize`: :class:`BayesianModule`, :class:`RegressionPrediction`.

A :class:`BayesianModule` wraps a copy of the user's network whose supported layers are the
Bayesian layers of :mod:`bayesprune.layers`, and holds

* the fast training path (``bnet(x)``: one local-reparameterization forward pass, and ``bnet.kl()``,
  used by :func:`bayesprune.fit`),
* a genuine Pyro model and guide (``bnet.model(x, y)``, ``bnet.guide(x, y)``) whose sample sites are
  named after the module paths (``"1.weight"``, ``"1.gate"``, ``"layer1.0.conv1.lambda_a"``...),
  with the likelihood inside ``pyro.plate("data", N, subsample_size=B)``, so that
  :class:`pyro.infer.Predictive`, :func:`pyro.poutine.trace`, ``Trace_ELBO`` and ArviZ work,
* the posterior summaries the rest of the package consumes (``inclusion_probs``, ``mean_module``,
  ``predict``), see ``ARCHITECTURE.md``.

Build one with :func:`bayesprune.bayesianize`; :meth:`BayesianModule.save` writes it in the format of
:mod:`bayesprune.io`, and :func:`bayesprune.load` reads it back.

Example
-------
>>> import torch
>>> from torch import nn
>>> import bayesprune as bp
>>> bnet = bp.bayesianize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
>>> type(bnet).__name__, sorted(bnet.bayesian_layers)
('BayesianModule', ['0', '2'])
>>> bnet(torch.randn(5, 4), mode="mean").shape
torch.Size([5, 3])
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ._predictive import predictive
from ._utils import param_effect
from .data import input_tensor, label_errors, output_tensor
from .io import FORMAT, write_module
from .layers import BayesianLayer, set_mode
from .priors import Prior

__all__ = ["BayesianModule", "RegressionPrediction"]

#: the training-path estimators of :meth:`BayesianModule.set_reparam` (see :func:`bayesprune.bayesianize`)
REPARAMS = ("local", "shared", "auto")

#: default most rows (examples times draws made together) of one forward pass of
#: :meth:`BayesianModule.predict`, which bounds its memory: draws are batched for batches
#: smaller than this. Larger passes were slower per draw on a CPU for conv nets (their
#: activations leave the caches): ``benchmarks/README.md#svi-speed``
PREDICT_ROWS = 128
#: the same bound on a GPU, where a pass costs its launches more than its rows: 32 draws of a
#: batch of 128 in one pass (``docs/gpu.md``)
PREDICT_ROWS_GPU = 4096


class RegressionPrediction(NamedTuple):
    r"""Posterior predictive of a Gaussian-likelihood model.

    ``variance = epistemic + aleatoric``: ``epistemic`` is the variance of the network's output
    over posterior draws, :math:`\mathrm{Var}_q[f(x)]`; ``aleatoric`` is the noise variance
    :math:`\sigma_n^2`.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    epistemic: torch.Tensor
    aleatoric: torch.Tensor


class BayesianModule(nn.Module):
    """A network with Bayesian layers, its Pyro model and guide, and posterior summaries.

    Build it with :func:`~bayesprune.bayesianize`. ``bnet(x)`` is one stochastic forward pass of
    the fast training path (``mode="sample"``) or the posterior-mean network (``mode="mean"``).

    Attributes
    ----------
    net
        The copied network with Bayesian layers swapped in (module paths unchanged).
    likelihood
        ``"categorical"`` or ``"gaussian"``.
    num_classes
        Output width of the network (classes for ``"categorical"``).
    num_data
        Training-set size :math:`N` of the ELBO's data plate (set by :func:`bayesprune.fit`).
    """

    def __init__(
        self,
        net: nn.Module,
        template: nn.Module,
        priors: Mapping[str, Prior],
        likelihood: str,
        num_classes: int | None,
        noise_scale: float | None,
        gate_after: Mapping[str, str],
    ) -> None:
        super().__init__()
        self.net = net
        #: plain copy of the user's architecture, the skeleton of :meth:`mean_module`
        self._template = [template]  # a list hides it from nn.Module (no params, no state_dict)
        #: whether the template holds the weights of the network given to :func:`~bayesprune.bayesianize`
        #: (False after :func:`~bayesprune.load` of a file saved without them); see :meth:`dense_module`
        self.has_dense_reference = True
        self.priors = dict(priors)
        self.likelihood = likelihood
        self.num_classes = num_classes
        self._num_data: int | None = None
        #: shape of one input example, recorded by :func:`bayesprune.fit` from its first batch, so
        #: that pruning and certifying a conv net need no ``example_input``
        self.input_shape: tuple[int, ...] | None = None
        self.fixed_noise = noise_scale
        self.gate_after = dict(gate_after)
        if likelihood == "gaussian" and noise_scale is None:
            self.log_noise = nn.Parameter(torch.zeros(()))
        else:
            self.log_noise = None
        self._kl_scale = 1.0
        #: whether the layers draw per example (predict), per input shape and estimator
        self._per_example: dict[tuple, bool] = {}

    # -- structure ----------------------------------------------------------------------------
    @property
    def bayesian_layers(self) -> dict[str, BayesianLayer]:
        """Layer path -> Bayesian layer, in module order."""
        return {p: m for p, m in self.net.named_modules() if isinstance(m, BayesianLayer)}

    def __setstate__(self, state: dict) -> None:
        # a module pickled before num_data was a property holds it as a plain attribute
        if "num_data" in state:
            state["_num_data"] = state.pop("num_data")
        super().__setstate__(state)

    @property
    def num_data(self) -> int | None:
        """Training-set size :math:`N` of the ELBO's data plate, ``None`` until set. Setting it
        (``bnet.num_data = N``) is :meth:`set_num_data`: the priors that depend on :math:`N` (the
        default prior's price per example) get it too."""
        return self._num_data

    @num_data.setter
    def num_data(self, value: int | None) -> None:
        if value is None:
            self._num_data = None  # (a prior keeps the N it was given)
        else:
            self.set_num_data(value)

    def set_num_data(self, num_data: int) -> None:
        """Set :attr:`num_data` (the ELBO's :math:`N`) and give every layer its prior for that
        many examples (:meth:`bayesprune.priors.Prior.for_data`); :func:`bayesprune.fit` calls
        it with its training-set size. A training loop of your own calls it before the first
        step when a prior depends on :math:`N` (``bp.priors.default_prior()`` does).

        Example
        -------
        >>> import torch
        >>> import bayesprune as bp
        >>> bnet = bp.bayesianize(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> bnet.set_num_data(1000)
        >>> bnet.priors["0"].num_data
        1000
        """
        if isinstance(num_data, bool) or not isinstance(num_data, numbers.Integral) or num_data < 1:
            raise ValueError(
                f"num_data must be a positive integer (the training-set size), got {num_data!r}"
            )
        num_data = int(num_data)  # (a numpy integer too)
        bound = {path: prior.for_data(num_data) for path, prior in self.priors.items()}
        layers = self.bayesian_layers  # (nothing changes until every prior took N)
        for path, prior in bound.items():
            if prior is not self.priors[path]:
                self.priors[path] = layers[path].prior = prior
        self._num_data = num_data

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def noise_scale(self) -> torch.Tensor | None:
        """Observation noise sd of the Gaussian likelihood (learned or fixed), else ``None``."""
        if self.likelihood != "gaussian":
            return None
        if self.log_noise is not None:
            return torch.exp(self.log_noise)
        return torch.tensor(self.fixed_noise, device=self.device)

    @contextlib.contextmanager
    def mode(self, mode: Literal["sample", "mean", "fixed"]) -> Iterator[BayesianModule]:
        """Context manager switching every Bayesian layer to ``mode``."""
        old = {p: m.mode for p, m in self.bayesian_layers.items()}
        set_mode(self.net, mode)
        try:
            yield self
        finally:
            for p, m in self.bayesian_layers.items():
                m.mode = old[p]

    def forward(
        self, x: torch.Tensor, mode: Literal["sample", "mean"] | None = None
    ) -> torch.Tensor:
        """Network output: one posterior draw (``"sample"``, default) or the posterior mean (``"mean"``)."""
        try:
            if mode is None:
                return self.net(x)
            with self.mode(mode):
                return self.net(x)
        except (RuntimeError, IndexError) as exc:
            # the error may be the user's own: keep it, and add what the inputs were
            if isinstance(exc, torch.OutOfMemoryError) or not torch.is_tensor(x):
                raise
            self._check_batch(x)  # a dtype mismatch: a TypeError that names the fix
            exc.add_note(
                f"bayesprune: {type(self.net).__name__} was run on inputs of shape "
                f"{tuple(x.shape)}; if the error is about that shape, pass inputs of the shape "
                "the wrapped network expects, with the batch first"
            )
            raise
        except (TypeError, AttributeError):
            if not torch.is_tensor(x) and hasattr(x, "__array__"):
                input_tensor(x)  # a NumPy array: a TypeError that names the fix
            raise

    @property
    def reparam(self) -> str:
        """Training-path estimator: ``"local"``, ``"shared"`` or ``"auto"`` (see :func:`~bayesprune.bayesianize`)."""
        return self._reparam

    @property
    def weight_sd(self) -> str:
        """Variational family of the weights' sds: ``"per_weight"`` or ``"rank1"`` (see :func:`~bayesprune.bayesianize`)."""
        return next(iter(self.bayesian_layers.values())).weight_sd

    def set_reparam(self, reparam: Literal["local", "shared", "auto"]) -> None:
        """Switch the training-path estimator of every Bayesian layer (see :func:`~bayesprune.bayesianize`)."""
        if reparam not in REPARAMS:
            raise ValueError(f"reparam must be one of {REPARAMS}, got {reparam!r}")
        self._reparam = reparam
        for layer in self.bayesian_layers.values():
            layer.local_reparam = reparam != "shared"
            layer.exact_draws = reparam == "auto"

    def structure_parameters(self) -> list[nn.Parameter]:
        """Gate logits and shrinkage-scale parameters (the variables that decide which nodes stay),
        as each layer's prior declares them (:meth:`bayesprune.priors.Prior.structure_parameter_names`).

        :func:`bayesprune.fit` gives them their own, larger learning rate: they must travel several
        units in logit / log space, whereas weights move little from their pretrained values.
        """
        return [
            p
            for layer in self.bayesian_layers.values()
            for p in layer.prior.structure_parameters(layer)
        ]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gate logits that each layer's prior declares for natural-gradient steps
        (:meth:`~bayesprune.priors.Prior.natural_gate_names`: those of point-weight spike-and-slab
        layers; a subset of :meth:`structure_parameters`), which :func:`bayesprune.fit` moves
        with :mod:`bayesprune.natural` instead of Adam.

        Gates of layers with Bayesian weights are left to Adam with the other structure
        parameters: there the natural step reaches the mean-field ELBO's coordinate-wise optimum,
        which at the data sizes of ``benchmarks/robustness.py`` is the empty network (each node
        alone is worth less than the KL of its weights), whereas Adam's slow, uniform moves stop
        short of it (``benchmarks/README.md#robustness``, the ``ssghs`` cells; the natural-step
        runs in ``docs/notes/benchmark-history.md``).
        """
        return [
            p
            for layer in self.bayesian_layers.values()
            for n, p in layer.named_parameters(recurse=False)
            if n in layer.prior.natural_gate_names(layer)
        ]

    def kl(self) -> torch.Tensor:
        """Sum of the analytic KL terms of all Bayesian layers."""
        return sum(layer.kl() for layer in self.bayesian_layers.values())

    # -- likelihood ---------------------------------------------------------------------------
    def _check_batch(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Raise a clear error for inputs or targets the wrapped network cannot take.

        Catches what would otherwise surface deep inside torch: inputs of another floating dtype
        than the parameters (NumPy's float64, say) and non-integer class labels.
        """
        input_tensor(x)
        dtype = next(self.parameters()).dtype
        if torch.is_floating_point(x) and x.dtype != dtype:
            raise TypeError(
                f"inputs are {x.dtype} but the network's parameters are {dtype}: convert them "
                f"with x.to({dtype}) (NumPy arrays are float64 by default)"
            )
        if y is not None and self.likelihood == "categorical" and torch.is_floating_point(y):
            raise TypeError(
                f"class labels must be integers (torch.long), got {y.dtype}; convert them with "
                "y.long(), or bayesianize with likelihood='gaussian' for regression"
            )
        if y is not None and self.likelihood == "categorical" and y.dtype != torch.long:
            raise TypeError(
                f"class labels must be torch.long, got {y.dtype}; convert them with y.long()"
            )
        if y is not None and self.likelihood == "categorical" and y.dim() != 1:
            fix = (
                "y.squeeze(1)"
                if y.dim() == 2 and y.shape[1] == 1
                else "y.argmax(1) for one-hot labels"
            )
            raise ValueError(
                "class labels must be a 1-D tensor of class indices, one per example; got shape "
                f"{tuple(y.shape)}: pass {fix}"
            )
        if (
            y is not None
            and self.likelihood == "categorical"
            and y.device.type == "cpu"  # a scan of labels already on the GPU would sync
            and y.numel()
            and int(y.min()) < 0
        ):
            raise ValueError(
                f"class labels must be indices >= 0, got {int(y.min())}"
                + (" (cross-entropy's ignore_index)" if int(y.min()) == -100 else "")
                + ": the ELBO's likelihood cannot skip examples, so they would be fitted on the "
                "prior alone; drop the unlabelled examples from the loader"
            )
        if y is not None and y.dim() >= 1 and x.dim() >= 1 and y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{y.shape[0]} targets for a batch of {x.shape[0]} inputs: each batch needs one "
                "target per example"
            )

    def _output_and_target(
        self, out: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.likelihood == "gaussian" and out.dim() == 2 and out.shape[-1] == 1:
            if y is None or y.dim() == 1:
                out = out.squeeze(-1)
        return out, y

    def log_likelihood(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example log-likelihood of targets ``y`` given network outputs ``out``."""
        out, y = self._output_and_target(output_tensor(out, self.net), y)
        if self.likelihood == "categorical":
            with label_errors(out, y):
                return -F.cross_entropy(out, y, reduction="none")
        if y.shape != out.shape:
            raise ValueError(
                f"regression targets of shape {tuple(y.shape)} do not match the network output "
                f"{tuple(out.shape)}; give y as [batch] for one output or [batch, outputs]"
            )
        ll = dist.Normal(out, self.noise_scale).log_prob(y.to(out.dtype))
        return ll.reshape(ll.shape[0], -1).sum(1)

    # -- Pyro model and guide -----------------------------------------------------------------
    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Generative model: weights from the prior, ``y`` observed in the subsampled data plate.

        The plate's size is ``self.num_data`` (the training-set size, set by :func:`bayesprune.fit`,
        or the batch size when unset), so the minibatch log-likelihood is scaled by ``N / B``. A
        prior that depends on :math:`N` (the default prior's price) raises until it is set.
        """
        with pyro.poutine.scale(scale=self._kl_scale):
            for path, layer in self.bayesian_layers.items():
                layer._fixed = layer.prior.model_sites(layer, path)
        out = self._run_fixed(x)
        batch = x.shape[0]
        n, scale = self.num_data or batch, 1.0
        if batch > n:
            # a subsample cannot outnumber its plate: more examples than the training set (to_arviz
            # or Predictive on a large evaluation set) get the same N / B scale by hand
            n, scale = batch, n / batch
        out, y_ = self._output_and_target(out, y)
        with (
            pyro.poutine.scale(scale=scale),
            pyro.plate("data", n, subsample_size=batch, device=out.device),
        ):
            if self.likelihood == "categorical":
                pyro.sample("obs", dist.Categorical(logits=out), obs=y_)
            else:
                d = dist.Normal(out, self.noise_scale)
                if out.dim() > 1:
                    d = d.to_event(out.dim() - 1)
                pyro.sample("obs", d, obs=None if y_ is None else y_.to(out.dtype))
        return out

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Variational posterior over the same sites (and the ``param`` sites of every parameter)."""
        for name, p in self.named_parameters():
            param_effect(f"bnet.{name}", p)
        with pyro.poutine.scale(scale=self._kl_scale):
            for path, layer in self.bayesian_layers.items():
                layer._fixed = layer.prior.guide_sites(layer, path)

    def _run_fixed(self, x: torch.Tensor) -> torch.Tensor:
        with self.mode("fixed"):
            try:
                return output_tensor(self.net(x), self.net)
            finally:
                for layer in self.bayesian_layers.values():
                    layer._fixed = None

    # -- posterior summaries --------------------------------------------------------------------
    @torch.no_grad()
    def inclusion_probs(self) -> dict[str, torch.Tensor]:
        """Layer path -> posterior inclusion probability per output node (CPU, in [0, 1]).

        Only layers whose prior has node-level inclusion appear: a Gaussian or weight-level
        spike-and-slab prior gives an empty dict (see :meth:`weight_inclusion_probs`).
        """
        out = {}
        for path, layer in self.bayesian_layers.items():
            p = layer.inclusion_probs()
            if p is not None:
                out[path] = p.detach().float().cpu().clamp(0, 1)
        return out

    @torch.no_grad()
    def inclusion_logits(self) -> dict[str, torch.Tensor]:
        """Layer path -> log-odds of inclusion per output node (CPU, float64), the same layers as
        :meth:`inclusion_probs`.

        A PIP of exactly 1.0 (a horseshoe node far above its threshold, after a short fit of a
        pretrained net) still has a finite log-odds, so rankings (``prune(keep=)``,
        ``certify(by="keep")``, the pruner's per-layer floors) order nodes by evidence, not by
        index. Gates that :mod:`bayesprune.gate_tests` left at their bounds tie; a keep fraction
        takes tied nodes in equal shares from every layer
        (:func:`bayesprune.candidates.pip_candidates`).
        """
        out = {}
        for path, layer in self.bayesian_layers.items():
            v = layer.inclusion_logits()
            if v is not None:
                out[path] = v.detach().double().cpu()
        return out

    @torch.no_grad()
    def weight_inclusion_probs(self) -> dict[str, torch.Tensor]:
        """Layer path -> inclusion probability per weight (weight-level spike-and-slab only)."""
        out = {}
        for path, layer in self.bayesian_layers.items():
            p = layer.prior.weight_inclusion_probs(layer)
            if p is not None:
                out[path] = p.detach().float().cpu()
        return out

    @torch.no_grad()
    def mean_module(self, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """A plain copy of the original architecture holding posterior-mean weights.

        For a layer with spike-and-slab gates the weights are the slab means :math:`\\mu` (the
        posterior mean *given inclusion*: the median-probability model keeps a node with its slab
        mean and drops it otherwise); horseshoe node scales are folded in as
        :math:`\\mathbb E_q[\\tilde s_j]\\,\\mu_j` (into the following BatchNorm's affine parameters when
        the gate acts after it). With ``masks`` (layer path -> bool keep vector), masked nodes get
        zero weight rows and bias entries, and zero ``weight``/``bias`` in a directly following
        BatchNorm, so they are identically zero (ARCHITECTURE.md).
        """
        plain = copy.deepcopy(self._template[0]).to(self.device)
        plain.train(self.training)
        layers = self.bayesian_layers
        masks = dict(masks or {})
        unknown = sorted(set(masks) - set(layers))
        if unknown:
            raise KeyError(
                f"masks name layers that are not Bayesian layers of this model: {unknown}; "
                f"valid names: {sorted(layers)}"
            )
        # deterministic parameters and buffers (BatchNorm, skipped layers) by their shared names
        own = self.net.state_dict()
        target = plain.state_dict()
        for k in target:
            if k in own:
                target[k] = own[k].detach().clone()
        plain.load_state_dict(target)
        modules = dict(plain.named_modules())
        for path, layer in layers.items():
            w, b, mult = layer.mean_weights()
            dst = modules[path]
            bn = modules[self.gate_after[path]] if path in self.gate_after else None
            if mult is not None:
                if bn is not None:
                    if bn.weight is not None:
                        bn.weight.mul_(mult)
                        bn.bias.mul_(mult)
                else:
                    w, b = layer.fold_multiplier(w, b, mult)
            if path in masks:
                keep = torch.as_tensor(masks[path], dtype=torch.bool, device=w.device)
                if keep.shape != (w.shape[0],):
                    raise ValueError(
                        f"mask of layer {path!r} has shape {tuple(keep.shape)}; it needs one entry per "
                        f"output node, shape ({w.shape[0]},)"
                    )
                w[~keep] = 0  # w and b are the layer's fresh copies, node-first
                if b is not None:
                    b[~keep] = 0
            # the plain layer's own layout (a registered family may keep its nodes on another
            # axis; an attention head is slices of several tensors)
            layer.write_plain(dst, w, b)
            if path in masks:
                if bn is not None and bn.weight is not None:
                    bn.weight[~keep] = 0
                    bn.bias[~keep] = 0
                elif bn is not None and bn.running_mean is not None:  # affine=False
                    bn.running_mean[~keep] = 0
        return plain

    def dense_module(self) -> nn.Module:
        """The dense network given to :func:`~bayesprune.bayesianize`, with the weights it had then (eval mode).

        It is the default reference of :func:`bayesprune.conformal.certify` ("how much worse may the
        pruned network be than the dense one"), and :meth:`save` stores it, so that :func:`~bayesprune.load`
        gives it back. If the network was untrained when it was wrapped, this is that untrained
        network: certify against ``reference="predictive"`` or your own trained net instead.

        Raises
        ------
        ValueError
            This module was loaded from a file saved without the dense weights.
        """
        if not self.has_dense_reference:
            raise ValueError(
                "this BayesianModule was loaded from a file saved without the dense network's "
                "weights (saved by an older bayesprune); pass your trained dense network as the "
                "reference (certify(bnet, cal, reference=dense_net)) or use reference='predictive'"
            )
        return copy.deepcopy(self._template[0]).to(self.device).eval()

    @torch.no_grad()
    def predict(
        self,
        x: torch.Tensor | Iterable,
        num_samples: int = 32,
        *,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        r"""Posterior predictive: mean class probabilities (categorical) or mean output (gaussian).

        In each of the ``num_samples`` draws every example sees an exact posterior draw: gates and
        scales drawn per example, the weights of a ``Linear`` layer by local reparameterization,
        and those of a convolution (or of a ``Linear`` layer applied to a sequence) once per pass,
        since all positions of one example share them, whatever the training estimator
        (``reparam``). BatchNorm uses its running statistics (eval mode, restored afterwards).

        Where every Bayesian layer draws independently per example
        (:meth:`~bayesprune.layers.BayesianLayer.draws_per_example`: the default point-weight
        spike-and-slab, and Gaussian weights of ``Linear`` layers), the draws are made in one
        batched pass: the batch repeated ``num_samples`` times along its first axis is ``S``
        independent draws for each example. Otherwise (weights drawn once per pass) each draw is
        its own pass. Either way, no pass reads more than ``batch_size`` rows (examples times the
        draws made together; default :data:`PREDICT_ROWS` on a CPU, :data:`PREDICT_ROWS_GPU` on a
        GPU): a large ``x`` goes through in chunks, so memory stays bounded whatever its size.

        ``x`` is a batch of inputs; or one batch of a loader, a list or tuple ``(x, y)`` or
        ``(x,)`` (its inputs are used, the labels ignored); or an iterable of such batches (a
        ``DataLoader``, a list of ``(x, y)`` pairs, a generator), whose predictions are
        concatenated: a calibration set too large for the device streams through it. Inputs go
        to the module's device one chunk at a time.

        With a ``seed``, each pass is instead one whole posterior draw from the guide, shared by
        every example and the same on every call with that seed: the predictive
        :math:`\hat p(y \mid x) = \frac1S \sum_{s=1}^S p(y \mid x, \theta_s)` is then a fixed
        function of ``x``, whatever batch ``x`` comes in. The conformal layer needs that: draws
        shared within a batch but renewed between batches make calibration and test scores
        dependent in a way that breaks their exchangeability, and with it the coverage guarantee.

        >>> import torch
        >>> from torch import nn
        >>> from bayesprune import bayesianize
        >>> bnet = bayesianize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
        >>> x = torch.randn(6, 4)
        >>> p = bnet.predict(x, num_samples=4, seed=0)
        >>> torch.allclose(p[:2], bnet.predict(x[:2], num_samples=4, seed=0))
        True
        >>> bnet.predict([(x[:4],), (x[4:],)], num_samples=64, batch_size=32).shape
        torch.Size([6, 3])
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        return self._predictive(x, num_samples, seed, batch_size, self._mean_prediction)

    def _mean_prediction(self, outs: torch.Tensor) -> torch.Tensor:
        if self.likelihood == "categorical":
            return torch.softmax(outs, -1).mean(0)
        return self._output_and_target(outs.mean(0), None)[0]

    def _regression(self, outs: torch.Tensor) -> RegressionPrediction:
        outs = torch.stack([self._output_and_target(o, None)[0] for o in outs])
        mean, epi = outs.mean(0), outs.var(0)
        alea = self.noise_scale.detach() ** 2 * torch.ones_like(mean)
        return RegressionPrediction(mean, epi + alea, epi, alea)

    @torch.no_grad()
    def predict_regression(
        self,
        x: torch.Tensor | Iterable,
        num_samples: int = 32,
        *,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> RegressionPrediction:
        """Predictive mean and variance of a Gaussian-likelihood model, epistemic part separated.

        ``x``, ``seed`` and ``batch_size`` as in :meth:`predict`."""
        if self.likelihood != "gaussian":
            raise ValueError(
                "predict_regression needs likelihood='gaussian'; use predict() for class probabilities"
            )
        if num_samples < 2:
            raise ValueError("num_samples must be at least 2 to estimate the epistemic variance")
        return self._predictive(x, num_samples, seed, batch_size, self._regression)

    def _predictive(self, x, num_samples: int, seed: int | None, batch_size: int | None, reduce):
        """:func:`bayesprune._predictive.predictive` with ``predict``'s default rows per pass."""
        rows = batch_size
        if rows is None:
            rows = PREDICT_ROWS_GPU if self.device.type == "cuda" else PREDICT_ROWS
        return predictive(self, x, num_samples, seed, rows, reduce)

    def _frozen_pass(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """One forward pass with a whole posterior draw from the guide, reproducible from ``seed``
        (the global RNG is left as it was)."""
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            # only the generators forked here: torch.manual_seed would reseed every CUDA device
            torch.random.default_generator.manual_seed(seed)
            for d in devices:
                with torch.cuda.device(d):
                    torch.cuda.manual_seed(seed)
            for path, layer in self.bayesian_layers.items():
                layer._fixed = layer.prior.guide_sites(layer, path)
        return self._run_fixed(x)

    # -- persistence ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What :func:`~bayesprune.load` needs, besides the plain architecture, to rebuild this module."""
        return {
            "format": FORMAT,
            "priors": {p: prior.to_dict() for p, prior in self.priors.items()},
            "likelihood": self.likelihood,
            "num_classes": self.num_classes,
            "num_data": self.num_data,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "noise_scale": self.fixed_noise,
            "reparam": self.reparam,
            "weight_sd": self.weight_sd,
            "dense_reference": self.has_dense_reference,
        }

    def save(self, path: str | Path) -> None:
        """Save the variational parameters and config to a ``.safetensors`` file (no pickle).

        Rebuild with ``bp.load(path, net)`` where ``net`` is a plain network of the same
        architecture (e.g. ``lenet_300_100()``); its weights are not used. The file also holds the
        weights of the dense network the module was built from (:meth:`dense_module`), under keys
        starting with ``dense_reference/``. The write is atomic (:mod:`bayesprune.files`); the
        format is that of :mod:`bayesprune.io`.
        """
        write_module(self, path)

    def extra_repr(self) -> str:
        return f"likelihood={self.likelihood!r}, num_data={self.num_data}"
