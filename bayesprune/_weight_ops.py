"""Private machinery of the Bayesian layers (:mod:`bayesprune.layers`): the autograd nodes that
compute the weights' variances (or one draw) together with the per-node sums every Gaussian KL
needs, the one-shot cache handing those sums from a forward pass to the KL, and the noise step of
local reparameterization."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .layers import BayesianLayer

#: added to every pre-activation variance: its square root then has a finite gradient where an
#: example's receptive field is all zeros and the layer has no bias (the variance is exactly 0)
VAR_FLOOR = 1e-16


def add_noise(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``mean + sqrt(var) * eps``, eps ~ N(0, I), with ``var`` (a fresh tensor) overwritten by its
    square root: on a CPU the pass over each activation is a large part of a convolutional step."""
    return torch.addcmul(mean, var.sqrt_(), torch.randn_like(mean))


class RowStatsCache:
    """One-shot hand-over of :meth:`BayesianLayer.weight_row_stats` from a forward pass to the KL.

    Taken at most once, and only while the weights are unchanged (their version counters match)
    and the autograd mode allows it, so a stale or gradient-less value is never reused. Copies of
    the layer (``copy.deepcopy``, pickling) start empty: the cached tensors belong to one graph.
    """

    __slots__ = ("key", "value")

    def __init__(self) -> None:
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None
        self.key: tuple | None = None

    @staticmethod
    def _key(layer: BayesianLayer, grad: bool) -> tuple:
        w, s = layer.weight_loc, layer.weight_log_scale
        # the storage address changes when .to() / load_state_dict(assign=True) replace the data
        return (w.data_ptr(), w._version, s.data_ptr(), s._version, grad)

    def put(
        self,
        layer: BayesianLayer,
        half_sq: torch.Tensor,
        ls_sum: torch.Tensor,
        sibling: torch.Tensor,
    ) -> None:
        """Keep the statistics until the next KL, or until a backward pass reaches ``sibling`` (the
        variances or weights computed by the same autograd node): that backward frees the node's
        saved tensors, and a KL built on them could not be differentiated."""
        self.value = (half_sq, ls_sum)
        self.key = self._key(layer, torch.is_grad_enabled())
        if sibling.requires_grad:
            sibling.register_hook(self._drop)

    def _drop(self, grad: torch.Tensor) -> None:
        self.value = self.key = None

    def take(self, layer: BayesianLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
        value, key = self.value, self.key
        self.value = self.key = None
        if value is None:
            return None
        grad = torch.is_grad_enabled()
        # a value computed with gradients serves a no-grad KL too; the converse does not hold
        if key[:4] != self._key(layer, grad)[:4] or (grad and not key[4]):
            return None
        return value

    def __deepcopy__(self, memo: dict) -> RowStatsCache:
        return RowStatsCache()

    def __getstate__(self) -> None:
        return None

    def __setstate__(self, state: None) -> None:
        self.value = self.key = None


class WeightMoments(torch.autograd.Function):
    r"""``(mu, l) -> (sigma^2, half_sq, ls_sum)`` with :math:`\sigma = e^{l}`, in few passes.

    ``half_sq`` and ``ls_sum`` are the per-node row statistics of
    :meth:`BayesianLayer.weight_row_stats`. On a CPU, a LeNet-300-100 SVI step is bound by passes
    over the first layer's 235,000 weights as much as by its matmuls. The plain expressions
    (variance for the forward pass, the KL's sums recomputing it, their gradients accumulated
    separately) made more passes per step; this node makes 9 by construction: 5 forward
    (doubling, exp, three row reductions) and 4 backward (two for the log-sd, one for the mean,
    and autograd's accumulation of the mean's matmul gradient).
    """

    @staticmethod
    def forward(ctx, mu: torch.Tensor, log_sd: torch.Tensor):
        ctx.set_materialize_grads(False)
        m = mu.reshape(mu.shape[0], -1)
        ls = log_sd.reshape(m.shape)
        var = ls.mul(2).exp_()
        half_sq = 0.5 * (var.sum(1) + torch.linalg.vector_norm(m, dim=1).square())
        ctx.save_for_backward(m, var)
        ctx.shape = mu.shape
        return var.view(mu.shape), half_sq, ls.sum(1)

    @staticmethod
    def backward(ctx, g_var, g_sq, g_ls):
        m, var = ctx.saved_tensors
        g_mu = g_l = None
        if ctx.needs_input_grad[0] and g_sq is not None:
            g_mu = (m * g_sq[:, None]).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            # d/dl: 2 sigma^2 (g_var + g_sq / 2) + g_ls
            bias = 0 if g_ls is None else g_ls[:, None]
            if g_var is not None:
                t = g_var.reshape(m.shape)
                t = t + 0.5 * g_sq[:, None] if g_sq is not None else t
                g_l = torch.addcmul(
                    torch.as_tensor(bias, dtype=m.dtype, device=m.device), t, var, value=2
                )
            elif g_sq is not None:
                g_l = torch.addcmul(
                    torch.as_tensor(bias, dtype=m.dtype, device=m.device), var, g_sq[:, None]
                )
            elif g_ls is not None:
                g_l = g_ls[:, None].expand_as(m)
            if g_l is not None:
                g_l = g_l.reshape(ctx.shape)
        return g_mu, g_l


class SampledWeight(torch.autograd.Function):
    r"""``(mu, l, eps) -> (mu + e^{l} eps, half_sq, ls_sum)``: one weight draw and the row statistics
    of :meth:`BayesianLayer.weight_row_stats`, in 5 passes over the weights forward (exp, the draw,
    three row reductions) and 4 backward (see :class:`WeightMoments` for why the count matters)."""

    @staticmethod
    def forward(ctx, mu: torch.Tensor, log_sd: torch.Tensor, eps: torch.Tensor):
        ctx.set_materialize_grads(False)
        m = mu.reshape(mu.shape[0], -1)
        sd = log_sd.reshape(m.shape).exp()
        e = eps.reshape(m.shape)
        w = torch.addcmul(m, sd, e)
        norms = torch.linalg.vector_norm(sd, dim=1).square()
        half_sq = 0.5 * (norms + torch.linalg.vector_norm(m, dim=1).square())
        ctx.save_for_backward(m, sd, e)
        ctx.shape = mu.shape
        return w.view(mu.shape), half_sq, log_sd.reshape(m.shape).sum(1)

    @staticmethod
    def backward(ctx, g_w, g_sq, g_ls):
        m, sd, e = ctx.saved_tensors
        gw = None if g_w is None else g_w.reshape(m.shape)
        g_mu = g_l = None
        if ctx.needs_input_grad[0]:
            if gw is not None and g_sq is not None:
                g_mu = torch.addcmul(gw, m, g_sq[:, None])
            elif gw is not None:
                g_mu = gw
            elif g_sq is not None:
                g_mu = m * g_sq[:, None]
            g_mu = None if g_mu is None else g_mu.reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            # d/dl: sigma (g_w eps + sigma g_sq) + g_ls
            t = None if gw is None else gw * e
            if g_sq is not None:
                t = sd * g_sq[:, None] if t is None else t.addcmul_(sd, g_sq[:, None])
            if t is not None:
                bias = 0 if g_ls is None else g_ls[:, None]
                g_l = torch.addcmul(torch.as_tensor(bias, dtype=m.dtype, device=m.device), t, sd)
            elif g_ls is not None:
                g_l = g_ls[:, None].expand_as(m)
            if g_l is not None:
                g_l = g_l.reshape(ctx.shape)
        return g_mu, g_l, None
