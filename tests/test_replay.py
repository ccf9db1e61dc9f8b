import time

import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune.layers import BayesianLayer
from bayesprune.replay import ForwardReplay


class _Block(nn.Module):
    """A residual block written the torchvision way: an in-place ReLU and ``out += identity``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class _Net(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.act = nn.ReLU(inplace=True)  # changes the stem's output in place (the gate after it)
        self.block1, self.block2 = _Block(width), _Block(width)
        self.pool = nn.AvgPool2d(1)  # its output is changed in place below
        self.drop = nn.Dropout(0.3)  # random, after every gated layer
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.act(self.stem(x)))
        out += 1.0
        out = self.block2(self.block1(out))
        return self.head(self.drop(out.mean((2, 3))))


def _bnet():
    torch.manual_seed(0)
    bnet = bp.bayesianize(_Net())
    bnet.train()
    return bnet, torch.randn(32, 1, 8, 8)


def _full(replay, bnet, x):
    """The whole pass, nothing handed back (and nothing committed)."""
    torch.manual_seed(0)
    return replay.run(lambda: bnet(x))


@pytest.mark.parametrize("others", [0.0, 0.25, 10.0])
@torch.no_grad()
def test_a_pass_from_a_switched_gate_equals_the_whole_pass(others: float) -> None:
    bnet, x = _bnet()
    layers = bnet.bayesian_layers
    assert any(layer.gate_after for layer in layers.values())  # the BatchNorm hook is exercised
    with ForwardReplay(bnet.net, device=x.device, budget=0) as other:
        reference = _full(other, bnet, x)
    with ForwardReplay(bnet.net, device=x.device, others=others) as replay:
        first = _full(replay, bnet, x)
        replay.commit()  # the record stops at the stem, whose output the ReLU changes in place
        assert torch.equal(first, reference)  # the same draws in another replay
        assert torch.equal(_full(replay, bnet, x), reference)
        replay.commit()  # now with a copy of the stem's output
        for name in ("block1.conv2", "block2.conv1", "stem"):
            layer = layers[name]
            layer.gate_logit[1] = -layer.gate_logit[1]  # switch one node
            torch.manual_seed(0)
            again = replay.run(lambda: bnet(x), start=layer)
            assert replay.reused > 0 or name == "stem"
            assert not torch.equal(again, first)
            replay.commit()  # take the switch
            assert torch.equal(again, _full(replay, bnet, x))
            first = again
        # the stem's output, changed in place after it was recorded, is copied from then on
        assert replay.copied == {id(bnet.net.stem)}


@torch.no_grad()
def test_the_modules_before_the_start_are_not_run(monkeypatch) -> None:
    bnet, x = _bnet()
    start = bnet.bayesian_layers["block2.conv1"]
    computed: list[nn.Module] = []
    original = BayesianLayer.forward_pre_gate

    def counted(self, inp):
        computed.append(self)
        return original(self, inp)

    monkeypatch.setattr(BayesianLayer, "forward_pre_gate", counted)
    with ForwardReplay(bnet.net, device=x.device, others=0.0) as replay:
        replay.run(lambda: bnet(x))
        replay.commit()  # the record stops at the stem: its output was changed in place
        replay.run(lambda: bnet(x))
        replay.commit()  # and now holds a copy of it
        computed.clear()
        replay.run(lambda: bnet(x), start=start)
    names = {id(m): n for n, m in bnet.bayesian_layers.items()}
    # stem, block1 and block2.conv1's part before its gate handed back
    assert [names[id(m)] for m in computed] == ["block2.conv2", "head"]
    # the layers stem, block1.conv1, block1.conv2, block2.conv1 (the others run again)
    assert replay.reused == 4


@torch.no_grad()
def test_a_refused_pass_leaves_the_record_and_budget_zero_reuses_nothing() -> None:
    bnet, x = _bnet()
    layer = bnet.bayesian_layers["block1.conv2"]
    with ForwardReplay(bnet.net, device=x.device) as replay:
        replay.run(lambda: bnet(x))
        replay.commit()
        layer.gate_logit[0] = -layer.gate_logit[0]
        replay.run(lambda: bnet(x), start=layer)  # not committed: refused
        layer.gate_logit[0] = -layer.gate_logit[0]
        torch.manual_seed(0)
        back = replay.run(lambda: bnet(x), start=bnet.bayesian_layers["block2.conv2"])
        assert torch.equal(back, _full(replay, bnet, x))
    with ForwardReplay(bnet.net, device=x.device, budget=0) as replay:
        replay.run(lambda: bnet(x))
        replay.commit()
        replay.run(lambda: bnet(x), start=bnet.bayesian_layers["block2.conv2"])
        assert replay.reused == 0


def test_the_forwards_are_put_back_and_bad_budgets_refused() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    own = net[1].forward
    net[1].forward = own  # an instance forward set before: kept
    with pytest.raises(ValueError, match="budget must be >= 0"):
        ForwardReplay(net, device=torch.device("cpu"), budget=-1)
    with ForwardReplay(net, device=torch.device("cpu")):
        assert "forward" in net[0].__dict__
    assert "forward" not in net[0].__dict__
    assert net[1].__dict__["forward"] is own


@torch.no_grad()
def test_a_pass_that_leaves_the_record_computes_from_there() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    order = {"ab": True}

    class Switching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x):
            return self.b(self.a(x)) if order["ab"] else self.a(self.b(x))

    net, x = Switching(), torch.randn(4, 3)
    with ForwardReplay(net, device=x.device) as replay:
        replay.run(lambda: net(x))
        replay.commit()
        order["ab"] = False
        out = replay.run(lambda: net(x), start=a)
        assert replay.reused == 0
        assert torch.equal(out, a(b(x)))


class _Skip(nn.Module):
    """``c(relu(b(h)) + h)``: what layer ``a`` draws reaches ``c`` around ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h)) + h)


