r"""Attention heads as prunable nodes: the plain :class:`PrunedMultiheadAttention` (fewer heads,
the same model width), the head surgery, and the registration of ``nn.MultiheadAttention``.

A *node* of an attention layer is a head :math:`h`: its ``head_dim`` rows in each of the query,
key and value parts of the packed ``in_proj_weight`` (and ``in_proj_bias``) and its ``head_dim``
columns of ``out_proj.weight``. Zeroing them (:func:`bayesprune.zero_masked`) makes the head's
values 0, so it adds nothing to the output; removing them leaves the function as it was.
``nn.MultiheadAttention`` cannot hold fewer heads at the same ``embed_dim`` (its ``head_dim`` is
``embed_dim // num_heads``), so a pruned one becomes a :class:`PrunedMultiheadAttention`: plain
PyTorch (no Pyro), the same forward signature and outputs for self- and cross-attention with
equal query/key/value widths, ``batch_first`` either way, ``key_padding_mask`` and ``attn_mask``.

The heads are *internal* nodes (:class:`~bayesprune.registry.NodeGroups`): the layer's output
width, the residual stream of a transformer, is never pruned (every block adds into it).

All heads switched off (``prune(..., min_nodes=0)``): the module keeps ``num_heads=0`` and its
output is the ``out_proj`` bias at every position (what the masked network computes). With the
default ``min_nodes=1`` the best head stays.

Head pack (one row per head, what a Bayesian twin holds as its node-first weight and what
:meth:`AttentionHeads.rows` scores): the head's query, key and value rows of ``in_proj_weight``
(``3 * head_dim * embed_dim``), its three bias slices (``3 * head_dim``, when there is a bias),
then its ``out_proj`` columns (``head_dim * embed_dim``): :func:`pack_heads` / :func:`unpack_heads`.

Example
-------
>>> import torch
>>> from torch import nn
>>> from bayesprune.pruning.attention import AttentionHeads
>>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
>>> small = AttentionHeads().select(mha, torch.tensor([0, 2]))
>>> type(small).__name__, small.num_heads, small.head_dim, small.embed_dim
('PrunedMultiheadAttention', 2, 4, 16)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..registry import LayerSpec, NodeGroups, register_layer

__all__ = [
    "AttentionHeads",
    "PrunedMultiheadAttention",
    "attention_macs",
    "head_columns",
    "head_rows",
    "multihead_attention",
    "pack_heads",
    "unpack_heads",
]


def head_rows(heads: torch.Tensor, head_dim: int, width: int) -> torch.Tensor:
    """Rows of a packed ``in_proj_weight`` (``3 * width`` rows) of ``heads``: query, key, value."""
    one = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
    return torch.cat([part * width + one for part in range(3)])


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Columns of ``out_proj.weight`` (its inputs) of ``heads``."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def pack_heads(
    in_w: torch.Tensor, in_b: torch.Tensor | None, out_w: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """``[num_heads, group]``: each head's parameters (see the module docstring)."""
    embed, width = out_w.shape
    hd = width // num_heads if num_heads else 0
    parts = [in_w.reshape(3, num_heads, hd, in_w.shape[1]).transpose(0, 1).reshape(num_heads, -1)]
    if in_b is not None:
        parts.append(in_b.reshape(3, num_heads, hd).transpose(0, 1).reshape(num_heads, -1))
    parts.append(out_w.reshape(embed, num_heads, hd).permute(1, 2, 0).reshape(num_heads, -1))
    return torch.cat(parts, 1)


def unpack_heads(
    rows: torch.Tensor, embed_dim: int, head_dim: int, bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(in_proj_weight, in_proj_bias, out_proj.weight)`` from :func:`pack_heads`'s rows."""
    h, hd, e = rows.shape[0], head_dim, embed_dim
    a = 3 * hd * e
    in_w = rows[:, :a].reshape(h, 3, hd, e).transpose(0, 1).reshape(3 * h * hd, e)
    in_b = None
    if bias:
        in_b = rows[:, a : a + 3 * hd].reshape(h, 3, hd).transpose(0, 1).reshape(-1)
        a += 3 * hd
    out_w = rows[:, a:].reshape(h, hd, e).permute(2, 0, 1).reshape(e, h * hd)
    return in_w, in_b, out_w


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not allowed) as an additive float mask; a float mask as it is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


