r"""Bayesian ``Linear``, ``Conv1d`` and ``Conv2d`` layers (and a generic twin of any layer family
registered with a :class:`~bayesprune.registry.LayerSpec`) with local reparameterization and node gates.

Each layer owns its variational parameters as plain ``nn.Parameter`` objects: the base weight's
posterior mean ``weight_loc`` and log standard deviation ``weight_log_scale`` (``weight_scale`` is
:math:`\sigma`), the same for the bias, and whatever its prior (:mod:`bayesprune.priors`) adds
(gate logits, log-normal scale parameters). With ``weight_sd="rank1"`` the sds are rank one
instead: :math:`\log \sigma_{ji} = a_j + b_i` from ``weight_log_scale_out`` (one per node) and
``weight_log_scale_in`` (one per input position); ``weight_log_sd`` gives the weight-shaped
:math:`\log \sigma` in both families. Its ordinary ``forward`` is the fast training path:

.. math::
    \text{mean} = \mathrm{op}(x, \mu) + \mu_b, \qquad
    \text{var} = \mathrm{op}(x^2, \sigma^2) + \sigma_b^2, \qquad
    \text{out} = \text{mean} + \sqrt{\text{var}}\,\varepsilon,\ \varepsilon \sim \mathcal N(0, I)

(local reparameterization, Kingma, Salimans and Welling 2015: each example's pre-activation has
exactly its marginal law under :math:`q`; for a convolution the positions of one example are
then independent, whereas under :math:`q` they share one weight draw, see ``reparam`` in
:func:`bayesprune.bayesianize`), then the node multiplier of the prior (a spike-and-slab
gate :math:`z_j`, a horseshoe scale :math:`\tilde s_j`, or both), drawn independently per
example (the same joint law over the layer's nodes, per example, as one draw per minibatch,
hence the same expected log-likelihood, with less variance), multiplies node :math:`j`'s output. When the layer's output
goes straight into a BatchNorm and/or a ReLU used only there, the multiplier acts after them
instead (a forward hook installed by :func:`bayesprune.bayesianize`): a gated-off channel is then
exactly zero after the BatchNorm, and a dropped node still receives a gradient (before a ReLU it
would sit on the kink, whose derivative is 0).

On a CPU the step is bound by passes over the weights as much as by the matmuls, so the weight
side is one autograd node per layer (:class:`WeightMoments`, or :class:`SampledWeight` for
``reparam="shared"``) that also returns the per-node sums every Gaussian KL of the weights needs
(:meth:`BayesianLayer.weight_row_stats`); the KL computed after a training forward pass reuses them.

The layers subclass :class:`pyro.nn.PyroModule` but skip its parameter-store context in
``__call__``: the fast path touches no Pyro machinery. The genuine Pyro model and guide of
:class:`bayesprune.BayesianModule` set the layer into ``"fixed"`` mode with sampled weights.

Modes (``layer.mode``): ``"sample"`` (fast path), ``"mean"`` (posterior-mean weights and
multipliers), ``"fixed"`` (weights given by the Pyro model / guide).

Example
-------
>>> import torch
>>> from torch import nn
>>> from bayesprune.layers import BayesianLinear
>>> from bayesprune.priors import SpikeAndSlab
>>> layer = BayesianLinear.from_module(nn.Linear(4, 3), SpikeAndSlab(level="node"))
>>> layer(torch.randn(5, 4)).shape
torch.Size([5, 3])
>>> layer.kl().item() > 0
True
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from ._weight_ops import VAR_FLOOR, RowStatsCache, SampledWeight, WeightMoments, add_noise
from .priors import Prior
from .registry import LAYER_TYPES, NORM_TYPES, LayerSpec, layer_family, layer_spec

__all__ = [
    "INIT_SCALE",
    "SUPPORTED_LAYERS",
    "BayesianConv1d",
    "BayesianConv2d",
    "BayesianLayer",
    "BayesianLinear",
    "BayesianSpecLayer",
    "bayesian_layer_for",
]

_MODES = ("sample", "mean", "fixed")

#: variational families of the base weights' standard deviations (see :class:`BayesianLayer`)
WEIGHT_SD_FAMILIES = ("per_weight", "rank1")

#: default initial posterior sd relative to the layer's weight RMS. In an early probe (Fashion-MNIST
#: LeNet-300-100, node spike-and-slab, 5 SVI epochs, CPU; not a recorded benchmark) 0.01 gave
#: per-node slab KLs of thousands of nats before the sds could grow, and every first-layer gate
#: collapsed (median-probability model at chance); 0.3 did not.
INIT_SCALE = 0.3


class BayesianLayer(PyroModule):
    """Common machinery of the Bayesian layers (see the module docstring)."""

    #: the plain layer type this class replaces
    plain_type: type[nn.Module] = nn.Module
    #: every gate logit of this layer is at +inf or -inf, so that a draw of its node multiplier
    #: is decided without random numbers (set by :mod:`bayesprune.gate_tests` on the instances
    #: while it evaluates the median-probability model; read by the priors' ``node_multiplier``)
    gates_decided: bool = False

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        prior: Prior,
        init_scale: float = INIT_SCALE,
        weight_sd: str = "per_weight",
    ) -> None:
        super().__init__()
        if weight_sd not in WEIGHT_SD_FAMILIES:
            raise ValueError(f"weight_sd must be one of {WEIGHT_SD_FAMILIES}, got {weight_sd!r}")
        self.prior = prior
        #: variational family of the base weights' sds: one per weight, or rank one (node x input)
        self.weight_sd = weight_sd
        self.mode = "sample"
        #: local reparameterization (True) or one weight draw per minibatch (False) in "sample" mode
        self.local_reparam = True
        #: in "sample" mode, draw the weights once per pass wherever local reparameterization would
        #: make the positions of one example independent (convolutions, Linear layers applied to
        #: sequences), so each example sees an exact posterior draw (reparam="auto", and
        #: BayesianModule.predict whatever the estimator)
        self.exact_draws = False
        #: node multiplier of the current forward pass (read by the BatchNorm hook)
        self._mult: torch.Tensor | None = None
        self._fixed: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        #: the KL's row statistics computed by the last training forward pass (see weight_row_stats)
        self._row_stats = RowStatsCache()
        #: module (a following BatchNorm or ReLU) after which the node multiplier acts, if any
        self.gate_after: str | None = None
        #: a BatchNorm alone consumes this layer's output (and the multiplier acts after it): the
        #: scale of the weights then does not reach the rest of the network
        self.batchnorm_follows = False
        weight = weight.detach().clone().float()
        bias = None if bias is None else bias.detach().clone().float()
        self.group_size = weight[0].numel() + (1 if bias is not None else 0)
        rows = self.node_rows(weight, bias)
        # RMS of each node's pretrained weights: initial horseshoe node scale
        self.row_rms = rows.pow(2).mean(1).sqrt()
        # initial posterior sd relative to the layer's weight RMS (small: a pretrained net keeps its accuracy)
        layer_rms = float(rows.pow(2).mean().sqrt().clamp_min(1e-3))
        self.weight_loc = nn.Parameter(weight)
        self.bias_loc = None if bias is None else nn.Parameter(bias)
        prior.setup(self, init_scale)
        with torch.no_grad():
            self.weight_loc.copy_(prior.init_weight_loc(self, weight))
            if bias is not None:
                self.bias_loc.copy_(prior.init_bias_loc(self, bias))
        base_rms = float(self.weight_loc.detach().pow(2).mean().sqrt().clamp_min(1e-3))
        rel = base_rms if prior.noncentred else layer_rms
        log_sd = math.log(init_scale * rel)
        if weight_sd == "rank1":
            # log sigma_ij = a_j + b_i: the node factor carries the initial level, inputs start at 0
            self.weight_log_scale_out = nn.Parameter(weight.new_full((weight.shape[0],), log_sd))
            self.weight_log_scale_in = nn.Parameter(torch.zeros_like(weight[0]))
        else:
            self.weight_log_scale = nn.Parameter(torch.full_like(weight, log_sd))
        self.bias_log_scale = None if bias is None else nn.Parameter(torch.full_like(bias, log_sd))
        if prior.point_weights:
            # point-estimated weights: the sds are kept for the state dict's shape but never read
            # on the training path, and not fitted
            for name, p in self.named_parameters(recurse=False):
                if name.startswith(("weight_log_scale", "bias_log_scale")):
                    p.requires_grad_(False)

    # PyroModule.__call__ enters a parameter-store context and turns every parameter access into
    # a pyro.param statement, a cost per step; the fast path does not need it.
    __call__ = nn.Module.__call__

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        prior: Prior,
        init_scale: float = INIT_SCALE,
        weight_sd: str = "per_weight",
    ) -> BayesianLayer:
        """Build the Bayesian twin of a plain layer, posterior means = its weights."""
        raise NotImplementedError

    # -- parameters ---------------------------------------------------------------------------
    @staticmethod
    def node_rows(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``[out, group size]``: each node's incoming weights, then its bias if there is one."""
        rows = weight.reshape(weight.shape[0], -1)
        return rows if bias is None else torch.cat([rows, bias[:, None]], 1)

    @property
    def weight_log_sd(self) -> torch.Tensor:
        r""":math:`\log \sigma` of the base weights, weight-shaped, in either family.

        ``"per_weight"``: the parameter ``weight_log_scale`` itself. ``"rank1"``:
        :math:`\log \sigma_{ji} = a_j + b_i` from ``weight_log_scale_out`` (one per node) and
        ``weight_log_scale_in`` (one per input position, shaped like one node's weights).
        """
        if self.weight_sd == "rank1":
            a = self.weight_log_scale_out
            return a.view(-1, *([1] * self.weight_log_scale_in.dim())) + self.weight_log_scale_in
        return self.weight_log_scale

    @property
    def weight_scale(self) -> torch.Tensor:
        """Posterior standard deviation :math:`\\sigma` of the base weights (weight-shaped)."""
        return torch.exp(self.weight_log_sd)

    @property
    def bias_scale(self) -> torch.Tensor | None:
        return None if self.bias_log_scale is None else torch.exp(self.bias_log_scale)

    @property
    def out_features_(self) -> int:
        return self.weight_loc.shape[0]

    def kl(self) -> torch.Tensor:
        """Analytic KL of this layer's variational posterior from its prior."""
        return self.prior.kl(self)

    def weight_row_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Per node :math:`j`: :math:`\tfrac12 \sum_i (\sigma_{ij}^2 + \mu_{ij}^2)` and
        :math:`\sum_i \log \sigma_{ij}` over the node's incoming weights (not the bias).

        These are the data-independent parts of every Gaussian KL of the weights: against
        :math:`\mathcal N(0, s_j^2)`, the row's KL is
        :math:`\text{first} / s_j^2 - \text{second} + n_j(\log s_j - \tfrac12)`. The training
        forward pass computes them in the same pass as the weights' variances (or samples), and the
        KL that follows it reuses them; otherwise they are computed here. In the ``"rank1"`` family
        they cost one pass over the means: :math:`\sum_i \sigma_{ij}^2 = e^{2a_j} \sum_i e^{2b_i}`.
        """
        if self.weight_sd == "rank1":
            a, b = self.weight_log_scale_out, self.weight_log_scale_in.flatten()
            m = self.weight_loc.reshape(a.shape[0], -1)
            half_sq = 0.5 * (torch.exp(2 * a) * torch.exp(2 * b).sum() + m.square().sum(1))
            return half_sq, b.numel() * a + b.sum()
        cached = self._row_stats.take(self)
        if cached is not None:
            return cached
        _, half_sq, ls_sum = WeightMoments.apply(self.weight_loc, self.weight_log_scale)
        return half_sq, ls_sum

    def inclusion_probs(self) -> torch.Tensor | None:
        return self.prior.inclusion_probs(self)

    def inclusion_logits(self) -> torch.Tensor | None:
        return self.prior.inclusion_logits(self)

    @torch.no_grad()
    def mean_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weight, bias, node multiplier) of the posterior-mean network (multiplier may be None)."""
        return (
            self.weight_loc.detach().clone(),
            None if self.bias_loc is None else self.bias_loc.detach().clone(),
            self.prior.mean_multiplier(self),
        )

    def plain_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (node-first, like ``weight_loc``) in the plain layer's own layout."""
        return weight

    def fold_multiplier(
        self, weight: torch.Tensor, bias: torch.Tensor | None, mult: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` (node-first) with node ``j``'s output scaled by ``mult[j]`` folded in:
        its weight row and bias entry scaled (what ``mean_module`` holds for a horseshoe scale)."""
        weight = weight * mult.view(-1, *([1] * (weight.dim() - 1)))
        return weight, None if bias is None else bias * mult

    @torch.no_grad()
    def write_plain(
        self, plain: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """Copy node-first ``(weight, bias)`` into the plain layer this one replaced."""
        plain.weight.copy_(self.plain_weight(weight))
        if bias is not None:
            plain.bias.copy_(bias)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this twin can replace ``module`` (a configuration it handles)."""
        return True

    # -- forward ------------------------------------------------------------------------------
    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _node_shape(self, out: torch.Tensor, batched: bool) -> tuple[int, ...]:
        """Shape that broadcasts a ``[out]`` (or ``[batch, out]``) multiplier over ``out``."""
        raise NotImplementedError

    def apply_multiplier(self, out: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
        """Multiply node ``j`` of ``out`` (this layer's or its BatchNorm's output) by ``mult[j]``
        (``mult`` of shape ``[out]``, or ``[batch, out]`` for one draw per example)."""
        return out * mult.view(self._node_shape(out, batched=mult.dim() == 2))

    def _positions_share_weights(self, x: torch.Tensor) -> bool:
        """Whether one example's input has several positions that the same weights read (then
        local reparameterization draws them independently, unlike the posterior)."""
        raise NotImplementedError

    def draws_per_example(self, x: torch.Tensor) -> bool:
        """Whether a ``"sample"``-mode pass of this layer on ``x`` draws everything it draws
        independently per example (per row of ``x``): node multipliers always are; point weights
        draw nothing; Gaussian weights are per example under local reparameterization only, not
        when one draw is shared by the pass (``reparam="shared"``, or ``exact_draws`` where the
        positions of one example share the weights); weight-level gates are one draw per pass.

        Then ``S`` copies of a batch in one pass are ``S`` independent posterior draws for each
        example, which :meth:`bayesprune.BayesianModule.predict` uses to batch its draws.
        """
        if self.prior.weight_level or type(self).forward is not BayesianLayer.forward:
            return False  # (a twin with its own forward, such as attention: its batch axis)
        if self.prior.point_weights:
            return True
        return self.local_reparam and not (self.exact_draws and self._positions_share_weights(x))

    def _input_variance(self, x2: torch.Tensor, in_var: torch.Tensor) -> torch.Tensor:
        """``op(x^2, 1 (x) in_var)`` with one output node (per group), broadcastable over the
        nodes: the rank-one family's variance pass (see :meth:`forward`)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, mult = self.forward_pre_gate(x)
        return self.gate_output(out, mult)

    def forward_pre_gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output before its node multiplier, and that multiplier where it does not
        depend on the pass (``"mean"`` and ``"fixed"`` modes; ``None`` in ``"sample"`` mode, where
        :meth:`gate_output` draws it). Node-level gates act in :meth:`gate_output` alone, so
        :class:`~bayesprune.replay.ForwardReplay` can reuse this part when only they change."""
        mode = self.mode
        rank1 = self.weight_sd == "rank1" and not self.prior.weight_level
        local = self.local_reparam and not (self.exact_draws and self._positions_share_weights(x))
        if mode == "sample" and self.prior.point_weights:
            out = self._op(x, self.weight_loc, self.bias_loc)
        elif mode == "sample" and local and rank1:
            # sigma_ji^2 = e^{2a_j} e^{2b_i}: the variance pass is op(x^2, e^{2b}) with ONE output,
            # scaled per node, instead of a second full-width matmul / convolution
            mean = self._op(x, self.weight_loc, self.bias_loc)
            shape = self._node_shape(mean, batched=False)
            node_var = torch.exp(2 * self.weight_log_scale_out).view(shape)
            floor = torch.full_like(node_var, VAR_FLOOR)
            if self.bias_log_scale is not None:
                floor = floor + torch.exp(2 * self.bias_log_scale).view(shape)
            v = self._input_variance(x * x, torch.exp(2 * self.weight_log_scale_in))
            out = add_noise(mean, torch.addcmul(floor, v, node_var))
        elif mode == "sample" and local:
            if self.weight_sd == "per_weight" and self.prior.uses_row_stats:
                var, half_sq, ls_sum = WeightMoments.apply(self.weight_loc, self.weight_log_scale)
                self._row_stats.put(self, half_sq, ls_sum, var)
            else:
                var = torch.exp(2 * self.weight_log_sd)
            loc = self.weight_loc
            gate = self.prior.weight_gate(self)
            if gate is not None:
                loc, var = loc * gate, var * gate
            bvar = None if self.bias_log_scale is None else torch.exp(2 * self.bias_log_scale)
            mean = self._op(x, loc, self.bias_loc)
            out = add_noise(mean, self._op(x * x, var, bvar).add_(VAR_FLOOR))
        elif mode == "sample":
            # one weight draw shared by the minibatch (Bayes by Backprop): half the matmuls
            eps = torch.randn_like(self.weight_loc)
            if self.weight_sd == "per_weight" and self.prior.uses_row_stats:
                w, half_sq, ls_sum = SampledWeight.apply(
                    self.weight_loc, self.weight_log_scale, eps
                )
                self._row_stats.put(self, half_sq, ls_sum, w)
            else:
                w = torch.addcmul(self.weight_loc, self.weight_scale, eps)
            gate = self.prior.weight_gate(self)
            if gate is not None:
                w = w * gate
            b = None
            if self.bias_loc is not None:
                b = self.bias_loc + torch.exp(self.bias_log_scale) * torch.randn_like(self.bias_loc)
            out = self._op(x, w, b)
        elif mode == "mean":
            w, b, mult = self.mean_weights()
            out = self._op(x, w, b)
        elif mode == "fixed":
            if self._fixed is None:
                raise RuntimeError(
                    "fixed mode without sampled weights: run it through bnet.model / guide"
                )
            w, b, mult = self._fixed
            out = self._op(x, w, b)
        else:  # pragma: no cover - guarded by set_mode
            raise ValueError(f"unknown mode {mode!r}")
        return out, (None if mode == "sample" else mult)

    def gate_output(self, out: torch.Tensor, mult: torch.Tensor | None) -> torch.Tensor:
        """``out`` (from :meth:`forward_pre_gate`) times the node multiplier, which a
        ``"sample"``-mode pass draws here; kept for the BatchNorm hook when the multiplier acts
        after a following module (``gate_after``)."""
        if self.mode == "sample":
            # node multipliers drawn per example under every estimator: each example's term of
            # the expected log-likelihood depends on its own (w, z) only, so this stays unbiased,
            # and every gate sees a batch of draws per step instead of one
            mult = self.prior.node_multiplier(self, out.shape[0])
        self._mult = mult
        if mult is None or self.gate_after is not None:
            return out
        return self.apply_multiplier(out, mult)

    def extra_repr(self) -> str:
        return f"prior={self.prior!r}, mode={self.mode!r}, gate_after={self.gate_after!r}"


class BayesianLinear(BayesianLayer):
    """Bayesian twin of :class:`torch.nn.Linear` (node = output feature)."""

    plain_type = nn.Linear

    @classmethod
    def from_module(
        cls,
        module: nn.Linear,
        prior: Prior,
        init_scale: float = INIT_SCALE,
        weight_sd: str = "per_weight",
    ) -> BayesianLinear:
        layer = cls(module.weight, module.bias, prior, init_scale, weight_sd)
        layer.in_features, layer.out_features = module.in_features, module.out_features
        return layer

    def _op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _input_variance(self, x2, in_var):
        return F.linear(x2, in_var[None])

    def _positions_share_weights(self, x):
        return x.dim() > 2

    def _node_shape(self, out, batched):
        # nodes are the last axis: [..., out]
        return (out.shape[0], *([1] * (out.dim() - 2)), -1) if batched else (-1,)


class _BayesianConv(BayesianLayer):
    _dims = 2

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        prior: Prior,
        init_scale: float = INIT_SCALE,
        weight_sd: str = "per_weight",
    ) -> _BayesianConv:
        layer = cls(module.weight, module.bias, prior, init_scale, weight_sd)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"):
            setattr(layer, attr, getattr(module, attr))
        layer.groups = module.groups
        layer.padding_mode = module.padding_mode
        layer._reversed_padding_repeated_twice = list(module._reversed_padding_repeated_twice)
        return layer

    def _conv(self, x, weight, bias, padding):
        fn = F.conv1d if self._dims == 1 else F.conv2d
        return fn(x, weight, bias, self.stride, padding, self.dilation, self.groups)

    def _op(self, x, weight, bias):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv(x, weight, bias, 0)
        return self._conv(x, weight, bias, self.padding)

    def _positions_share_weights(self, x):
        return True

    def _input_variance(self, x2, in_var):
        # one output channel per group, then each group's value for each of its nodes
        g = self.groups
        v = self._op(x2, in_var.expand(g, *in_var.shape), None)
        return v if g == 1 else v.repeat_interleave(self.weight_loc.shape[0] // g, dim=1)

    def _node_shape(self, out, batched):
        # nodes are channels: [batch, out, *spatial]
        tail = [1] * (out.dim() - 2)
        return (out.shape[0], -1, *tail) if batched else (-1, *tail)


class BayesianConv1d(_BayesianConv):
    """Bayesian twin of :class:`torch.nn.Conv1d` (node = output channel)."""

    plain_type = nn.Conv1d
    _dims = 1


class BayesianConv2d(_BayesianConv):
    """Bayesian twin of :class:`torch.nn.Conv2d` (node = output channel / filter)."""

    plain_type = nn.Conv2d
    _dims = 2


class BayesianSpecLayer(BayesianLayer):
    """Bayesian twin of a layer family registered with a :class:`~bayesprune.registry.LayerSpec`
    that has a ``forward`` (e.g. ``nn.ConvTranspose2d``, or a user's own layer).

    The layer's output is linear in its weight and bias, so local reparameterization needs only
    the spec's ``forward``: mean ``forward(x, mu_w, mu_b)``, variance
    ``forward(x**2, sigma_w**2, sigma_b**2)``. Inside, the weights are kept node-first (the spec's
    node axis moved to axis 0), so priors, KLs, inclusion probabilities and ``mean_module`` work
    as for the built-in twins; :meth:`plain_weight` moves the axis back.
    """

    spec: LayerSpec

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        prior: Prior,
        init_scale: float = INIT_SCALE,
        weight_sd: str = "per_weight",
    ) -> BayesianSpecLayer:
        spec = layer_spec(module)
        if spec is None or spec.forward is None or spec.norm:
            raise TypeError(
                f"{type(module).__name__} has no LayerSpec with a forward; register it with "
                "bp.register_layer(cls, bp.LayerSpec(..., forward=...))"
            )
        weight, bias = module.weight, getattr(module, "bias", None)
        out_w = spec.widths(module)[0]
        if (
            weight.dim() <= max(spec.node_axis, spec.input_axis)
            or weight.shape[spec.node_axis] != out_w
        ):
            raise TypeError(
                f"{type(module).__name__}'s weight has shape {tuple(weight.shape)}, which does not "
                f"have its {out_w} output nodes ({spec.width_attrs[0]}) along node_axis="
                f"{spec.node_axis}: fix the LayerSpec's node_axis, or keep the layer deterministic "
                "with skip=[...] (grouped layers have no Bayesian twin)"
            )
        if bias is not None and tuple(bias.shape) != (out_w,):
            raise TypeError(
                f"{type(module).__name__}'s bias has shape {tuple(bias.shape)}; a LayerSpec layer "
                f"needs one bias entry per output node ({out_w},)"
            )
        layer = cls(
            weight.detach().movedim(spec.node_axis, 0).contiguous(),
            bias,
            prior,
            init_scale,
            weight_sd,
        )
        layer.spec = spec
        layer.plain_type = type(module)
        for attr in (*spec.width_attrs, *spec.hyperparameters):
            setattr(layer, attr, getattr(module, attr))
        # the plain layer without its tensors: what spec.forward reads hyperparameters from (in a
        # tuple, so that it is neither a submodule nor part of the state dict)
        proto = copy.copy(module)
        proto.__dict__.update(
            _parameters=dict.fromkeys(module._parameters),
            _buffers=dict.fromkeys(module._buffers),
            _modules={},
        )
        layer._config = (proto,)
        return layer

    def plain_weight(self, weight):
        return weight.movedim(0, self.spec.node_axis)

    def _op(self, x, weight, bias):
        return self.spec.forward(self._config[0], x, self.plain_weight(weight), bias)

    def _input_variance(self, x2, in_var):
        # one output node reading every input with variance in_var, broadcast over the nodes
        return self._op(x2, in_var[None], None)

    def _positions_share_weights(self, x):
        return self.spec.spatial_dims > 0 or x.dim() > 2

    def _node_shape(self, out, batched):
        if self.spec.spatial_dims == 0:  # nodes are the last axis: [..., out]
            return (out.shape[0], *([1] * (out.dim() - 2)), -1) if batched else (-1,)
        tail = [1] * (out.dim() - 2)  # nodes are channels: [batch, out, *spatial]
        return (out.shape[0], -1, *tail) if batched else (-1, *tail)

    def extra_repr(self) -> str:
        return f"{self.plain_type.__name__}, {super().extra_repr()}"


#: plain layer family -> Bayesian layer class (exact types, or subclasses registered with
#: :func:`bayesprune.register_layer`: others are not assumed to compute what their base does);
#: a family registered with a LayerSpec that has a forward gets :class:`BayesianSpecLayer`.
#: :mod:`bayesprune.attention` adds ``nn.MultiheadAttention`` here when it is imported.
SUPPORTED_LAYERS: dict[type[nn.Module], type[BayesianLayer]] = {
    nn.Linear: BayesianLinear,
    nn.Conv1d: BayesianConv1d,
    nn.Conv2d: BayesianConv2d,
}


def bayesian_layer_for(module: nn.Module) -> type[BayesianLayer] | None:
    """The Bayesian class replacing ``module``, or ``None`` when its type is not supported."""
    family = layer_family(module)
    if family is None:
        return None
    if family in SUPPORTED_LAYERS:
        twin = SUPPORTED_LAYERS[family]
        return twin if twin.supports(module) else None
    spec = layer_spec(family)
    # a built-in family missing above (Conv3d) has no twin yet
    if family in LAYER_TYPES + NORM_TYPES or spec is None or spec.norm or spec.forward is None:
        return None
    return BayesianSpecLayer


def set_mode(module: nn.Module, mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    for m in module.modules():
        if isinstance(m, BayesianLayer):
            m.mode = mode
