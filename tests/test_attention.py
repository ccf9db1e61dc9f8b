"""The Bayesian twin of nn.MultiheadAttention (one gate per head) inside transformer blocks."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune.attention import BayesianMultiheadAttention
from bayesprune.layers import BayesianLinear
from bayesprune.priors import theory_inclusion

E, H, FF, L, C = 16, 4, 8, 5, 3


class Classifier(nn.Module):
    """A 2-layer transformer encoder, mean-pooled, and a linear classification head."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(
            E, H, dim_feedforward=FF, dropout=0.0, batch_first=batch_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1 if self.batch_first else 0))


def _data(batch_first: bool = True, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, L, E, generator=gen)
    return (x if batch_first else x.transpose(0, 1)), torch.randint(0, C, (n,), generator=gen)


def test_one_gate_per_head_and_per_feed_forward_unit_with_named_pips() -> None:
    torch.manual_seed(0)
    bnet = bp.bayesianize(Classifier())
    pips = bnet.inclusion_probs()
    for i in range(2):
        assert pips[f"encoder.layers.{i}.self_attn"].shape == (H,)  # one per head
        assert pips[f"encoder.layers.{i}.linear1"].shape == (FF,)  # one per FFN unit
    attn = bnet.net.encoder.layers[1].self_attn
    assert isinstance(attn, BayesianMultiheadAttention)
    assert isinstance(bnet.net.encoder.layers[1].linear1, BayesianLinear)
    hd = E // H
    # one group per head: its q, k, v rows and biases and its out_proj columns
    assert attn.weight_loc.shape == (H, 4 * hd * E + 3 * hd)
    assert attn.group_size == 4 * hd * E + 3 * hd
    prior = bp.priors.SpikeAndSlab(level="node", prior_inclusion="theory")
    theory = bp.bayesianize(Classifier(), prior=prior).net.encoder.layers[0].self_attn
    assert prior.gamma(theory) == pytest.approx(theory_inclusion(H, 4 * hd * E + 3 * hd))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "prior", [bp.priors.SpikeAndSlab(level="node"), bp.priors.GroupHorseshoe()], ids=str
)
def test_the_posterior_mean_starts_as_the_dense_network(batch_first, prior) -> None:
    torch.manual_seed(0)
    net = Classifier(batch_first).eval()
    bnet = bp.bayesianize(net, prior=prior).eval()
    x, _ = _data(batch_first)
    with torch.no_grad(), bp.registry.fused_paths_off():
        dense = net(x)
        torch.testing.assert_close(bnet(x, mode="mean"), dense, atol=1e-5, rtol=0)
        torch.testing.assert_close(bnet.mean_module().eval()(x), dense, atol=1e-5, rtol=0)
        # eval without grad: PyTorch's fused encoder paths must not read the twins' tensors
        assert bnet.predict(x, num_samples=2).shape == (x.shape[1 - batch_first], C)


def test_a_switched_off_head_contributes_nothing() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    twin = BayesianMultiheadAttention.from_module(mha, bp.priors.SpikeAndSlab(level="node"))
    twin.mode = "mean"
    x = torch.randn(2, L, E)
    with torch.no_grad():
        twin.weight_loc[1] = 0  # head 1 zeroed: its gate off is the same function
        out = twin(x, x, x, need_weights=False)[0]
        plain = nn.MultiheadAttention(E, H, batch_first=True)
        twin.write_plain(plain, twin.weight_loc, None)
        assert plain.in_proj_weight[torch.tensor([4, 20, 36])].abs().sum() == 0  # q, k, v rows
        assert plain.out_proj.weight[:, 4:8].abs().sum() == 0
    torch.testing.assert_close(out, plain(x, x, x, need_weights=False)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "prior", [bp.priors.SpikeAndSlab(level="node"), bp.priors.GroupHorseshoe()], ids=str
)
def test_a_few_fit_steps_run_and_move_the_head_gates(prior) -> None:
    torch.manual_seed(0)
    bnet = bp.bayesianize(Classifier(), prior=prior)
    x, y = _data()
    attn = bnet.net.encoder.layers[0].self_attn
    before = {n: p.detach().clone() for n, p in attn.named_parameters()}
    result = bp.fit(bnet, [(x, y)], epochs=3, lr=1e-2, num_data=8, progress=False)
    assert len(result.loss) >= 3 and torch.isfinite(torch.tensor(result.loss)).all()
    moved = [n for n, p in attn.named_parameters() if not torch.equal(before[n], p)]
    assert any(
        n in moved
        for n in bnet.priors["encoder.layers.0.self_attn"].structure_parameter_names(attn)
    )
    assert bnet.predict(x, num_samples=3).shape == (8, C)


def test_pyro_model_and_guide_name_the_head_sites() -> None:
    torch.manual_seed(0)
    bnet = bp.bayesianize(Classifier())
    x, y = _data()
    bnet.num_data = 8
    trace = pyro.poutine.trace(bnet.guide).get_trace(x, y)
    assert trace.nodes["encoder.layers.1.self_attn.gate"]["value"].shape == (H,)
    model = pyro.poutine.trace(pyro.poutine.replay(bnet.model, trace=trace)).get_trace(x, y)
    assert torch.isfinite(model.log_prob_sum())


def test_a_saved_module_loads_back(tmp_path) -> None:
    torch.manual_seed(0)
    bnet = bp.bayesianize(Classifier(), prior=bp.priors.GroupHorseshoe())
    with torch.no_grad():
        bnet.net.encoder.layers[0].self_attn.weight_loc.mul_(0.5)
    bnet.save(tmp_path / "b.safetensors")
    back = bp.load(tmp_path / "b.safetensors", Classifier())
    x, _ = _data()
    with torch.no_grad():
        torch.testing.assert_close(back(x, mode="mean"), bnet(x, mode="mean"))
