"""Physical pruning of attention heads and feed-forward units, exact against the masked network."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune.pruning.attention import AttentionHeads
from bayesprune.registry import fused_paths_off

E, H, FF, L, C, B = 16, 4, 8, 5, 3, 2
HD = E // H


class Net(nn.Module):
    """MHA alone, one TransformerEncoderLayer or a 2-layer TransformerEncoder; mean-pool + Linear."""

    def __init__(self, kind: str, batch_first: bool, norm_first: bool = False) -> None:
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        if kind == "mha":
            self.body = nn.MultiheadAttention(E, H, batch_first=batch_first)
        else:
            layer = nn.TransformerEncoderLayer(
                E, H, FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first
            )
            encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
            self.body = layer if kind == "layer" else encoder
        self.head = nn.Linear(E, C)

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        if self.kind == "mha":
            h = self.body(
                x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False
            )[0]
        elif self.kind == "layer":
            h = self.body(x, src_mask=attn_mask, src_key_padding_mask=key_padding_mask)
        else:
            h = self.body(x, mask=attn_mask, src_key_padding_mask=key_padding_mask)
        return self.head(h.mean(1 if self.batch_first else 0))


def _inputs(batch_first: bool, masks: str) -> tuple:
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(1))
    x = x if batch_first else x.transpose(0, 1).contiguous()
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, 3:] = True
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    return {
        "none": (x,),
        "padding": (x, kpm),
        "both": (x, kpm, causal),
    }[masks]


def _node_masks(bnet: bp.BayesianModule) -> dict[str, torch.Tensor]:
    masks = {}
    for path in bnet.inclusion_probs():
        if path.endswith("self_attn") or path == "body":
            masks[path] = torch.tensor([True, False, True, False])  # heads 1 and 3 off
        elif path.endswith("linear1"):
            masks[path] = torch.arange(FF) < 3
    return masks


def _assert_exact(bnet, masks, inputs, **kwargs) -> nn.Module:
    small = bp.prune(bnet, masks=masks, example_input=inputs, **kwargs)
    reference = bnet.mean_module(masks).eval()
    with torch.no_grad(), fused_paths_off():
        torch.testing.assert_close(small(*inputs), reference(*inputs), atol=1e-5, rtol=0)
    return small


CASES = [("mha", False), ("layer", False), ("layer", True), ("encoder", False)]


@pytest.mark.parametrize("masks", ["none", "padding", "both"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(("kind", "norm_first"), CASES)
def test_pruned_heads_and_units_are_exact(kind, norm_first, batch_first, masks) -> None:
    torch.manual_seed(0)
    bnet = bp.bayesianize(Net(kind, batch_first, norm_first)).eval()
    node_masks = _node_masks(bnet)
    small = _assert_exact(bnet, node_masks, _inputs(batch_first, masks))
    attns = [m for m in small.modules() if isinstance(m, bp.PrunedMultiheadAttention)]
    assert len(attns) == (2 if kind == "encoder" else 1)
    assert all(a.num_heads == 2 and a.head_dim == HD and a.embed_dim == E for a in attns)
    assert all(a.in_proj_weight.shape == (3 * 2 * HD, E) for a in attns)
    linears = [m for n, m in small.named_modules() if n.endswith("linear1")]
    assert all(m.out_features == 3 for m in linears)
    assert small.head.in_features == E  # the residual stream / embedding width stays


def test_all_heads_off_keeps_one_by_default_and_none_with_min_nodes_0() -> None:
    torch.manual_seed(0)
    bnet = bp.bayesianize(Net("layer", True)).eval()
    off = {"body.self_attn": torch.zeros(H, dtype=torch.bool)}
    inputs = _inputs(True, "padding")
    with pytest.warns(UserWarning, match="keep 0 of 4 nodes"):  # the floor keeps the best head
        small = bp.prune(bnet, masks=off, example_input=inputs)
    assert small.body.self_attn.num_heads == 1
    off["body.linear1"] = torch.zeros(FF, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = _assert_exact(bnet, off, inputs, min_nodes=0)
    # no head left: the attention branch is the out_proj bias; no feed-forward unit left either
    assert small.body.self_attn.num_heads == 0 and small.body.linear1.out_features == 0
    x = inputs[0]
    out = small.body.self_attn(x, x, x)[0]
    torch.testing.assert_close(out, small.body.self_attn.out_proj.bias.expand_as(out))


def test_pruned_attention_with_every_head_is_nn_multihead_attention() -> None:
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(E, H, batch_first=batch_first, dropout=0.2).eval()
        same = AttentionHeads().select(mha, torch.arange(H)).eval()
        x = torch.randn(B, L, E) if batch_first else torch.randn(L, B, E)
        kpm = torch.tensor([[False] * L, [False] * 3 + [True] * 2])
        for kw in ({}, {"key_padding_mask": kpm}, {"average_attn_weights": False}):
            a, b = mha(x, x, x, **kw), same(x, x, x, **kw)
            torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)
        unbatched = x[0] if batch_first else x[:, 0]
        torch.testing.assert_close(
            mha(unbatched, unbatched, unbatched)[0], same(unbatched, unbatched, unbatched)[0]
        )


def _attention_macs(heads: int) -> int:
    d = heads * HD
    return 3 * L * E * d + 3 * L * d + 2 * L * L * d + L * d * E + L * E


def test_flops_count_attention_with_its_sequence_terms() -> None:
    torch.manual_seed(0)
    bnet = bp.bayesianize(Net("encoder", True)).eval()
    dense = bnet.mean_module().eval()
    x = _inputs(True, "none")[0]
    small = bp.prune(bnet, masks=_node_masks(bnet), example_input=x)
    ffn = lambda units: L * (E * units + units) + L * (units * E + E)  # noqa: E731
    head = E * C + C
    assert _attention_macs(4) == 6240  # by hand: 3840 + 240 + 800 + 1280 + 80
    assert bp.count_flops(dense, x) == 2 * (_attention_macs(4) + ffn(FF)) + head
    assert bp.count_flops(small, x) == 2 * (_attention_macs(2) + ffn(3)) + head
    by_layer = bp.metrics.flops_by_layer(small, x)
    assert by_layer["body.layers.0.self_attn"] == _attention_macs(2)
    rep = bp.compression_report(dense, small, x, batch_sizes=(), progress=False)
    assert rep.flops_before == bp.count_flops(dense, x)
    assert rep.flops_after == bp.count_flops(small, x)
    attn = next(s for s in rep.layers if s.name == "body.layers.1.self_attn")
    assert (attn.width_before, attn.width_after) == (H, 2)
    assert attn.params_before == 4 * E * E + 4 * E  # in_proj and out_proj, biases included
    assert attn.params_after == 4 * E * 2 * HD + 3 * 2 * HD + E
    assert rep.params_after == bp.count_params(small)


def test_a_pruned_transformer_saves_and_loads(tmp_path) -> None:
    torch.manual_seed(0)
    bnet = bp.bayesianize(Net("encoder", False)).eval()
    inputs = _inputs(False, "padding")
    small = bp.prune(bnet, masks=_node_masks(bnet), example_input=inputs)
    bp.save_pruned(small, tmp_path / "small.safetensors")
    back = bp.load_pruned(tmp_path / "small.safetensors", lambda: Net("encoder", False)).eval()
    assert isinstance(back.body.layers[1].self_attn, bp.PrunedMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(back(*inputs), small(*inputs))
    # and once more: a pruned net prunes again (its heads are nodes too)
    again = bp.prune(small, masks={"body.layers.0.self_attn": torch.tensor([True, False])},
                     example_input=inputs)  # fmt: skip
    assert again.body.layers[0].self_attn.num_heads == 1


def test_an_unknown_feed_forward_activation_keeps_the_units_whole() -> None:
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, activation=torch.sigmoid)
    net = nn.Sequential(nn.Identity(), layer).eval()
    x = torch.randn(L, B, E)
    with pytest.warns(UserWarning, match="only zeroed.*not known to map 0 to 0"):
        small = bp.prune_module(net, {"1.linear1": torch.arange(FF) < 3}, x)
    assert small[1].linear1.out_features == FF


def test_self_compression_takes_a_transformer_and_prunes_it_physically() -> None:
    """The baselines that apply accept transformers: self-compression ranks heads and
    feed-forward units by SNR and removes them, and the result runs without Pyro."""
    from torch.utils.data import DataLoader, TensorDataset

    from bayesprune.baselines import SelfCompression

    torch.manual_seed(0)
    net = Net("encoder", batch_first=True)
    x, y = torch.randn(64, L, E), torch.randint(0, C, (64,))
    train = DataLoader(TensorDataset(x, y), batch_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = SelfCompression("snr", epochs=1, rounds=1, round_epochs=1, progress=False, seed=0)
        small = pm.fit(net, train).prune(0.5)
    assert bp.count_params(small) < bp.count_params(net)
    assert not any("pyro" in type(m).__module__ for m in small.modules())
    assert small(x).shape == (64, C)
