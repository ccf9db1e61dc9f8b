r"""What the pruner knows about PyTorch's transformer blocks: ``nn.TransformerEncoderLayer`` and
``nn.TransformerEncoder`` as registered blocks (:func:`bayesprune.registry.register_block`).

``torch.fx`` cannot trace ``nn.TransformerEncoderLayer.forward`` (its fused fast path branches on
tensor properties), and its feed-forward layers read ``[batch, seq, features]`` tensors, which the
channel-axis rules of :mod:`bayesprune.pruning.graph` keep whole. Their structure is fixed, though:

* ``self_attn``: the heads (:mod:`bayesprune.pruning.attention`), one node per head;
* ``linear1 -> activation -> dropout -> linear2``: one node per feed-forward unit, produced by
  ``linear1`` (its rows) and read by ``linear2`` alone (its columns); removable when the
  activation maps 0 to 0 (ReLU, GELU and the other zero-preserving activations of
  :mod:`bayesprune.pruning.ops`);
* everything else (``norm1``, ``norm2``, the residual additions) acts on the embedding width,
  the residual stream that every block adds into: it is never pruned.

So each block is one opaque node of the traced graph whose inputs and outputs stay whole, with
those two internal node groups. torchvision's ViT ``EncoderBlock`` (``ln_1``, ``self_attention``,
``ln_2``, ``mlp``: ``Linear, GELU, Dropout, Linear, Dropout``) is the same block with other names
(:func:`vit_block_groups`); it is registered by its dotted name, so torchvision is not imported.
The rest of a ``VisionTransformer`` traces as it is (``torch._assert`` included): the patch
embedding ``conv_proj``, the class token and the positional embedding feed the residual stream
and are kept whole. ``nn.TransformerEncoder`` is a block too: its groups are those of
its layers (and its final ``norm`` keeps the width). After its attention is replaced (by a
Bayesian twin or a :class:`~bayesprune.pruning.attention.PrunedMultiheadAttention`) an encoder's
nested-tensor fast path, which reads the layers' tensors directly, is turned off
(``use_nested_tensor = False``); the layers' own fast path declines modules with fewer heads
(``_qkv_same_embed_dim``).

Example
-------
>>> from torch import nn
>>> from bayesprune.registry import internal_groups
>>> layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
>>> [(g.producer, g.width, g.consumers) for g in internal_groups(layer)]
[('linear1', 32, ('linear2',)), ('self_attn', 4, ())]
"""

from __future__ import annotations

from torch import nn

from ..registry import BlockSpec, InternalGroup, has_nodes, register_block
from .ops import ZERO_PRESERVING_FUNCTIONS, ZERO_PRESERVING_MODULES

__all__ = ["encoder_layer_groups", "vit_block_groups"]


def encoder_layer_groups(layer: nn.Module) -> list[InternalGroup]:
    """The feed-forward units of an ``nn.TransformerEncoderLayer`` (its heads are found as the
    internal nodes of ``self_attn``)."""
    act = layer.activation
    frozen = None
    if not (isinstance(act, ZERO_PRESERVING_MODULES) or act in ZERO_PRESERVING_FUNCTIONS):
        name = getattr(act, "__name__", type(act).__name__)
        frozen = f"the feed-forward activation {name!r}, not known to map 0 to 0"
    if not (has_nodes(layer.linear1) and has_nodes(layer.linear2)):
        return []
    return [InternalGroup("linear1", layer.linear1.out_features, ("linear2",), frozen)]


def vit_block_groups(block: nn.Module) -> list[InternalGroup]:
    """The feed-forward units of torchvision's ``EncoderBlock`` (``mlp``: ``Linear, GELU, Dropout,
    Linear, Dropout``); its heads are the internal nodes of ``self_attention``."""
    mlp = list(block.mlp)
    layers = [i for i, m in enumerate(mlp) if has_nodes(m)]
    if len(layers) != 2 or layers[0] != 0:
        return []  # not the MLP torchvision builds: its units are kept whole (the block's width)
    frozen = None
    for m in mlp[1 : layers[1]]:
        if not isinstance(m, ZERO_PRESERVING_MODULES):
            frozen = f"the feed-forward module {type(m).__name__!r}, not known to map 0 to 0"
    return [InternalGroup("mlp.0", mlp[0].out_features, (f"mlp.{layers[1]}",), frozen)]


def _no_nested_tensors(encoder: nn.Module) -> None:
    encoder.use_nested_tensor = False


register_block(nn.TransformerEncoderLayer, BlockSpec(encoder_layer_groups))
register_block(nn.TransformerEncoder, BlockSpec(lambda m: [], prepare=_no_nested_tensors))
# by name: bayesprune does not import torchvision (a second of start-up) to register its ViT block
register_block("torchvision.models.vision_transformer.EncoderBlock", BlockSpec(vit_block_groups))
