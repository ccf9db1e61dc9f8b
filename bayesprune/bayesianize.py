r"""Turning a plain ``nn.Module`` into a Bayesian one: :func:`bayesianize`, :class:`BayesianModule`, :func:`load`.

:func:`bayesianize` deep-copies the user's network (the original is never mutated), swaps its
supported layers for the Bayesian layers of :mod:`bayesprune.layers` (posterior means initialised
from the trained weights), and wraps the result in a :class:`BayesianModule`, which holds

* the fast training path (``bnet(x)``: one local-reparameterization forward pass, and ``bnet.kl()``,
  used by :func:`bayesprune.fit`),
* a genuine Pyro model and guide (``bnet.model(x, y)``, ``bnet.guide(x, y)``) whose sample sites are
  named after the module paths (``"1.weight"``, ``"1.gate"``, ``"layer1.0.conv1.lambda_a"``...),
  with the likelihood inside ``pyro.plate("data", N, subsample_size=B)``, so that
  :class:`pyro.infer.Predictive`, :func:`pyro.poutine.trace`, ``Trace_ELBO`` and ArviZ work,
* the posterior summaries the rest of the package consumes (``inclusion_probs``, ``mean_module``,
  ``predict``), see ``ARCHITECTURE.md``.

Layer coverage
--------------
=====================================================  ==============================================
layer type                                             treatment
=====================================================  ==============================================
``nn.Linear``                                          Bayesian (node = output feature)
``nn.Conv1d``                                          Bayesian (node = output channel)
``nn.Conv2d``                                          Bayesian (node = filter); any stride, padding,
                                                       dilation, groups, padding mode
``nn.BatchNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm``  deterministic, parameters learned as point
                                                       estimates; a gate acts after a BatchNorm that
                                                       directly follows its layer (and after a
                                                       ``nn.ReLU``/``LeakyReLU`` used only there)
activations, pooling, ``Flatten``, ``Dropout``         deterministic, no parameters
other layers with parameters (``Conv3d``,              stay deterministic (point estimates) with a
``ConvTranspose*``, ``Embedding``, RNNs,               warning naming them; naming one in ``layers=``
``MultiheadAttention``, subclasses of Linear/Conv...)  is an error
=====================================================  ==============================================

Each row is exercised by a test in ``tests/test_bayesianize.py``.

Example
-------
>>> import torch
>>> import bayesprune as bp
>>> from bayesprune.models import lenet_300_100
>>> bnet = bp.bayesianize(lenet_300_100(in_features=64), prior=bp.priors.SpikeAndSlab(level="node"))
>>> sorted(bnet.inclusion_probs())
['1', '3', '5']
>>> bnet.predict(torch.randn(2, 64), num_samples=4).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ._utils import check_seed, modes_kept, param_effect, resolve_device, with_versions
from .data import input_errors, input_tensor, label_errors, output_tensor
from .files import atomic_write, check_target
from .layers import INIT_SCALE, WEIGHT_SD_FAMILIES, BayesianLayer, bayesian_layer_for, set_mode
from .priors import Prior, SpikeAndSlab, prior_from_dict

__all__ = ["BayesianModule", "RegressionPrediction", "bayesianize", "load"]

_FORMAT = "bayesprune.BayesianModule/1"
#: key prefix of the dense network's weights in a saved BayesianModule
_DENSE_KEY = "dense_reference/"
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LIKELIHOODS = ("categorical", "gaussian")
_REPARAMS = ("local", "shared", "auto")


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


class _GateAfter:
    """BatchNorm forward hook: multiply the BatchNorm's output by the preceding layer's node multiplier."""

    def __init__(self, layer: BayesianLayer) -> None:
        self.layer = layer

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        mult = self.layer._mult
        return output if mult is None else self.layer.apply_multiplier(output, mult)


def _gate_points(
    net: nn.Module, paths: Iterable[str]
) -> tuple[dict[str, str], dict[str, str], bool]:
    r"""Where each layer's node multiplier acts, found with :mod:`torch.fx`.

    Returns ``(bn, act, traced)``: layer path -> a BatchNorm that alone consumes its output, and
    layer path -> a ReLU / LeakyReLU module that alone consumes the output of the layer (or of
    that BatchNorm) and is called nowhere else. The multiplier acts after the last of these. For
    a multiplier :math:`m \ge 0` and a positively homogeneous activation,
    :math:`\mathrm{relu}(m a) = m\,\mathrm{relu}(a)`, so the forward value is the same, but a gate
    after the ReLU gets a gradient when it is 0 (before the ReLU it would sit on the kink, where the
    derivative is 0 and a dropped node could never tell the loss it is needed).
    """
    paths = set(paths)
    modules = dict(net.named_modules())
    found = []
    # both modes' graphs (fx bakes `if self.training` in): a point holds only if it holds in both,
    # the rule bayesprune.prune applies to BatchNorms
    for training in (False, True):
        with modes_kept(net):
            net.train(training)
            try:
                gm = torch.fx.symbolic_trace(net)
            except Exception:  # any tracing failure: fall back to gating at the layer output
                return {}, {}, False
        found.append(_gate_points_in(gm, modules, paths))
    bn: dict[str, str] = {}
    act: dict[str, str] = {}
    agreed_bn: dict[str, str | None] = {}
    for k in paths:
        # the points of every graph that runs the layer (one graph: LayerDrop skips it in
        # training, or an auxiliary head runs only there) must agree: the BatchNorm on its own,
        # the activation only where the BatchNorm before it agrees too
        runs = [(b, a) for b, a, called in found if k in called]
        bns, acts = {b.get(k) for b, _ in runs}, {a.get(k) for _, a in runs}
        if len(bns) != 1:
            continue
        agreed_bn[k] = next(iter(bns))
        if agreed_bn[k] is not None:
            bn[k] = agreed_bn[k]
        if len(acts) == 1 and None not in acts:
            act[k] = next(iter(acts))
    # a module that would be the gate point of two layers (one per mode) is nobody's
    for points in (bn, act):
        claimed: dict[str, int] = {}
        for v in points.values():
            claimed[v] = claimed.get(v, 0) + 1
        for k in [k for k, v in points.items() if claimed[v] > 1]:
            del points[k]
    act = {k: v for k, v in act.items() if bn.get(k) == agreed_bn[k]}
    return bn, act, True


def _gate_points_in(
    gm: torch.fx.GraphModule, modules: dict[str, nn.Module], paths: set[str]
) -> tuple[dict[str, str], dict[str, str], set[str]]:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def sole_module_user(node, types):
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            if isinstance(modules.get(users[0].target), types) and calls[users[0].target] == 1:
                return users[0]
        return None

    bn: dict[str, str] = {}
    act: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in paths:
            continue
        cur = node
        user = sole_module_user(cur, _BN_TYPES)
        if user is not None:
            bn[node.target] = user.target
            cur = user
        user = sole_module_user(cur, (nn.ReLU, nn.LeakyReLU))
        if user is not None:
            act[node.target] = user.target
    return bn, act, set(calls)


def _unsupported_with_params(module: nn.Module) -> bool:
    """A non-container module holding parameters of its own that we cannot make Bayesian."""
    if isinstance(module, _NORM_TYPES) or bayesian_layer_for(module) is not None:
        return False
    return any(True for _ in module.parameters(recurse=False))


class BayesianModule(nn.Module):
    """A network with Bayesian layers, its Pyro model and guide, and posterior summaries.

    Build it with :func:`bayesianize`. ``bnet(x)`` is one stochastic forward pass of the fast
    training path (``mode="sample"``) or the posterior-mean network (``mode="mean"``).

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
        #: whether the template holds the weights of the network given to :func:`bayesianize`
        #: (False after :func:`load` of a file saved without them); see :meth:`dense_module`
        self.has_dense_reference = True
        self.priors = dict(priors)
        self.likelihood = likelihood
        self.num_classes = num_classes
        self.num_data: int | None = None
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

    # -- structure ----------------------------------------------------------------------------
    @property
    def bayesian_layers(self) -> dict[str, BayesianLayer]:
        """Layer path -> Bayesian layer, in module order."""
        return {p: m for p, m in self.net.named_modules() if isinstance(m, BayesianLayer)}

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
        """Training-path estimator: ``"local"``, ``"shared"`` or ``"auto"`` (see :func:`bayesianize`)."""
        return self._reparam

    @property
    def weight_sd(self) -> str:
        """Variational family of the weights' sds: ``"per_weight"`` or ``"rank1"`` (see :func:`bayesianize`)."""
        return next(iter(self.bayesian_layers.values())).weight_sd

    def set_reparam(self, reparam: Literal["local", "shared", "auto"]) -> None:
        """Switch the training-path estimator of every Bayesian layer (see :func:`bayesianize`)."""
        if reparam not in _REPARAMS:
            raise ValueError(f"reparam must be one of {_REPARAMS}, got {reparam!r}")
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
        """The gate logits of layers with point weights (a subset of
        :meth:`structure_parameters`), which :func:`bayesprune.fit` moves with natural-gradient
        steps (:mod:`bayesprune.natural`).

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
            if layer.prior.point_weights
            for n, p in layer.named_parameters(recurse=False)
            if n == "gate_logit"
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
        or the batch size when unset), so the minibatch log-likelihood is scaled by ``N / B``.
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
        index.
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
                    w = w * mult.view(-1, *([1] * (w.dim() - 1)))
                    b = None if b is None else b * mult
            dst.weight.copy_(w)
            if b is not None:
                dst.bias.copy_(b)
            if path in masks:
                keep = torch.as_tensor(masks[path], dtype=torch.bool, device=w.device)
                if keep.shape != (w.shape[0],):
                    raise ValueError(
                        f"mask of layer {path!r} has shape {tuple(keep.shape)}; it needs one entry per "
                        f"output node, shape ({w.shape[0]},)"
                    )
                dst.weight[~keep] = 0
                if dst.bias is not None:
                    dst.bias[~keep] = 0
                if bn is not None and bn.weight is not None:
                    bn.weight[~keep] = 0
                    bn.bias[~keep] = 0
                elif bn is not None and bn.running_mean is not None:  # affine=False
                    bn.running_mean[~keep] = 0
        return plain

    def dense_module(self) -> nn.Module:
        """The dense network given to :func:`bayesianize`, with the weights it had then (eval mode).

        It is the default reference of :func:`bayesprune.conformal.certify` ("how much worse may the
        pruned network be than the dense one"), and :meth:`save` stores it, so that :func:`load`
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
        self, x: torch.Tensor, num_samples: int = 32, *, seed: int | None = None
    ) -> torch.Tensor:
        r"""Posterior predictive: mean class probabilities (categorical) or mean output (gaussian).

        In each of the ``num_samples`` passes every example sees an exact posterior draw: gates and
        scales drawn per example, the weights of a ``Linear`` layer by local reparameterization,
        and those of a convolution (or of a ``Linear`` layer applied to a sequence) once per pass,
        since all positions of one example share them, whatever the training estimator
        (``reparam``). BatchNorm uses its running statistics (eval mode, restored afterwards).

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
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        outs = self._sample_outputs(x, num_samples, seed)
        if self.likelihood == "categorical":
            return torch.softmax(outs, -1).mean(0)
        return self._output_and_target(outs.mean(0), None)[0]

    @torch.no_grad()
    def predict_regression(
        self, x: torch.Tensor, num_samples: int = 32, *, seed: int | None = None
    ) -> RegressionPrediction:
        """Predictive mean and variance of a Gaussian-likelihood model, epistemic part separated.

        ``seed`` fixes the posterior draws as in :meth:`predict`."""
        if self.likelihood != "gaussian":
            raise ValueError(
                "predict_regression needs likelihood='gaussian'; use predict() for class probabilities"
            )
        if num_samples < 2:
            raise ValueError("num_samples must be at least 2 to estimate the epistemic variance")
        outs = self._sample_outputs(x, num_samples, seed)
        outs = torch.stack([self._output_and_target(o, None)[0] for o in outs])
        mean, epi = outs.mean(0), outs.var(0)
        alea = self.noise_scale.detach() ** 2 * torch.ones_like(mean)
        return RegressionPrediction(mean, epi + alea, epi, alea)

    def _sample_outputs(
        self, x: torch.Tensor, num_samples: int, seed: int | None = None
    ) -> torch.Tensor:
        exact = {layer: layer.exact_draws for layer in self.bayesian_layers.values()}
        for layer in exact:
            layer.exact_draws = True
        try:
            with modes_kept(self):
                self.eval()
                self._check_batch(x)
                x = x.to(self.device)
                fix = "inputs of the shape the wrapped network expects, with the batch first"
                with (
                    self.mode("sample"),
                    input_errors(type(self.net).__name__, "inputs", x.shape, fix),
                ):
                    if seed is None:
                        return torch.stack(
                            [output_tensor(self.net(x), self.net) for _ in range(num_samples)]
                        )
                    return torch.stack(
                        [self._frozen_pass(x, s) for s in _draw_seeds(seed, num_samples)]
                    )
        finally:
            for layer, value in exact.items():
                layer.exact_draws = value

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
        """What :func:`load` needs, besides the plain architecture, to rebuild this module."""
        return {
            "format": _FORMAT,
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
        starting with ``dense_reference/``. The write is atomic (:mod:`bayesprune.files`).
        """
        from safetensors.torch import save_file

        check_target(path)
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        if self.has_dense_reference:
            dense = self._template[0].state_dict()
            state.update({_DENSE_KEY + k: v.detach().cpu().clone() for k, v in dense.items()})
        meta = {"bayesprune": json.dumps(self.config())}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))

    def extra_repr(self) -> str:
        return f"likelihood={self.likelihood!r}, num_data={self.num_data}"


