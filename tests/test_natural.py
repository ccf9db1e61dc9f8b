import pytest
import torch

import bayesprune as bp
from bayesprune.natural import BernoulliNaturalGradient
from bayesprune.priors import _kl_bernoulli


def test_a_full_step_lands_on_the_optimum_of_the_bernoulli_factor() -> None:
    """With rho = 1 the step is coordinate ascent: theta = logit(gamma) + G / beta - K."""
    gamma, beta = 0.1, 0.5
    g, k = torch.tensor([20.0, 0.0, -5.0]), torch.tensor([2.0, 1.0, 0.0])
    logit = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    q = torch.sigmoid(logit)
    # loss = -q G + beta (KL(Bern(q) || Bern(gamma)) + q K), the tempered objective in q
    (-(q * g) + beta * (_kl_bernoulli(logit, gamma) + q * k)).sum().backward()
    step = BernoulliNaturalGradient([logit], lr=1.0, max_logit=50.0)
    step.beta = beta
    step.step()
    expected = torch.logit(torch.tensor(gamma)) + g / beta - k
    torch.testing.assert_close(logit.detach(), expected, rtol=1e-5, atol=1e-4)


def test_a_damped_step_moves_a_fraction_of_the_way_and_logits_stay_bounded() -> None:
    logit = torch.nn.Parameter(torch.zeros(2))
    (torch.sigmoid(logit) * torch.tensor([-100.0, 4.0])).sum().backward()
    step = BernoulliNaturalGradient([logit], lr=0.25, max_logit=8.0)
    step.step()
    torch.testing.assert_close(logit.detach(), torch.tensor([8.0, -1.0]))  # 25 clipped to 8


@pytest.mark.parametrize("lr", [0.0, 1.5, -0.1])
def test_the_step_size_is_checked(lr) -> None:
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        BernoulliNaturalGradient([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    with pytest.raises(ValueError, match="gate_step"):
        bnet = bp.bayesianize(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)))
        data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        bp.fit(bnet, data, num_data=8, gate_step=lr if lr else 2.0, progress=False)


def test_gates_separate_within_a_short_fit_whatever_the_step_count() -> None:
    """Adam moved every gate about structure_lr per step (lockstep): after a short fit every PIP
    sat where the step count put it. The natural step splits them within a few hundred steps."""
    from bayesprune.data import load_digits, loader

    splits = load_digits()
    train = loader(splits.train, 128, seed=0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    bp.train(net, train, epochs=20, progress=False, seed=0)
    bnet = bp.bayesianize(net)
    bp.fit(bnet, train, epochs=30, progress=False, seed=0)  # 240 steps
    pip = bnet.inclusion_probs()["1"]
    assert ((pip < 0.05) | (pip > 0.95)).float().mean() > 0.9, pip
    assert (pip < 0.05).any() and (pip > 0.95).any(), pip  # they moved apart from 0.95


def test_all_logits_in_one_step_give_the_bits_of_one_tensor_at_a_time() -> None:
    """The step runs as multi-tensor operators over all the layers' logits (grouped by dtype); a
    logit without a gradient is left alone; the numbers are those of the per-tensor step."""
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(n, dtype=dtype) * 6)
        for n, dtype in [(5, torch.float32), (300, torch.float32), (7, torch.float64), (1, torch.float32)]
    ]  # fmt: skip
    for p in params:
        p.grad = torch.randn_like(p) * 50
    params[1].grad = None
    expected = []
    for p in params:
        new = p.detach().clone()
        if p.grad is not None:
            q = torch.sigmoid(new)
            new.sub_(p.grad / (q * (1 - q)).clamp_min(1e-12), alpha=0.3 / 0.7)
            new.clamp_(-8.0, 8.0)
        expected.append(new)
    step = BernoulliNaturalGradient(params, lr=0.3)
    step.beta = 0.7
    step.step()
    assert all(torch.equal(p.detach(), e) for p, e in zip(params, expected, strict=True))
    assert any((e.abs() == 8.0).any() for e in expected)  # the bound was reached