def multihead_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    in_w: torch.Tensor,
    in_b: torch.Tensor | None,
    out_w: torch.Tensor,
    out_b: torch.Tensor | None,
    num_heads: int,
    head_dim: int,
    *,
    batch_first: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    head_mult: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention``'s function with ``num_heads`` heads of ``head_dim`` each.

    ``head_mult`` (``[num_heads]``, or ``[batch, num_heads]``) multiplies each head's output
    before the output projection (the node gates of the Bayesian twin). ``attn_mask`` is
    ``[L, S]`` or ``[batch * num_heads, L, S]``; ``is_causal`` is a hint, as in PyTorch: the
    causal mask must be given as ``attn_mask``.
    """
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention does)"
        )
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query[:, None], key[:, None], value[:, None]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None]
    elif batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    length, batch, _ = query.shape
    width = num_heads * head_dim
    parts = [slice(0, width), slice(width, 2 * width), slice(2 * width, 3 * width)]
    wq, wk, wv = (in_w[p] for p in parts)  # not .split(width): width may be 0 (no head left)
    bq, bk, bv = (None, None, None) if in_b is None else (in_b[p] for p in parts)

    def heads(t: torch.Tensor) -> torch.Tensor:  # [len, batch, width] -> [batch, heads, len, hd]
        return t.reshape(t.shape[0], batch, num_heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = (
        heads(F.linear(query, wq, bq)),
        heads(F.linear(key, wk, bk)),
        heads(F.linear(value, wv, bv)),
    )
    scores = (q * (1.0 / math.sqrt(head_dim))) @ k.transpose(-2, -1)  # [batch, heads, L, S]
    mask = _float_mask(attn_mask, scores.dtype)
    if mask is not None:
        scores = scores + (
            mask.reshape(batch, num_heads, *mask.shape[1:]) if mask.dim() == 3 else mask
        )
    pad = _float_mask(key_padding_mask, scores.dtype)
    if pad is not None:
        scores = scores + pad[:, None, None, :]
    attn = torch.softmax(scores, -1)
    weights = attn
    if dropout > 0.0 and training:
        attn = F.dropout(attn, p=dropout)
    out = attn @ v  # [batch, heads, L, hd]
    if head_mult is not None:
        out = out * head_mult.reshape(-1 if head_mult.dim() == 2 else 1, num_heads, 1, 1)
    out = F.linear(out.permute(2, 0, 1, 3).reshape(length, batch, width), out_w, out_b)
    if unbatched:
        out = out[:, 0]
    elif batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    if average_attn_weights:
        weights = weights.mean(1)
    return out, weights[0] if unbatched else weights


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` each on an ``embed_dim``-wide
    input, ``num_heads * head_dim`` free: what a pruned ``nn.MultiheadAttention`` becomes.

    Plain PyTorch. Same tensors as ``nn.MultiheadAttention`` (``in_proj_weight``
    ``[3 * num_heads * head_dim, embed_dim]``, ``in_proj_bias``, ``out_proj``), same forward
    signature and returns (``(output, weights)``; ``weights`` average over the kept heads).
    Query, key and value have width ``embed_dim``; no ``add_bias_kv`` / ``add_zero_attn``.
    ``num_heads=0`` outputs the ``out_proj`` bias. PyTorch's fused transformer fast paths assume
    ``head_dim == embed_dim / num_heads``, so this module declines them
    (``_qkv_same_embed_dim = False``, the flag ``nn.TransformerEncoderLayer`` checks).

    >>> import torch
    >>> from bayesprune import PrunedMultiheadAttention
    >>> m = PrunedMultiheadAttention(16, 2, 4, batch_first=True)
    >>> x = torch.randn(3, 5, 16)
    >>> m(x, x, x)[0].shape
    torch.Size([3, 5, 16])
    """

    _qkv_same_embed_dim = False
    bias_k = bias_v = None
    add_zero_attn = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = (
            int(embed_dim),
            int(num_heads),
            int(head_dim),
        )
        self.kdim = self.vdim = self.embed_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        width = self.num_heads * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, self.embed_dim, **kw))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * width, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(width, self.embed_dim, bias=bias, **kw)
        if self.in_proj_weight.numel():
            nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    @torch.no_grad()
    def from_heads(cls, mha: nn.Module, keep: torch.Tensor) -> PrunedMultiheadAttention:
        """The heads ``keep`` (indices) of an ``nn.MultiheadAttention`` or of another pruned one."""
        problem = AttentionHeads().problem(mha)
        if problem is not None:
            raise ValueError(f"cannot prune the heads of this {type(mha).__name__}: {problem}")
        keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()
        hd, width = mha.head_dim, mha.num_heads * mha.head_dim
        w = mha.in_proj_weight
        new = cls(
            mha.embed_dim,
            len(keep),
            hd,
            bias=mha.in_proj_bias is not None,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
            device=w.device,
            dtype=w.dtype,
        )
        rows, cols = head_rows(keep, hd, width).to(w.device), head_columns(keep, hd).to(w.device)
        new.in_proj_weight.copy_(w.index_select(0, rows))
        new.out_proj.weight.copy_(mha.out_proj.weight.index_select(1, cols))
        if mha.in_proj_bias is not None:
            new.in_proj_bias.copy_(mha.in_proj_bias.index_select(0, rows))
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        for name, p in new.named_parameters():
            p.requires_grad_(mha.get_parameter(name).requires_grad)
        return new.train(mha.training)

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
        return multihead_attention(
            query,
            key,
            value,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
            self.out_proj.bias,
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
        )

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"batch_first={self.batch_first}"
        )