def load(
    path: str | Path, net: nn.Module, device: str | torch.device | None = None
) -> BayesianModule:
    """Load a :class:`BayesianModule` saved by :meth:`BayesianModule.save`.

    Parameters
    ----------
    path
        The ``.safetensors`` file.
    net
        A plain network of the same architecture (the file holds parameters, not code), e.g. the
        builder call that made the original: ``bp.load("bnet.safetensors", lenet_300_100())``.
    device
        Where to put the result (default CPU).

    Example
    -------
    >>> import tempfile, os, torch
    >>> import bayesprune as bp
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> bnet = bp.bayesianize(net)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     bnet.save(os.path.join(d, "b.safetensors"))
    ...     back = bp.load(os.path.join(d, "b.safetensors"), net)
    >>> torch.equal(back.net[0].weight_loc, bnet.net[0].weight_loc)
    True
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved BayesianModule at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc
    if "bayesprune" not in meta:
        raise ValueError(
            f"{path} is not a bayesprune BayesianModule file (no 'bayesprune' metadata)"
        )
    cfg = json.loads(meta["bayesprune"])
    if cfg.get("format") != _FORMAT:
        raise ValueError(f"{path} has format {cfg.get('format')!r}; this version reads {_FORMAT!r}")
    priors = {p: prior_from_dict(spec) for p, spec in cfg["priors"].items()}
    mismatch = f"the network passed to load does not match the architecture saved in {path}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            bnet = bayesianize(
                net,
                prior=priors,
                likelihood=cfg["likelihood"],
                noise_scale=cfg["noise_scale"],
                num_classes=cfg["num_classes"],
                reparam=cfg.get("reparam", "local"),
                weight_sd=cfg.get("weight_sd", "per_weight"),
            )
        except (TypeError, KeyError, ValueError) as exc:
            msg = exc.args[0] if exc.args else exc
            raise ValueError(
                f"{mismatch}: the file holds Bayesian layers {sorted(priors)}, and for this "
                f"network {msg}. Pass the same architecture that was saved (e.g. the same "
                "builder call)"
            ) from None
    state = load_file(str(path))
    dense_state = {k[len(_DENSE_KEY) :]: v for k, v in state.items() if k.startswith(_DENSE_KEY)}
    state = {k: v for k, v in state.items() if not k.startswith(_DENSE_KEY)}
    missing = [k for k in bnet.state_dict() if k not in state]
    if missing and all(k.endswith(".hs_reference") for k in missing):
        raise ValueError(
            f"{path} was saved by a bayesprune version whose group-horseshoe layers had no "
            "'hs_reference' (the initial node scale that their inclusion probabilities are "
            "measured against) and it cannot be recovered from the file: fit the network again"
        )
    try:
        bnet.load_state_dict(with_versions(state, bnet))
    except RuntimeError as exc:
        detail = "; ".join(
            line.strip() for line in str(exc).splitlines()[1:4] if line.strip()
        )  # the first differences, on one line
        raise ValueError(f"{mismatch}: {detail}") from None
    if cfg.get("dense_reference") and dense_state:
        template = bnet._template[0]
        try:
            template.load_state_dict(with_versions(dense_state, template))
        except RuntimeError as exc:
            raise ValueError(
                f"the dense weights saved in {path} do not fit the network passed to load: {exc}"
            ) from None
    else:  # saved before the dense weights were stored: the template holds net's weights
        bnet.has_dense_reference = False
    bnet.num_data = cfg["num_data"]
    shape = cfg.get("input_shape")  # files saved before it was recorded have none
    bnet.input_shape = None if shape is None else tuple(shape)
    return bnet.to(resolve_device(device))


def _draw_seeds(seed: int, num_samples: int) -> list[int]:
    """``num_samples`` seeds derived from ``seed``: the posterior draws of ``predict(seed=...)``."""
    gen = torch.Generator().manual_seed(check_seed(seed))
    return torch.randint(2**62, (num_samples,), generator=gen).tolist()


def _check_plain_float32(net: nn.Module) -> None:
    """A ``TypeError`` unless every floating parameter and buffer of ``net`` is float32."""
    tensors = [*net.parameters(), *net.buffers()]
    found = {t.dtype for t in tensors if t.is_floating_point()} - {torch.float32}
    if found:
        raise TypeError(
            f"bayesianize fits float32 networks, and {type(net).__name__} holds "
            f"{', '.join(sorted(str(d) for d in found))} tensors; convert it with net.float() "
            "(and feed float32 inputs)"
        )


def _check_untied(net: nn.Module, modules: Mapping[str, nn.Module], chosen: Iterable[str]) -> None:
    """A ``ValueError`` when a layer to be made Bayesian is registered under two names, or shares
    a parameter with another module (tied weights): each name would get its own posterior of one
    set of weights (or one of them none), and :meth:`BayesianModule.mean_module`, ``prune`` and
    ``certify`` would re-tie them, so the exported net would differ from the fitted one."""
    aliases: dict[int, list[str]] = {}
    for name, m in net.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(name)
    owners: dict[int, list[str]] = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for n in chosen:
        names = aliases[id(modules[n])]
        if len(names) > 1:
            raise ValueError(
                f"layer {n!r} is registered under {len(names)} names {names} (one module, two "
                "attributes); bayesianize would give it a posterior under one name only. Register "
                "it once and call it wherever it is used, or keep it deterministic with "
                f"skip=[{n!r}]"
            )
        for pname, p in modules[n].named_parameters(recurse=False):
            tied = [o for o in owners[id(p)] if o != (f"{n}.{pname}" if n else pname)]
            if tied:
                raise ValueError(
                    f"parameter {pname!r} of layer {n!r} is shared with {tied} (tied weights), "
                    "which bayesprune does not support: each layer would get its own posterior of "
                    "the same weights. Untie them (layer.weight = "
                    f"nn.Parameter(layer.weight.detach().clone())) or keep layer {n!r} and the "
                    f"layers it shares with deterministic with skip=[{n!r}, ...]"
                )


def _infer_num_classes(net: nn.Module) -> int | None:
    """Output width of ``net``: the layer that computes its output when torch.fx can trace it
    (modules may be registered in any order: a head defined before the body), else the last
    Linear/Conv registered."""
    try:
        graph = torch.fx.symbolic_trace(net).graph
    except Exception:  # untraceable: registration order
        graph = None
    if graph is not None:
        modules = dict(net.named_modules())
        node = next((n.args[0] for n in graph.nodes if n.op == "output"), None)
        for _ in range(16):  # back through flatten / view / activations to the producing layer
            if not isinstance(node, torch.fx.Node):
                break
            if node.op == "call_module":
                m = modules.get(str(node.target))
                if isinstance(m, nn.Linear):
                    return m.out_features
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    return m.out_channels
            node = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
    last = None
    for m in net.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            last = m.out_channels
    return last


def bayesianize(
    net: nn.Module,
    prior: Prior | Mapping[str, Prior] | None = None,
    layers: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    likelihood: Literal["categorical", "gaussian"] = "categorical",
    *,
    noise_scale: float | None = None,
    init_scale: float = INIT_SCALE,
    num_classes: int | None = None,
    reparam: Literal["local", "shared", "auto"] = "local",
    weight_sd: Literal["per_weight", "rank1"] = "per_weight",
) -> BayesianModule:
    r"""Make the ``Linear`` / ``Conv1d`` / ``Conv2d`` layers of ``net`` Bayesian.

    Parameters
    ----------
    net
        Any ``nn.Module`` (Sequential or not, residual nets included). It is deep-copied and never
        modified; posterior means start at its weights (so a pretrained net starts near its accuracy).
    prior
        A :mod:`bayesprune.priors` object for every Bayesian layer (default
        ``SpikeAndSlab(level="node")``), or a dict layer path -> prior (its keys are then the
        Bayesian layers unless ``layers`` is given).
    layers
        Paths (``net.named_modules()`` names) of the layers to make Bayesian; default all supported.
    skip
        Paths to leave deterministic.
    likelihood
        ``"categorical"`` (outputs are logits) or ``"gaussian"`` (regression).
    noise_scale
        Fixed observation-noise sd of the Gaussian likelihood; ``None`` learns it (point estimate).
    init_scale
        Initial posterior sd relative to the layer's weight RMS.
    num_classes
        Output width; inferred from the last Linear/Conv layer when omitted.
    reparam
        Training-path estimator of the expected log-likelihood; switch later with
        :meth:`BayesianModule.set_reparam`.

        * ``"local"``: local reparameterization (Kingma, Salimans and Welling 2015), one noise
          draw per pre-activation, two matmuls / convolutions per layer. For a ``Linear`` layer
          it is unbiased for the ELBO, with the lowest variance. For a convolution it is an
          approximation: all positions of one example share one weight draw under :math:`q`,
          and independent noise per position keeps each output's marginal law but drops their
          correlation, so the objective is not exactly the ELBO.
        * ``"shared"``: one weight draw per minibatch (Bayes by Backprop), unbiased for every
          layer type: the deterministic net's matmul cost plus one draw of the weights. Node
          gates and scales are still drawn per example, as under ``"local"``.
        * ``"auto"``: local reparameterization where it is exact (a ``Linear`` layer reading one
          vector per example), one weight draw per minibatch elsewhere (convolutions, ``Linear``
          layers applied to sequences). Unbiased everywhere, and the cheaper estimator for each:
          a convolution has far more pre-activations per batch than weights, an MLP's layer
          fewer.
    weight_sd
        Variational family of the base weights' standard deviations. ``"per_weight"`` (mean
        field): one free :math:`\sigma_{ji}` per weight. ``"rank1"``: :math:`\sigma_{ji} = e^{a_j}
        e^{b_i}`, one factor per node :math:`j` and one per input position :math:`i` (shared by
        the layer's nodes), so a layer has about as many variational parameters as weights. With
        local reparameterization the output variance is then
        :math:`e^{2a_j}\,\mathrm{op}(x^2, e^{2b})`: one single-output matmul / convolution instead
        of a second full-width one, the step's main cost. Weight-level spike-and-slab needs the
        full variance matrix and gains no speed from it.

    Raises
    ------
    KeyError
        A name in ``layers`` / ``skip`` / the prior dict is not a module of ``net``.
    TypeError
        ``net`` is not a module, a prior is not a prior, or a requested layer has an unsupported type.
    ValueError
        No supported layer is left to make Bayesian, or the likelihood is unknown.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"bayesianize expects a torch.nn.Module, got {type(net).__name__}")
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
    if noise_scale is not None and not (isinstance(noise_scale, (int, float)) and noise_scale > 0):
        raise ValueError(f"noise_scale must be a positive number or None, got {noise_scale!r}")
    if reparam not in _REPARAMS:
        raise ValueError(f"reparam must be one of {_REPARAMS}, got {reparam!r}")
    if init_scale <= 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    if weight_sd not in WEIGHT_SD_FAMILIES:
        raise ValueError(
            f"weight_sd must be one of {WEIGHT_SD_FAMILIES} (one sd per weight, or rank one: "
            f"node factor x input factor), got {weight_sd!r}"
        )
    if prior is None:
        prior = SpikeAndSlab(level="node")
    per_layer = dict(prior) if isinstance(prior, Mapping) else None
    for p in per_layer.values() if per_layer is not None else [prior]:
        if not isinstance(p, Prior):
            raise TypeError(
                f"prior must be a bayesprune.priors object such as bp.priors.SpikeAndSlab(), got {p!r}"
            )
    modules = dict(net.named_modules())
    if any(isinstance(m, BayesianLayer) for m in modules.values()):
        raise TypeError("net already contains Bayesian layers; pass the plain network")

    def check_names(names: Iterable[str], what: str) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        bad = [n for n in names if n not in modules]
        if bad:
            supported = [n for n, m in modules.items() if bayesian_layer_for(m) is not None]
            raise KeyError(
                f"{what} names modules that are not in the network: {bad}; "
                f"layers that can be made Bayesian: {supported}"
            )
        return names

    skip_set = set(check_names(skip, "skip")) if skip is not None else set()
    source = "layers="
    if layers is None and per_layer is not None:
        layers, source = list(per_layer), "the prior dict"
    if layers is not None:
        requested = check_names(layers, "layers" if source == "layers=" else "prior")
        for n in requested:
            if bayesian_layer_for(modules[n]) is None:
                raise TypeError(
                    f"layer {n!r} is a {type(modules[n]).__name__}; bayesprune makes only nn.Linear, "
                    f"nn.Conv1d and nn.Conv2d Bayesian. Leave it out of {source} (it then stays "
                    "deterministic)"
                )
        chosen = [n for n in requested if n not in skip_set]
    else:
        chosen = [
            n for n, m in modules.items() if bayesian_layer_for(m) is not None and n not in skip_set
        ]
        # one warning for all of them, each with the parameters it holds itself: a container
        # such as a transformer encoder may hold one (a position embedding) while the Linear
        # layers inside it do become Bayesian
        kept = {
            n: [p for p, _ in m.named_parameters(recurse=False)]
            for n, m in modules.items()
            if n and _unsupported_with_params(m) and n not in skip_set
        }
        if kept:
            shown = ", ".join(
                f"{n!r} ({type(modules[n]).__name__}: {', '.join(ps)})"
                for n, ps in list(kept.items())[:8]
            )
            more = f" and {len(kept) - 8} more" if len(kept) > 8 else ""
            names = list(kept) if len(kept) <= 8 else "[their names]"
            warnings.warn(
                "bayesianize makes only nn.Linear, nn.Conv1d and nn.Conv2d Bayesian; these modules "
                "hold parameters of their own, which stay deterministic (learned as point "
                f"estimates): {shown}{more}. Pass skip={names} to silence this warning",
                UserWarning,
                stacklevel=2,
            )
    if per_layer is not None:
        check_names(per_layer, "prior")
        missing = [n for n in chosen if n not in per_layer]
        if missing:
            raise KeyError(f"the prior dict has no prior for Bayesian layers {missing}")
    if not chosen:
        raise ValueError(
            "no layer to make Bayesian: bayesianize supports nn.Linear, nn.Conv1d and nn.Conv2d "
            f"and found none{' outside skip=' if skip_set else ''} in {type(net).__name__}"
        )
    _check_plain_float32(net)
    _check_untied(net, modules, chosen)
    frozen = [n for n in chosen if any(not p.requires_grad for p in modules[n].parameters())]
    if frozen:
        raise ValueError(
            f"layers {frozen} have frozen parameters (requires_grad=False), and bayesianize would "
            "learn a posterior over them anyway. Unfreeze them (requires_grad_(True)) to make them "
            f"Bayesian, or pass skip={frozen} to keep them deterministic and frozen"
        )
    if num_classes is None:
        num_classes = _infer_num_classes(net)

    template = copy.deepcopy(net)
    work = copy.deepcopy(net)
    work_modules = dict(work.named_modules())
    followers, activations, traced = _gate_points(work, chosen)
    if not traced and any(isinstance(m, _BN_TYPES) for m in work_modules.values()):
        warnings.warn(
            f"{type(net).__name__} could not be traced with torch.fx, so node gates act at each "
            "layer's output even when a BatchNorm follows it (gated-off channels are then not "
            "exactly zero after the BatchNorm)",
            UserWarning,
            stacklevel=2,
        )
    priors: dict[str, Prior] = {}
    for n in chosen:
        priors[n] = per_layer[n] if per_layer is not None else prior
        old = work_modules[n]
        new = bayesian_layer_for(old).from_module(old, priors[n], init_scale, weight_sd)
        if n == "":  # the network is a single supported layer
            work = new
        else:
            parent_name, _, child = n.rpartition(".")
            setattr(work_modules[parent_name] if parent_name else work, child, new)
        new.gate_after = activations.get(n, followers.get(n))
        new.batchnorm_follows = n in followers
    work_modules = dict(work.named_modules())
    for n in chosen:
        layer = work_modules[n]
        if layer.gate_after is not None:
            work_modules[layer.gate_after].register_forward_hook(_GateAfter(layer))
    bnet = BayesianModule(work, template, priors, likelihood, num_classes, noise_scale, followers)
    bnet.training = net.training  # the wrapper's flag only: the copied layers keep their own
    bnet.set_reparam(reparam)
    dev = next((p.device for p in net.parameters()), torch.device("cpu"))
    return bnet.to(dev)
