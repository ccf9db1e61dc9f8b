r"""The Bayesian twin of ``nn.MultiheadAttention``: one node gate per head.

A head :math:`h` is one node: its query, key and value rows of the packed ``in_proj_weight`` (and
``in_proj_bias``) and its columns of ``out_proj.weight`` form its weight group, kept node-first as
``weight_loc`` of shape ``[num_heads, group]`` (:func:`bayesprune.pruning.attention.pack_heads`),
so ``group_size`` (what ``prior_inclusion="theory"`` and the horseshoe read) is the size of
one head's whole group, :math:`4\,d_h E + 3 d_h` with a bias. The node multiplier of the prior
(the spike-and-slab gate :math:`z_h`, a horseshoe scale :math:`\tilde s_h`) multiplies the head's
attention output before the output projection, so with the node spike-and-slab prior the KL per
gate is the Bernoulli KL (point weights) plus, with Gaussian weights, :math:`q_h` times the KL of
the head's group. ``out_proj.bias`` belongs to no head: it is a point estimate
(``out_proj_bias``), like a LayerNorm's parameters.

Attention is not linear in its weights, so local reparameterization does not apply: in
``"sample"`` mode the weights are drawn once per forward pass (unbiased, as ``reparam="shared"``),
the gates once per example. With a non-centred prior (the horseshoe) only the output-projection
columns are standardised (divided by the initial scale), so that the posterior-mean network of a
pretrained attention starts as that attention; :meth:`fold_multiplier` scales the same columns.

The forward signature and outputs are ``nn.MultiheadAttention``'s (self- and cross-attention
with equal widths, ``batch_first`` either way, ``key_padding_mask``, ``attn_mask``).
Configurations with separate key/value widths, ``add_bias_kv`` or ``add_zero_attn`` have no twin
and stay deterministic (with :func:`bayesprune.bayesianize`'s warning).

Example
-------
>>> import torch
>>> from torch import nn
>>> import bayesprune as bp
>>> net = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
>>> bnet = bp.bayesianize(net)
>>> {k: tuple(v.shape) for k, v in bnet.inclusion_probs().items()}
{'self_attn': (4,), 'linear1': (32,), 'linear2': (16,)}
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import INIT_SCALE, SUPPORTED_LAYERS, BayesianLayer
from .priors import Prior
from .pruning.attention import AttentionHeads, multihead_attention, pack_heads, unpack_heads

__all__ = ["BayesianMultiheadAttention"]


class BayesianMultiheadAttention(BayesianLayer):
    """Bayesian twin of :class:`torch.nn.MultiheadAttention` (node = head; see the module docstring)."""

    plain_type = nn.MultiheadAttention
    # PyTorch's fused transformer paths read the plain tensors; these flags make them decline
    _qkv_same_embed_dim = False
    in_proj_bias = None

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return AttentionHeads().problem(module) is None

    @classmethod
    def from_module(
        cls,
        module: nn.MultiheadAttention,
        prior: Prior,
        init_scale: float = INIT_SCALE,
        weight_sd: str = "per_weight",
    ) -> BayesianMultiheadAttention:
        problem = AttentionHeads().problem(module)
        if problem is not None:
            raise TypeError(f"this MultiheadAttention has no Bayesian twin: {problem}")
        in_b = module.in_proj_bias
        rows = pack_heads(
            module.in_proj_weight.detach(),
            None if in_b is None else in_b.detach(),
            module.out_proj.weight.detach(),
            module.num_heads,
        ).float()
        layer = cls(rows, None, prior, init_scale, weight_sd)
        layer.embed_dim, layer.num_heads = module.embed_dim, module.num_heads
        layer.head_dim, layer.batch_first = module.head_dim, module.batch_first
        layer.dropout, layer.has_in_bias = module.dropout, in_b is not None
        bias = module.out_proj.bias
        layer.out_proj_bias = None if bias is None else nn.Parameter(bias.detach().clone().float())
        with torch.no_grad():
            # a non-centred prior standardised the whole group; only the output columns carry
            # the head's scale (its output is scale x head), so the q, k, v parts go back
            out = layer._out_columns()
            loc = rows.clone()
            loc[:, out] = layer.weight_loc[:, out]
            layer.weight_loc.copy_(loc)
        return layer

    def _out_columns(self) -> slice:
        """The output-projection columns within a head's packed group."""
        start = 3 * self.head_dim * self.embed_dim + (3 * self.head_dim if self.has_in_bias else 0)
        return slice(start, None)

    def _unpack(
        self, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        return unpack_heads(weight, self.embed_dim, self.head_dim, self.has_in_bias)

    # -- mean_module ----------------------------------------------------------------------------
    def fold_multiplier(self, weight, bias, mult):
        weight = weight.clone()
        weight[:, self._out_columns()] *= mult[:, None]
        return weight, bias

    @torch.no_grad()
    def write_plain(self, plain, weight, bias):
        in_w, in_b, out_w = self._unpack(weight)
        plain.in_proj_weight.copy_(in_w)
        if in_b is not None:
            plain.in_proj_bias.copy_(in_b)
        plain.out_proj.weight.copy_(out_w)
        if self.out_proj_bias is not None:
            plain.out_proj.bias.copy_(self.out_proj_bias)

    # -- forward --------------------------------------------------------------------------------
    def _batch_size(self, query: torch.Tensor) -> int:
        if query.dim() == 2:
            return 1
        return query.shape[0] if self.batch_first else query.shape[1]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mode = self.mode
        if mode == "sample":
            w = self.weight_loc
            if not self.prior.point_weights:  # one draw per pass: attention is not linear in w
                w = torch.addcmul(w, self.weight_scale, torch.randn_like(w))
            gate = self.prior.weight_gate(self)
            if gate is not None:
                w = w * gate
            mult = self.prior.node_multiplier(self, self._batch_size(query))
        elif mode == "mean":
            w, _, mult = self.mean_weights()
        elif mode == "fixed":
            if self._fixed is None:
                raise RuntimeError(
                    "fixed mode without sampled weights: run it through bnet.model / guide"
                )
            w, _, mult = self._fixed
        else:  # pragma: no cover - guarded by set_mode
            raise ValueError(f"unknown mode {mode!r}")
        self._mult = mult
        in_w, in_b, out_w = self._unpack(w)
        return multihead_attention(
            query,
            key,
            value,
            in_w,
            in_b,
            out_w,
            self.out_proj_bias,
            self.num_heads,
            self.head_dim,
            batch_first=self.batch_first,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            dropout=self.dropout,
            training=self.training,
            head_mult=mult,
        )

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, {super().extra_repr()}"


SUPPORTED_LAYERS[nn.MultiheadAttention] = BayesianMultiheadAttention