@torch.no_grad()
def test_random_multipliers_of_handed_back_layers_are_drawn_as_in_a_whole_pass() -> None:
    """Gaussian weights under ``a`` (mixed priors): its multiplier is drawn again when handed
    back, from the same seed as in a whole pass, though its weight noise was not drawn."""
    torch.manual_seed(0)
    ss = bp.priors.SpikeAndSlab
    priors = {
        "a": ss(level="node", weights="gaussian"),
        "b": ss(level="node"),
        "c": ss(level="node"),
    }
    bnet = bp.bayesianize(_Skip(), prior=priors)
    bnet.train()
    x = torch.randn(64, 4)
    with ForwardReplay(bnet.net, device=x.device, budget=0) as whole:
        reference = whole.run(lambda: bnet(x))
    state = torch.random.get_rng_state()
    with ForwardReplay(bnet.net, device=x.device) as replay:
        replay.run(lambda: bnet(x))
        replay.commit()
        again = replay.run(lambda: bnet(x), start=bnet.bayesian_layers["b"])
    assert replay.reused == 2
    assert torch.equal(again, reference)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state kept


@torch.no_grad()
def test_an_output_changed_in_place_during_a_failed_pass_is_not_handed_back() -> None:
    boom = {"on": False}

    class Boom(nn.Module):
        def forward(self, x):
            if boom["on"]:
                x.mul_(0)
                raise RuntimeError("boom")
            return x

    net, x = nn.Sequential(nn.Linear(4, 8), Boom(), nn.Linear(8, 2)), torch.randn(3, 4)
    with ForwardReplay(net, device=x.device, keep=(nn.Linear,)) as replay:
        reference = replay.run(lambda: net(x))
        replay.commit()
        boom["on"] = True
        with pytest.raises(RuntimeError, match="boom"):
            replay.run(lambda: net(x), start=net[2])
        boom["on"] = False
        assert torch.equal(replay.run(lambda: net(x), start=net[2]), reference)


@torch.no_grad()
def test_an_instance_forward_is_kept_and_replays_do_not_nest() -> None:
    bnet, x = _bnet()
    head = bnet.bayesian_layers["head"]
    head.forward = lambda inp: BayesianLayer.forward(head, inp) * 0  # a user's patch
    with ForwardReplay(bnet.net, device=x.device) as replay:
        assert (replay.run(lambda: bnet(x)) == 0).all()
        with pytest.raises(RuntimeError, match="do not nest"):
            ForwardReplay(bnet.net, device=x.device).__enter__()
        with pytest.raises(RuntimeError, match="do not nest"):
            replay.__enter__()
    assert "forward" in head.__dict__ and not hasattr(head.__dict__["forward"], "_replay")