class AttentionHeads(NodeGroups):
    """The heads of ``nn.MultiheadAttention`` / :class:`PrunedMultiheadAttention` as nodes."""

    pruned_type = PrunedMultiheadAttention

    def problem(self, module: nn.Module) -> str | None:
        if not getattr(module, "_qkv_same_embed_dim", True) and not isinstance(
            module, PrunedMultiheadAttention
        ):
            return "kdim / vdim differ from embed_dim (separate projection weights)"
        if getattr(module, "bias_k", None) is not None:
            return "add_bias_kv=True"
        if getattr(module, "add_zero_attn", False):
            return "add_zero_attn=True"
        return None

    def rows(self, module: nn.Module) -> torch.Tensor:
        self._check(module)
        return pack_heads(
            module.in_proj_weight.detach(),
            None if module.in_proj_bias is None else module.in_proj_bias.detach(),
            module.out_proj.weight.detach(),
            module.num_heads,
        )

    @torch.no_grad()
    def zero(self, module: nn.Module, drop: torch.Tensor) -> None:
        self._check(module)
        heads = torch.as_tensor(drop, dtype=torch.bool).cpu().nonzero().flatten()
        hd, width = module.head_dim, module.num_heads * module.head_dim
        rows = head_rows(heads, hd, width).to(module.in_proj_weight.device)
        module.in_proj_weight[rows] = 0
        if module.in_proj_bias is not None:
            module.in_proj_bias[rows] = 0
        module.out_proj.weight[:, head_columns(heads, hd).to(rows.device)] = 0

    def select(self, module: nn.Module, keep: torch.Tensor) -> nn.Module:
        return PrunedMultiheadAttention.from_heads(module, keep)

    def _check(self, module: nn.Module) -> None:
        problem = self.problem(module)
        if problem is not None:
            raise ValueError(
                f"the heads of this {type(module).__name__} cannot be pruned: {problem}"
            )


def attention_macs(m: nn.Module, x: torch.Tensor, out: object) -> int:
    r"""MACs per example of self-attention on ``x`` (key length = query length :math:`L`), with
    :math:`E` = ``embed_dim`` and :math:`D` = ``num_heads * head_dim``: the projections
    :math:`3LED + LDE` (+ :math:`3LD + LE` for the biases) and the sequence terms
    :math:`QK^\top` and :math:`AV`, :math:`2L^2D`. The softmax is not counted (nor are
    activations elsewhere)."""
    length = x.shape[1] if x.dim() == 3 and m.batch_first else x.shape[0]
    e, d = m.embed_dim, m.num_heads * m.head_dim
    macs = 3 * length * e * d + 2 * length * length * d + length * d * e
    if m.in_proj_bias is not None:
        macs += 3 * length * d
    if m.out_proj.bias is not None:
        macs += length * e
    return int(macs)


_HYPERPARAMETERS = ("head_dim", "batch_first", "dropout")
_HEADS = AttentionHeads()
for _cls in (nn.MultiheadAttention, PrunedMultiheadAttention):
    register_layer(
        _cls,
        LayerSpec(
            0,
            1,
            ("num_heads", "embed_dim"),
            attention_macs,
            hyperparameters=_HYPERPARAMETERS,
            nodes=_HEADS,
        ),
    )
