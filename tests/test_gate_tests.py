import warnings

import pytest
import torch
from helpers import fit_options_of_cli

import bayesprune as bp
from bayesprune.gate_tests import GateTests
from bayesprune.natural import BernoulliNaturalGradient


def _planted(n: int = 256, bn: bool = False):
    """Hidden unit 0 carries the label (y = x0 > 0); units 1 and 2 have zero weights."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 3)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(3))
    net = torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Linear(3, 2))
    bnet = bp.bayesianize(net)
    first, last = bnet.bayesian_layers["0"], bnet.bayesian_layers[str(len(layers) + 1)]
    with torch.no_grad():
        first.weight_loc.zero_()
        first.weight_loc[0, 0] = 5.0
        first.bias_loc.zero_()
        last.weight_loc.zero_()
        last.weight_loc[1, 0], last.weight_loc[0, 0] = 4.0, -4.0
        last.bias_loc.copy_(torch.tensor([1.0, -1.0]))
    x = torch.randn(n, 4)
    bnet.num_data = n
    bnet.train()
    return bnet, first, x, (x[:, 0] > 0).long()


def _propose_all_off(bnet, first, tests: GateTests) -> BernoulliNaturalGradient:
    """Every gate of the first layer at +8, with a summed gradient that switches it off."""
    natural = BernoulliNaturalGradient(tests.gates, lr=1.0)
    with torch.no_grad():
        first.gate_logit.fill_(8.0)
    first.gate_logit.grad = torch.full_like(first.gate_logit, 1.0)  # dq: 1 / (q (1 - q)) ~ 3000
    before = tests.before_step()
    natural.step()
    assert (first.gate_logit < 0).all()  # the natural step proposes to switch all three off
    tests.after_step(natural, before)
    return natural


def test_a_needed_node_is_kept_and_the_useless_ones_are_switched_off() -> None:
    bnet, first, x, y = _planted()
    tests = GateTests(bnet, [first.gate_logit], 256)
    tests.collect(x, y)
    _propose_all_off(bnet, first, tests)
    # unit 0 carries the label: switching it off costs far more NLL than the KL it saves
    assert first.gate_logit.tolist() == [8.0, -8.0, -8.0]
    assert tests.counts == {"tests": 3, "switched_off": 2, "switched_on": 0, "refused": 1}
    assert first.gate_logit.grad.abs().sum() == 0  # every tested gate starts a fresh sum


def test_a_refused_gate_is_held_for_the_rest_of_the_epoch_and_one_more() -> None:
    bnet, first, x, y = _planted()
    tests = GateTests(bnet, [first.gate_logit], 256)
    tests.collect(x, y)
    natural = _propose_all_off(bnet, first, tests)
    assert tests.summary()["held"] == 1
    for epoch, held in [(0, True), (1, True), (2, False)]:
        tests.epoch = epoch
        first.gate_logit.grad = torch.tensor([1.0, 0.0, 0.0])
        before = tests.before_step()
        natural.step()
        tests.after_step(natural, before)
        if held:  # the step is undone and the pressure cleared
            assert first.gate_logit[0] == 8.0 and first.gate_logit.grad[0] == 0
    # released at epoch 2: proposed again, tested again, refused again, now held two epochs more
    assert tests.counts["refused"] == 2 and int(tests.held_until[0][0]) == 2 + 2 + 1


def test_a_switch_on_that_pays_is_taken() -> None:
    bnet, first, x, y = _planted()
    tests = GateTests(bnet, [first.gate_logit], 256)
    tests.collect(x, y)
    natural = BernoulliNaturalGradient(tests.gates, lr=1.0)
    with torch.no_grad():
        first.gate_logit.fill_(-8.0)
    first.gate_logit.grad = torch.full_like(first.gate_logit, -1.0)  # all three proposed on
    before = tests.before_step()
    natural.step()
    tests.after_step(natural, before)
    assert first.gate_logit.tolist() == [8.0, -8.0, -8.0]  # only the unit the labels need
    assert tests.counts["switched_on"] == 1 and tests.counts["refused"] == 2


def test_tests_use_the_first_examples_and_leave_batchnorm_and_random_state_alone() -> None:
    bnet, first, x, y = _planted(bn=True)
    tests = GateTests(bnet, [first.gate_logit], 100)
    tests.collect(x[:64], y[:64])
    tests.collect(x[64:128], y[64:128])
    tests.collect(x[128:], y[128:])
    assert tests.count == 100 and [len(b) for _, b in tests.examples] == [100]  # one batch
    stats = [b.clone() for b in bnet.buffers()]
    rng = torch.random.get_rng_state()
    _propose_all_off(bnet, first, tests)
    assert all(torch.equal(a, b) for a, b in zip(stats, bnet.buffers(), strict=True))
    assert torch.equal(rng, torch.random.get_rng_state())
    assert first.gate_logit[0] == 8.0


def _data(n: int = 512):
    torch.manual_seed(0)
    x = torch.randn(n, 4)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    return torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)


def _net():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def test_fit_runs_the_tests_by_default_and_reports_them() -> None:
    loader = _data()
    bnet = bp.bayesianize(_net())
    result = bp.fit(bnet, loader, epochs=30, lr=1e-2, progress=False, seed=0)
    report = result.gate_tests
    assert report["tests"] > 0
    assert report["tests"] == report["switched_off"] + report["switched_on"] + report["refused"]
    assert bp.evaluate(bp.prune(bnet, threshold=0.5), loader) > 0.95
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two epochs: the PIPs are not decided yet, it says so
        off = bp.fit(bp.bayesianize(_net()), loader, epochs=2, progress=False, gate_tests=None)
    assert off.gate_tests == {}


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "256"])
def test_gate_tests_must_be_a_positive_count_or_none(bad) -> None:
    with pytest.raises(ValueError, match="gate_tests must be a positive number"):
        bp.fit(bp.bayesianize(_net()), _data(64), epochs=1, progress=False, gate_tests=bad)


def test_the_cli_passes_gate_tests_to_fit(tmp_path, monkeypatch, capsys) -> None:
    from bayesprune.cli import main

    assert fit_options_of_cli(tmp_path, monkeypatch, "--subset", "500")["gate_tests"] == 256
    seen = fit_options_of_cli(tmp_path, monkeypatch, "--subset", "500", "--gate-tests", "none")
    assert seen["gate_tests"] is None
    seen = fit_options_of_cli(tmp_path, monkeypatch, "--subset", "500", "--gate-tests", "64")
    assert seen["gate_tests"] == 64
    argv = ["fit", "--model", "lenet_300_100", "--out", str(tmp_path / "bad"), "--gate-tests", "0"]
    assert main(argv) == 2
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_a_switch_is_taken_exactly_when_it_lowers_nll_plus_beta_kl() -> None:
    """The tempered rule: off when NLL(off) - NLL(on) < beta (KL(on) - KL(off)); the cost of a
    unit that helps a little is measured here independently of the tests, and the decision flips
    between a beta 20% below and 20% above the break-even."""
    bnet, first, x, y = _planted()
    last = bnet.bayesian_layers["2"]
    with torch.no_grad():  # unit 1 carries a weak copy of the label
        first.weight_loc[1, 0] = 0.3
        last.weight_loc[1, 1], last.weight_loc[0, 1] = 0.3, -0.3

    def nll(gates) -> float:
        with torch.no_grad():
            first.gate_logit.copy_(torch.tensor(gates) * float("inf"))
            torch.manual_seed(0)
            return float(-bnet.log_likelihood(bnet(x), y).sum())

    def kl(gates) -> float:
        with torch.no_grad():
            first.gate_logit.copy_(torch.tensor(gates) * 8.0)
            return float(first.kl())

    cost = nll([1.0, -1.0, -1.0]) - nll([1.0, 1.0, -1.0])
    saving = kl([1.0, 1.0, -1.0]) - kl([1.0, -1.0, -1.0])
    assert cost > 0 and saving > 0
    for beta, taken in [(0.8 * cost / saving, False), (1.25 * cost / saving, True)]:
        tests = GateTests(bnet, [first.gate_logit], 256)
        tests.collect(x, y)
        natural = BernoulliNaturalGradient(tests.gates, lr=1.0)
        natural.beta = beta
        with torch.no_grad():
            first.gate_logit.copy_(torch.tensor([8.0, 8.0, -8.0]))
        first.gate_logit.grad = torch.tensor([0.0, 1.0, 0.0])  # propose unit 1 off
        before = tests.before_step()
        natural.step()
        tests.after_step(natural, before)
        assert (first.gate_logit[1] < 0) == taken, (beta, cost / saving)
        assert tests.counts["tests"] == 1


def test_an_interrupted_test_puts_the_gates_back_as_before_the_step(monkeypatch) -> None:
    bnet, first, x, y = _planted(bn=True)
    tests = GateTests(bnet, [first.gate_logit], 256)
    tests.collect(x, y)
    natural = BernoulliNaturalGradient(tests.gates, lr=1.0)
    with torch.no_grad():
        first.gate_logit.fill_(8.0)
    first.gate_logit.grad = torch.full_like(first.gate_logit, 1.0)
    stats = [b.clone() for b in bnet.buffers()]
    calls = []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = bnet.log_likelihood
    monkeypatch.setattr(bnet, "log_likelihood", stop)
    before = tests.before_step()
    natural.step()
    with pytest.raises(KeyboardInterrupt):
        tests.after_step(natural, before)
    assert first.gate_logit.tolist() == [8.0, 8.0, 8.0]
    assert all(torch.equal(a, b) for a, b in zip(stats, bnet.buffers(), strict=True))


def test_fits_with_other_priors_and_small_batchnorm_batches_run_with_the_tests() -> None:
    torch.manual_seed(0)
    x = torch.randn(300, 4)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )
    mixed = {"0": bp.priors.SpikeAndSlab(), "3": bp.priors.GroupHorseshoe()}
    # batches of 5: 256 = 51 x 5 + 1, the examples must not be evaluated in pieces of one
    loader = torch.utils.data.DataLoader(data, batch_size=5, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few epochs: the PIPs need not be decided
        result = bp.fit(bp.bayesianize(net, prior=mixed), loader, epochs=2, progress=False)
    assert set(result.gate_tests) >= {"tests", "refused"}
    small = torch.utils.data.TensorDataset(x[:100], (x[:100, 0] > 0).long())
    tests_of = {}
    original = GateTests.collect

    def spy(self, xb, yb):
        tests_of["t"] = self
        original(self, xb, yb)

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as m:
        warnings.simplefilter("ignore")
        m.setattr(GateTests, "collect", spy)
        bp.fit(bp.bayesianize(_net()), torch.utils.data.DataLoader(small, batch_size=32),
               epochs=3, progress=False)  # fmt: skip
    assert tests_of["t"].count == 100  # at most the training set, no example twice


def test_the_replayed_passes_decide_as_whole_passes(monkeypatch) -> None:
    """bayesprune.replay hands back the outputs before the tested layer: the same decisions as
    computing every pass whole (a budget of 0 bytes), on a net with BatchNorm, an in-place ReLU
    and a residual addition."""
    import functools

    import bayesprune.gate_tests as gate_tests_module
    from bayesprune.replay import ForwardReplay

    def fitted(budget: int | None):
        if budget is not None:
            replay = functools.partial(ForwardReplay, budget=budget)
            monkeypatch.setattr(gate_tests_module, "ForwardReplay", replay)
        torch.manual_seed(0)
        x = torch.randn(256, 1, 8, 8)
        y = (x[:, 0, :4].mean((1, 2)) > 0).long()
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True
        )
        bnet = bp.bayesianize(_residual_net())
        result = bp.fit(bnet, loader, epochs=30, lr=1e-2, progress=False, seed=0)
        gates = [p.detach().clone() for p in bnet.gate_parameters()]
        return {k: v for k, v in result.gate_tests.items() if k != "seconds"}, gates

    replayed, gates = fitted(None)
    whole, whole_gates = fitted(0)
    assert replayed["tests"] > 10
    assert replayed == whole
    assert all(torch.equal(a, b) for a, b in zip(gates, whole_gates, strict=True))


@pytest.mark.parametrize("net", ["residual", "mlp"])
def test_the_multipliers_drawn_without_random_numbers_decide_as_the_random_draws(
    monkeypatch, net: str
) -> None:
    """The tests draw the node multipliers of their median model (every gate at +-inf) without
    random numbers (``BayesianLayer.gates_decided``): the same fit, bit for bit, as with the
    random draws, on a net with BatchNorm, an in-place ReLU and a residual addition, and on an
    MLP with dropout after its gated layers; the flags are down once the tests are done."""
    import bayesprune.priors.spike_slab as spike_slab
    from bayesprune.layers import BayesianLayer

    decided = {"calls": 0}
    real = spike_slab.decided_gate

    def spy(logit, batch=None):
        decided["calls"] += 1
        assert torch.isinf(logit).all()  # the precondition
        return real(logit, batch)

    monkeypatch.setattr(spike_slab, "decided_gate", spy)

    def fitted(seeded: bool):
        with monkeypatch.context() as m:
            if not seeded:  # the flags never go up: every multiplier drawn at random
                m.setattr(
                    BayesianLayer, "gates_decided", property(lambda s: False, lambda s, v: None)
                )
            torch.manual_seed(0)
            if net == "residual":
                x = torch.randn(256, 1, 8, 8)
                y = (x[:, 0, :4].mean((1, 2)) > 0).long()
                model = _residual_net()
            else:
                x = torch.randn(256, 6)
                y = (x[:, 0] + x[:, 1] > 0).long()
                model = torch.nn.Sequential(
                    torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                    torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                    torch.nn.Linear(16, 2),
                )  # fmt: skip
            loader = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True
            )
            bnet = bp.bayesianize(model)
            result = bp.fit(bnet, loader, epochs=30, lr=1e-2, progress=False, seed=0)
        assert not any(layer.gates_decided for layer in bnet.bayesian_layers.values())
        tests = {k: v for k, v in result.gate_tests.items() if k != "seconds"}
        return tests, bnet.state_dict()

    decided_tests, decided_state = fitted(True)
    assert decided["calls"] > 0 and decided_tests["tests"] > 10
    calls = decided["calls"]
    random_tests, random_state = fitted(False)
    assert decided["calls"] == calls  # none without the flags
    assert decided_tests == random_tests
    assert decided_state.keys() == random_state.keys()
    assert all(torch.equal(decided_state[k], random_state[k]) for k in decided_state)


def _residual_net() -> torch.nn.Module:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm2d(8)
            self.relu = torch.nn.ReLU(inplace=True)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out += x
            return self.relu(out)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.blocks = torch.nn.Sequential(Block(), Block())
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))

    return Net()


def test_the_kl_change_of_a_switch_is_exact_when_a_gate_costs_thousands_of_nats() -> None:
    """A layer of 8,192 gates on at prior log-odds -1500 sums to about 1.2e7 nats of KL, where a
    float32 step is 1 nat: the change of one switch is measured with the other gates off."""
    from bayesprune.priors._math import kl_bernoulli

    net = torch.nn.Sequential(torch.nn.Linear(4, 8192), torch.nn.ReLU(), torch.nn.Linear(8192, 2))
    bnet = bp.bayesianize(net, prior=bp.priors.SpikeAndSlab(prior_log_odds=-1500.0))
    first = bnet.bayesian_layers["0"]
    tests = GateTests(bnet, [first.gate_logit], 16)
    with torch.no_grad():
        first.gate_logit.copy_(torch.linspace(0.5, 8.0, 8192))
        saved = first.gate_logit.detach().clone()
        exact = kl_bernoulli(torch.tensor([-8.0, 8.0], dtype=torch.float64), prior_log_odds=-1500.0)
        for j in (0, 4095, 8191):
            change = tests._kl_change(first, first.gate_logit, j, 8.0)
            assert change == pytest.approx(float(exact[0] - exact[1]), abs=0.01)
        assert torch.equal(first.gate_logit, saved)  # the logits are put back


def _per_layer_reference(tests: GateTests, logits, beta_bound: float = 8.0):
    """The hold and the proposals of ``after_step`` written one layer at a time (as before the
    gates were handled concatenated): the gates and gradients after the hold, and the proposals
    ``(strength, layer, gate)``, the strongest first."""
    gates = [p.detach().clone() for p in tests.gates]
    grads = [None if p.grad is None else p.grad.clone() for p in tests.gates]
    for k, (old, until) in enumerate(zip(logits, tests.held_until, strict=True)):
        held = until > tests.epoch
        gates[k] = torch.where(held, old, gates[k])
        if grads[k] is not None:
            grads[k] = grads[k].masked_fill(held, 0)
    proposals = []
    for i, (p, old, g) in enumerate(zip(gates, logits, grads, strict=True)):
        if g is None:
            continue
        q = torch.sigmoid(old)
        strength = (g / (q * (1 - q)).clamp_min(1e-12)).abs().view(-1)
        index = ((p >= 0) != (old >= 0)).view(-1).nonzero().flatten()
        values, places = strength[index].tolist(), index.tolist()
        proposals += [(v, i, j) for v, j in zip(values, places, strict=True)]
    return gates, grads, sorted(proposals, reverse=True)


@pytest.mark.parametrize("without_gradient", [None, 1])
def test_the_gates_of_several_layers_are_held_and_proposed_as_one_layer_at_a_time(
    without_gradient,
) -> None:
    """after_step works on all the gates concatenated: the same holds, the same cleared
    gradients and the same proposals (layer, gate, strength) as one layer at a time, with
    gates of different sizes, held gates in two layers and a gate tensor without a gradient."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 7), torch.nn.ReLU(),
        torch.nn.Linear(7, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2),
    )  # fmt: skip
    bnet = bp.bayesianize(net)
    gates = bnet.gate_parameters()
    assert len(gates) == 4  # the output layer has gates too
    tests = GateTests(bnet, gates, 16)
    natural = BernoulliNaturalGradient(gates, lr=1.0)
    with torch.no_grad():
        for p in gates:
            p.copy_(torch.randn_like(p))
            p.grad = p.sign() * (0.5 + torch.rand_like(p))  # steps of 2 or more: most flip
    if without_gradient is not None:
        gates[without_gradient].grad = None
    tests.held_until[0][1] = tests.held_until[1][4] = tests.held_until[2][0] = 5
    tests.epoch = 1
    assert tests.holding
    seen = {}
    tests._test = lambda proposals, old, stepped, bounds, beta: seen.update(proposals=proposals)
    before = tests.before_step()
    parts = before.split([p.numel() for p in gates])
    logits = [b.view_as(p) for b, p in zip(parts, gates, strict=True)]
    assert all(torch.equal(b, p) for b, p in zip(logits, gates, strict=True))
    natural.step()
    expected_gates, expected_grads, expected = _per_layer_reference(tests, logits)
    tests.after_step(natural, before)
    assert all(torch.equal(p, e) for p, e in zip(gates, expected_gates, strict=True))
    for p, e in zip(gates, expected_grads, strict=True):
        assert (p.grad is None) == (e is None) and (e is None or torch.equal(p.grad, e))
    assert expected and seen["proposals"] == expected
    with_gradient = {i for i, p in enumerate(gates) if p.grad is not None}
    assert {i for _, i, _ in expected} == with_gradient  # proposals in every layer
