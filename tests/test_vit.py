"""torchvision's VisionTransformer: one gate per head and per MLP unit of its EncoderBlocks, pruned
physically and exactly (the class token, positional embedding and embedding width stay)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune.registry import block_spec, internal_groups

vit = pytest.importorskip("torchvision.models.vision_transformer")

IMG, P, LAYERS, H, E, MLP, C, B = 8, 4, 2, 4, 16, 8, 3, 2
HD, S = E // H, (IMG // P) ** 2 + 1  # head width; sequence length: 4 patches + the class token


def tiny_vit() -> nn.Module:
    """A 2-block ViT on 1-channel 8x8 images (conv_proj swapped for a 1-channel one)."""
    net = vit.VisionTransformer(
        image_size=IMG, patch_size=P, num_layers=LAYERS, num_heads=H, hidden_dim=E, mlp_dim=MLP,
        num_classes=C,
    )  # fmt: skip
    net.conv_proj = nn.Conv2d(1, E, P, P)
    return net


def _x() -> torch.Tensor:
    return torch.randn(B, 1, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _masks() -> dict[str, torch.Tensor]:
    masks = {}
    for i in range(LAYERS):
        block = f"encoder.layers.encoder_layer_{i}"
        masks[f"{block}.self_attention"] = torch.tensor([True, False, True, i == 1])
        masks[f"{block}.mlp.0"] = torch.arange(MLP) < 3 + i
    return masks


def _bnet() -> bp.BayesianModule:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="pos_embedding"):  # a point estimate, as documented
        return bp.bayesianize(tiny_vit()).eval()


def test_the_encoder_block_is_registered_by_name_with_its_mlp_units() -> None:
    block = tiny_vit().encoder.layers[0]
    assert block_spec(block) is not None and block_spec(type(block)) is not None
    groups = [(g.producer, g.width, g.consumers, g.frozen) for g in internal_groups(block)]
    assert groups == [("mlp.0", MLP, ("mlp.3",), None), ("self_attention", H, (), None)]


def test_one_gate_per_head_and_per_mlp_unit_with_named_pips() -> None:
    pips = _bnet().inclusion_probs()
    for i in range(LAYERS):
        assert pips[f"encoder.layers.encoder_layer_{i}.self_attention"].shape == (H,)
        assert pips[f"encoder.layers.encoder_layer_{i}.mlp.0"].shape == (MLP,)


def test_pruned_heads_and_mlp_units_are_exact() -> None:
    bnet, x = _bnet(), _x()
    small = bp.prune(bnet, masks=_masks(), example_input=x)
    with torch.no_grad():
        torch.testing.assert_close(
            small(x), bnet.mean_module(_masks()).eval()(x), atol=1e-5, rtol=0
        )
    for i, (heads, units) in enumerate([(2, 3), (3, 4)]):
        block = small.encoder.layers[i]
        assert isinstance(block.self_attention, bp.PrunedMultiheadAttention)
        assert (block.self_attention.num_heads, block.self_attention.embed_dim) == (heads, E)
        assert block.mlp[0].out_features == units and block.mlp[3].in_features == units
    # the embedding: its width, the class token and the positional embedding stay as they were
    assert small.conv_proj.out_channels == E and small.class_token.shape == (1, 1, E)
    torch.testing.assert_close(small.encoder.pos_embedding, bnet.net.encoder.pos_embedding)


def test_flops_by_hand_and_a_saved_pruned_vit_loads(tmp_path) -> None:
    bnet, x = _bnet(), _x()
    dense = bnet.mean_module().eval()
    small = bp.prune(bnet, masks=_masks(), example_input=x)

    def attention(h: int) -> int:  # q, k, v; scores and weighted sum; out_proj (with biases)
        d = h * HD
        return 3 * S * E * d + 3 * S * d + 2 * S * S * d + S * d * E + S * E

    def mlp(units: int) -> int:
        return S * (E * units + units) + S * (units * E + E)

    fixed = (S - 1) * (E * P * P + E) + (E * C + C)  # conv_proj (patches) and the class head
    assert fixed == 1088 + 51  # LayerNorms are not counted (only BatchNorms, folded or not)
    assert bp.count_flops(dense, x) == fixed + LAYERS * (attention(H) + mlp(MLP))
    assert bp.count_flops(small, x) == fixed + attention(2) + mlp(3) + attention(3) + mlp(4)
    by_layer = bp.metrics.flops_by_layer(small, x)
    assert by_layer["encoder.layers.encoder_layer_1.self_attention"] == attention(3)

    bp.save_pruned(small, tmp_path / "vit.safetensors")
    back = bp.load_pruned(tmp_path / "vit.safetensors", tiny_vit).eval()
    assert back.encoder.layers[1].self_attention.num_heads == 3
    assert back.encoder.layers[0].mlp[0].out_features == 3
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x))


def test_structured_magnitude_pruning_scores_heads_and_mlp_units() -> None:
    torch.manual_seed(0)
    net, x = tiny_vit().eval(), _x()
    method = bp.baselines.MagnitudePruning(structured=True).fit(net, example_input=x)
    blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(LAYERS)]
    expected = {f"{b}.{n}": w for b in blocks for n, w in (("self_attention", H), ("mlp.0", MLP))}
    assert {k: v.numel() for k, v in method.scores.items()} == expected
    small = method.prune(0.5)  # half of the 24 heads and units, ranked globally by relative norm
    kept = sum(b.self_attention.num_heads + b.mlp[0].out_features for b in small.encoder.layers)
    assert kept == 12 and small.conv_proj.out_channels == E
    with torch.no_grad():
        masked = bp.zero_masked(net, method.masks(0.5))
        torch.testing.assert_close(small(x), masked(x), atol=1e-5, rtol=0)


def test_certify_takes_a_vit() -> None:
    from bayesprune.certificate import certify
    from bayesprune.data import loader

    bnet, gen = _bnet(), torch.Generator().manual_seed(2)
    xs, ys = torch.randn(64, 1, IMG, IMG, generator=gen), torch.randint(0, C, (64,), generator=gen)
    cal = loader(torch.utils.data.TensorDataset(xs, ys), 32, shuffle=False)
    with torch.no_grad():  # half of the heads' gates off
        for block in bnet.net.encoder.layers:
            block.self_attention.gate_logit[1::2] = -10.0
    cert = certify(bnet, cal, alpha=0.5, reference="mean", example_input=xs[:2], progress=False)
    assert cert.curve and all(0 < row["params_kept"] <= 1 for row in cert.curve)
    # the heads whose gates are off are removed: exact, so the mean network's risk is 0
    assert [b.self_attention.num_heads for b in cert.model.encoder.layers] == [2, 2]
