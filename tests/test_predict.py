"""``BayesianModule.predict``'s batched draws (issue 23) and streamed batches (issue 26), and the
fused KL of the training step (:func:`bayesprune.inference.model_kl`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune.inference import model_kl


def _mlp(prior=None, seed: int = 0) -> bp.BayesianModule:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    return bp.bayesianize(net) if prior is None else bp.bayesianize(net, prior=prior)


def _cnn(prior) -> bp.BayesianModule:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )  # fmt: skip
    return bp.bayesianize(net, prior=prior)


def _set_gate_logits(bnet: bp.BayesianModule, value: float) -> None:
    with torch.no_grad():
        for p in bnet.gate_parameters():
            p.fill_(value)


def _rows_seen(bnet: bp.BayesianModule, x: torch.Tensor) -> tuple[list[int], object]:
    """The rows of each forward pass of ``bnet.net`` from now on (after the one-example pass
    with which predict first decides, for inputs shaped like ``x``, whether to batch draws)."""
    bnet.predict(x[:1], num_samples=1)
    rows: list[int] = []
    handle = bnet.net.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    return rows, handle


def test_gates_fixed_on_give_the_deterministic_outputs() -> None:
    """Point weights with every gate on: each draw is the plain network, batched or not."""
    bnet = _mlp()
    _set_gate_logits(bnet, 40.0)  # sigmoid(40) == 1 in float32: every Bernoulli draw is 1
    x = torch.randn(10, 6)
    expected = torch.softmax(bnet(x, mode="mean"), -1)
    rows, handle = _rows_seen(bnet, x)
    p = bnet.predict(x, num_samples=8)
    handle.remove()
    assert rows == [80]  # one pass: the 8 draws of the 10 examples together
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bnet.predict(x, num_samples=8, batch_size=7), expected)


def test_batched_draws_match_separate_passes_within_monte_carlo_error() -> None:
    bnet = _mlp()
    _set_gate_logits(bnet, 0.0)  # q = 1/2: the draws vary a lot
    x = torch.randn(5, 6)
    s = 3000
    torch.manual_seed(1)
    p = bnet.predict(x, num_samples=s)
    # the reference: one forward pass per draw, as predict made them before
    torch.manual_seed(2)
    bnet.eval()
    with torch.no_grad(), bnet.mode("sample"):
        draws = torch.stack([torch.softmax(bnet.net(x), -1) for _ in range(s)])
    ref, se = draws.mean(0), draws.std(0) / s**0.5
    assert ((p - ref).abs() <= 5 * (2**0.5) * se + 1e-6).all()
    assert not torch.allclose(draws[0], draws[1])  # the check is not vacuous


def test_rows_per_pass_are_bounded() -> None:
    """50 examples x 32 draws never go through at once: at most batch_size rows per pass."""
    bnet = _mlp()
    x = torch.randn(50, 6)
    rows, handle = _rows_seen(bnet, x)
    p = bnet.predict(x, num_samples=32, batch_size=256)
    handle.remove()
    assert max(rows) <= 256 and sum(rows) == 50 * 32
    assert p.shape == (50, 3)
    torch.testing.assert_close(p.sum(-1), torch.ones(50))
    rows, handle = _rows_seen(bnet, x)
    bnet.predict(x, num_samples=32, batch_size=10)  # fewer rows than draws: draws split too
    handle.remove()
    assert max(rows) <= 10 and sum(rows) == 50 * 32
    with pytest.raises(ValueError, match="batch_size"):
        bnet.predict(x, batch_size=0)


def test_weights_drawn_once_per_pass_keep_one_pass_per_draw() -> None:
    """Gaussian weights of a convolution are one draw per pass in predict: batching the draws
    would share it between them, so each draw keeps its own pass (and chunks bound it)."""
    bnet = _cnn(bp.priors.SpikeAndSlab(level="node", weights="gaussian"))
    x = torch.randn(6, 1, 8, 8)
    rows, handle = _rows_seen(bnet, x)
    p = bnet.predict(x, num_samples=4, batch_size=4)
    handle.remove()
    assert rows == [4] * 4 + [2] * 4 and p.shape == (6, 3)
    # point weights: batched
    bnet = _cnn(bp.priors.SpikeAndSlab(level="node"))
    rows, handle = _rows_seen(bnet, x)
    bnet.predict(x, num_samples=4)
    handle.remove()
    assert rows == [24]


def test_the_probe_draws_nothing() -> None:
    """Deciding whether to batch leaves torch's random stream as it was."""
    bnet = _mlp()
    state = torch.get_rng_state()
    from bayesprune._predictive import draws_per_example

    assert draws_per_example(bnet, torch.randn(3, 6)) is True
    assert torch.equal(state, torch.get_rng_state()) is False  # randn above drew
    state = torch.get_rng_state()
    bnet.__dict__["_per_example"] = {}
    draws_per_example(bnet, torch.zeros(3, 6))
    assert torch.equal(state, torch.get_rng_state())


