import pytest
import torch
from torch import nn

from bayesprune.data import load_digits, loader
from bayesprune.models import lenet_300_100
from bayesprune.train import evaluate, resolve_device, train


def test_train_learns_digits():
    s = load_digits(seed=0)
    net = lenet_300_100(in_features=64)
    hist = train(
        net,
        loader(s.train, 64),
        epochs=5,
        lr=3e-3,
        val_loader=loader(s.val, 256, shuffle=False),
        progress=False,
        seed=0,
    )
    assert len(hist.loss) == 5 * len(loader(s.train, 64)) and len(hist.val_accuracy) == 5
    assert hist.epoch_loss[-1] < hist.epoch_loss[0]
    assert evaluate(net, loader(s.test, 256, shuffle=False)) > 0.9


def test_train_rejects_bad_input():
    net = nn.Linear(2, 2)
    data = [(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="epochs"):
        train(net, data, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        train(net, data, lr=-1)
    with pytest.raises(TypeError, match="DataLoader"):
        train(net, 3)
    with pytest.raises(ValueError, match="empty"):
        evaluate(net, [])
    x, y = data[0]
    with pytest.raises(TypeError, match=r"got a dict with keys \['x', 'y'\]"):
        train(net, [{"x": x, "y": y}], progress=False)
    with pytest.raises(TypeError, match="got 3 items per batch"):
        evaluate(net, [(x, y, torch.arange(4))])
    # labels outside the classes: an error, not a silent accuracy of 0 or an IndexError in torch
    for fn in (evaluate, lambda n, d: train(n, d, progress=False)):
        with pytest.raises(ValueError, match=r"indices in \[0, 2\).*from 10 to 10"):
            fn(net, [(x, y + 10)])
        with pytest.raises(ValueError, match=r"running Linear on a \w+ batch of shape \(4, 3\)"):
            fn(net, [(torch.zeros(4, 3), y)])
    with pytest.raises(TypeError, match=r"ndarray, not a torch\.Tensor.*torch\.from_numpy"):
        evaluate(net, [(x.numpy(), y)])


def test_train_takes_every_target_cross_entropy_takes():
    seg = nn.Conv2d(1, 3, 1)  # [B, C, H, W] logits: the classes are on axis 1
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0, 0] = -100  # cross_entropy's ignore_index
    train(seg, [(torch.randn(2, 1, 4, 4), labels)], epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"indices in \[0, 3\)"):
        train(seg, [(torch.randn(2, 1, 4, 4), labels + 5)], epochs=1, progress=False)


def test_evaluate_scores_a_bayesian_module_by_its_posterior_predictive():
    import bayesprune as bp

    s = load_digits(seed=0)
    net = lenet_300_100(in_features=64)
    train(net, loader(s.train, 64), epochs=2, progress=False, seed=0)
    bnet = bp.bayesianize(net, prior=bp.priors.SpikeAndSlab(level="node"))
    bp.fit(bnet, loader(s.train, 64), epochs=1, progress=False, seed=0)
    x, y = s.test.tensors
    torch.manual_seed(1)
    expected = float((bnet.predict(x, num_samples=4).argmax(-1) == y).float().mean())
    torch.manual_seed(1)
    assert evaluate(bnet, [(x, y)], num_samples=4) == pytest.approx(expected)


def test_nan_loss_stops_with_clear_error():
    net = nn.Linear(2, 2)
    data = [(torch.full((4, 2), float("nan")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(FloatingPointError, match="epoch 1, step 1"):
        train(net, data, epochs=1, progress=False)


def test_resolve_device():
    assert resolve_device(None).type == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_net_with_auxiliary_outputs_gets_a_clear_error() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), self.fc(x)

    data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(TypeError, match=r"TwoHeads's forward returned a tuple.*aux_logits=False"):
        train(TwoHeads(), data, epochs=1, progress=False)
    # a custom loss_fn decides what to do with them
    history = train(
        TwoHeads(), data, epochs=1, progress=False,
        loss_fn=lambda out, y: sum(torch.nn.functional.cross_entropy(o, y) for o in out),
    )  # fmt: skip
    assert len(history.loss) == 1
    import bayesprune as bp

    bnet = bp.bayesianize(TwoHeads(), num_classes=2)
    with pytest.raises(TypeError, match="returned a tuple"):
        bp.fit(bnet, data, epochs=1, progress=False, num_data=4)
    with pytest.raises(TypeError, match="returned a tuple"):
        bnet.predict(torch.randn(2, 3))


def test_the_progress_bar_does_not_write_a_line_per_step(capsys) -> None:
    """In a log (stderr not a terminal) the bar refreshes at tqdm's interval, not at every step:
    512 steps write far fewer than 512 updates."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(4096, 20, generator=g), torch.randint(0, 3, (4096,), generator=g)
    )
    net = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    train(net, DataLoader(data, batch_size=8), epochs=1, progress=True)
    updates = capsys.readouterr().err.count("\r")
    assert 0 < updates < 100, updates