@torch.no_grad()
def test_only_layers_whose_multiplier_is_seeded_alone_are_named() -> None:
    """The gate tests draw the multipliers of these layers without random numbers: not those of
    a layer whose forward is replaced on the instance (it may draw after its multiplier), nor of
    an attention layer (its forward draws its multiplier, then dropout)."""
    bnet, x = _bnet()
    layers = bnet.bayesian_layers
    layers["head"].forward = lambda inp: BayesianLayer.forward(layers["head"], inp)
    with ForwardReplay(bnet.net, device=x.device) as replay:
        assert replay.multiplier_seeded(layers["stem"]) and replay.multiplier_seeded(
            layers["block1.conv1"]
        )
        assert not replay.multiplier_seeded(layers["head"])
    encoder = bp.bayesianize(
        nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    )
    with ForwardReplay(encoder.net, device=x.device) as replay:
        assert not replay.multiplier_seeded(encoder.bayesian_layers["self_attn"])
        assert replay.multiplier_seeded(encoder.bayesian_layers["linear1"])
        assert not replay.multiplier_seeded(nn.Linear(2, 2))


class _BN(nn.BatchNorm2d):
    """A BatchNorm that says when its forward computes (its hooks run on handed-back calls too),
    and that costs more per byte than the layers (a ReLU does not)."""

    def __init__(self, name: str, calls: list[str]) -> None:
        super().__init__(4)
        self.name, self.calls = name, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.name)
        time.sleep(0.005)
        return super().forward(x)


class _Counted(nn.Module):
    """Conv-BN-ReLU twice, then a head; counts the BatchNorms' computed forwards."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1), _BN("b1", self.calls)
        self.r1 = nn.ReLU(inplace=inplace)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), _BN("b2", self.calls)
        self.r2 = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(x))))))
        return self.head(out.mean((2, 3)))


def _passes(net: nn.Module, x: torch.Tensor, start: nn.Module, calls: list, **options):
    """Two whole passes (the first times the calls, the second records the chosen ones), then
    one from ``start`` on, changed: the replay and what ``calls`` got in that one."""
    net.train()
    keep = (nn.Conv2d, nn.Linear)
    with ForwardReplay(net, device=x.device, keep=keep, **options) as replay:
        for _ in range(2):
            whole = replay.run(lambda: net(x))
            replay.commit()
        calls.clear()
        with torch.no_grad():
            start.weight[0] = 0  # the change enters at ``start``
        again = replay.run(lambda: net(x), start=start)
        ran = list(calls)
    assert torch.equal(again, net(x))  # the numbers of the whole pass
    assert not torch.equal(again, whole)
    return replay, ran


@torch.no_grad()
def test_the_other_modules_before_the_start_are_handed_back_within_the_budget() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 6, 6)
    size = x.numel() * 4 * 4  # bytes of one 4-channel output (float32)

    def passes(**options):
        net = _Counted(inplace=False)
        return _passes(net, x, net.c2, net.calls, **options)

    replay, ran = passes(others=10.0)
    assert ran == ["b2"] and replay.reused == 2  # c1 and b1 handed back; r1 costs too little
    replay, ran = passes(others=0.0)
    assert ran == ["b1", "b2"] and replay.reused == 1  # c1 alone
    replay, ran = passes()  # the default share: a quarter of c1's and c2's bytes, no output
    assert ran == ["b1", "b2"] and replay.reused == 1
    # the layers' outputs first: a budget for c1's and c2's output alone leaves b1 out
    replay, ran = passes(others=10.0, budget=2 * size + 100)
    assert ran == ["b1", "b2"] and replay.reused == 1
    replay, ran = passes(others=10.0, budget=3 * size + 100)
    assert ran == ["b2"] and replay.reused == 2
    with pytest.raises(ValueError, match="others must be >= 0"):
        ForwardReplay(nn.Linear(2, 2), device=x.device, others=-1.0)


@torch.no_grad()
def test_the_other_calls_that_cost_most_per_byte_are_recorded_first() -> None:
    calls: list[str] = []

    class Slow(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append("slow")
            time.sleep(0.02)
            return x * 2

    class Fast(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append("fast")
            return x + 1

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), Fast(), Slow(), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    # room for one of the two 8-wide outputs: the layers' outputs take 16 x (8 + 2) floats
    replay, ran = _passes(net, x, net[3], calls, others=1.0)
    assert ran == ["fast"]  # Slow handed back though it comes later: the costlier per byte
    assert replay.reused == 2


@torch.no_grad()
def test_an_output_that_an_in_place_module_changes_runs_again_not_copied() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 6, 6)
    net = _Counted(inplace=True)
    replay, ran = _passes(net, x, net.c2, net.calls, others=10.0)
    # b1's output is changed by the in-place ReLU: b1 runs again, r1 (its output is its input)
    # too; neither is copied
    assert ran == ["b1", "b2"] and replay.reused == 1
    assert replay.computed == {id(net.b1)} and not replay.copied