def test_seeded_predict_streams_batches_and_chunks_alike() -> None:
    bnet = _mlp()
    _set_gate_logits(bnet, 0.0)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    whole = bnet.predict(x, num_samples=6, seed=3)
    torch.testing.assert_close(bnet.predict(x, num_samples=6, seed=3, batch_size=7), whole)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    torch.testing.assert_close(bnet.predict(loader, num_samples=6, seed=3), whole)
    torch.testing.assert_close(bnet.predict([(x[:5],), (x[5:],)], num_samples=6, seed=3), whole)
    with pytest.raises(ValueError, match="empty"):
        bnet.predict([], num_samples=2)


def test_one_batch_of_a_loader_is_its_inputs() -> None:
    # predict(next(iter(loader))): the labels are not predicted as a second batch of inputs
    bnet = _mlp()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    whole = bnet.predict(x, num_samples=4, seed=1)
    torch.testing.assert_close(bnet.predict([x, y], num_samples=4, seed=1), whole)
    torch.testing.assert_close(bnet.predict((x,), num_samples=4, seed=1), whole)
    reg = bp.bayesianize(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6)),
                         likelihood="gaussian")  # fmt: skip
    out = reg.predict_regression([x, torch.randn(10, 6)], num_samples=4, seed=1)
    assert out.mean.shape == (10, 6)


def test_inputs_go_to_the_device_chunk_by_chunk(monkeypatch) -> None:
    bnet = _mlp()
    x = torch.randn(1000, 6)
    moved, to = [], torch.Tensor.to

    def recording(self, *args, **kwargs):
        moved.append(len(self))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording)
    bnet.predict(x, num_samples=4, batch_size=64)
    assert moved and max(moved) <= 64


def test_empty_batches_and_integer_types() -> None:
    bnet = _mlp()
    with pytest.raises(ValueError, match="0 examples"):
        bnet.predict(torch.zeros(0, 6), num_samples=2)
    p = bnet.predict(torch.randn(5, 6), num_samples=2, batch_size=np.int64(4))
    assert p.shape == (5, 3)


def test_predict_regression_batched_and_streamed() -> None:
    torch.manual_seed(0)
    bnet = bp.bayesianize(
        nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)), likelihood="gaussian"
    )
    x = torch.randn(12, 3)
    out = bnet.predict_regression(x, num_samples=16, batch_size=40)
    assert out.mean.shape == out.variance.shape == (12,)
    streamed = bnet.predict_regression([(x[:6],), (x[6:],)], num_samples=4, seed=0)
    whole = bnet.predict_regression(x, num_samples=4, seed=0)
    for a, b in zip(streamed, whole, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "prior",
    [
        None,
        bp.priors.SpikeAndSlab(level="node", weights="gaussian"),
        bp.priors.SpikeAndSlab(prior_log_odds=-1500.0),
        bp.priors.SpikeAndSlab(prior_log_odds=-0.3, per_parameter=True),
    ],
)
def test_model_kl_is_bnet_kl(prior) -> None:
    """The training step's KL (default layers' gate logits together) is ``bnet.kl()`` up to the
    order of its sums, with the same gradients."""
    bnet = _mlp(prior)
    bnet.num_data = 1000  # the default prior's price per example needs N
    with torch.no_grad():
        for p in bnet.gate_parameters() or bnet.structure_parameters():
            p.normal_()
    params = [p for p in bnet.parameters() if p.requires_grad]
    fused, plain = model_kl(bnet), bnet.kl()
    torch.testing.assert_close(fused, plain)
    g_fused = torch.autograd.grad(fused, params, allow_unused=True)
    g_plain = torch.autograd.grad(plain, params, allow_unused=True)
    for a, b in zip(g_fused, g_plain, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
