"""Data-parallel SVI (``fit(devices=N)``, ``bayesprune.distributed``) on 2 CPU processes (gloo),
scikit-learn digits: one distributed step has the single-process gradient of the global batch,
the parameters stay identical on every process, a fit resumed on 2 processes from a one-process
checkpoint ends like the one-process fit, and the errors that name their fix.

Each launch starts 2 fresh interpreters (a few seconds each); the workers are module-level
functions, as the spawned processes import them from this file."""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from helpers import fit_options_of_cli
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import bayesprune as bp
from bayesprune.data import load_digits, loader
from bayesprune.distributed import launch, rank_seed, shard_bounds

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*inclusion probabilities:UserWarning"),
    pytest.mark.filterwarnings("ignore:the median-probability model:UserWarning"),
    pytest.mark.filterwarnings("ignore:num_data=:UserWarning"),
]

#: N of the one-step check (the batch holds 64 of them): the likelihood's scale N / B = 10
NUM_DATA = 640


def _plain(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(64, 32)]
    layers += [nn.BatchNorm1d(32)] if bn else []
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(32, 10))


def _mlp(bn: bool = False) -> bp.BayesianModule:
    return bp.bayesianize(_plain(bn))


def _held(bnet: bp.BayesianModule) -> list[torch.Tensor]:
    """A running sum of earlier gate gradients, the same on every process."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(p.shape, generator=g) for p in bnet.gate_parameters()]


def _one_step_batch() -> tuple[torch.Tensor, torch.Tensor]:
    train = load_digits(seed=0).train
    return train.tensors[0][:64], train.tensors[1][:64]


def _rank_worker() -> dict:
    """On each process (inside the group, as under torchrun): (1) one step of the default fit on
    a batch of 64 digits, with a running sum already in the gate gradients; (2) a 3-epoch fit of
    a BatchNorm net on 98 digits in batches of 33 (uneven shares, a shorter last batch)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnet = _mlp()
        for p, h in zip(bnet.gate_parameters(), _held(bnet), strict=True):
            p.grad = h.clone()
        x, y = _one_step_batch()
        one = loader(TensorDataset(x, y), batch_size=64, shuffle=False)
        bp.fit(bnet, one, epochs=1, seed=0, num_data=NUM_DATA, progress=False)
        out["grads"] = {k: p.grad.clone() for k, p in bnet.named_parameters() if p.grad is not None}
        bnet = _mlp(bn=True)
        train = load_digits(seed=0).train
        data = loader(Subset(train, range(98)), batch_size=33, seed=3)
        result = bp.fit(bnet, data, epochs=3, lr=1e-2, seed=0, progress=False)
        out["state"] = {k: v.clone() for k, v in bnet.state_dict().items()}
        out["loss"] = result.loss
    return out


def test_one_step_gradient_and_identical_parameters() -> None:
    ranks = launch(_rank_worker, 2)

    # the single-process gradient of the same global batch with the same draws: each process's
    # share drawn from its seed, the likelihood scaled by N / B, the KL once
    bnet = _mlp()
    for p, h in zip(bnet.gate_parameters(), _held(bnet), strict=True):
        p.grad = h.clone()
    bnet.num_data = NUM_DATA
    bnet.train()
    x, y = _one_step_batch()
    nll = 0.0
    for r, (lo, hi) in enumerate(shard_bounds(64, 2)):
        pyro.set_rng_seed(rank_seed(0, r))
        nll = nll - bnet.log_likelihood(bnet(x[lo:hi]), y[lo:hi]).sum()
    (NUM_DATA / 64 * nll + bnet.kl()).backward()
    expected = {k: p.grad for k, p in bnet.named_parameters() if p.grad is not None}
    gates = {k for k, p in bnet.named_parameters() if any(p is g for g in bnet.gate_parameters())}
    assert gates and set(expected) == set(ranks[0]["grads"])
    for r in (0, 1):
        for k, g in expected.items():
            # gates: the running sum plus the averaged new gradient
            torch.testing.assert_close(ranks[r]["grads"][k], g, rtol=1e-4, atol=1e-5, msg=k)

    # the BatchNorm fit: parameters and buffers identical on both processes, bit for bit
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert s0.keys() == s1.keys() and any("running_mean" in k for k in s0)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert ranks[0]["loss"] == ranks[1]["loss"] and len(ranks[0]["loss"]) == 3 * 3


class _StopAfter:
    """``loader`` with a Ctrl-C at the start of pass ``epochs + 1`` (one process)."""

    def __init__(self, data: DataLoader, epochs: int) -> None:
        self.data, self.epochs, self.passes = data, epochs, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getattr__(self, name: str):
        return getattr(self.data, name)

    def __iter__(self):
        self.passes += 1
        if self.passes > self.epochs:
            raise KeyboardInterrupt
        return iter(self.data)


def test_fit_on_two_processes_matches_one(tmp_path) -> None:
    """A fit stopped after 2 of 6 epochs on one process, resumed with devices=2 (from its
    checkpoint, writing its own): PIPs and accuracy as the same fit on one process, the fitted
    parameters in the caller's bnet, process 0's history of the global batch."""
    splits = load_digits(seed=0)
    val = loader(splits.val, 512, shuffle=False)
    options = dict(epochs=6, lr=1e-2, seed=0, progress=False, val_loader=val)
    single = _mlp()
    one = bp.fit(single, loader(splits.train, 64, seed=0), **options)

    path = tmp_path / "fit.safetensors"
    with pytest.raises(KeyboardInterrupt):
        bp.fit(_mlp(), _StopAfter(loader(splits.train, 64, seed=0), 2), checkpoint=path, **options)
    bnet = _mlp()
    before = {k: v.clone() for k, v in bnet.state_dict().items()}
    two = bp.fit(bnet, loader(splits.train, 64, seed=0), resume=path, checkpoint=path,
                 devices=2, **options)  # fmt: skip

    steps = 6 * len(loader(splits.train, 64))
    assert len(two.loss) == len(two.kl) == len(two.nll) == steps
    assert len(two.val_accuracy) == 6 and two.num_data == len(splits.train)
    assert bnet.num_data == len(splits.train) and bnet.input_shape == (1, 8, 8)
    assert not all(torch.equal(v, bnet.state_dict()[k]) for k, v in before.items())
    # process 0's checkpoint of the last epoch: the module it saved is the one returned
    saved = bp.load(path, _plain())
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(v, bnet.state_dict()[k])
    assert abs(two.val_accuracy[-1] - one.val_accuracy[-1]) <= 0.05
    acc = bp.evaluate(bnet, val, num_samples=8)
    assert abs(acc - bp.evaluate(single, val, num_samples=8)) <= 0.05
    for k, p in single.inclusion_probs().items():
        q = bnet.inclusion_probs()[k]
        assert (p - q).abs().mean() <= 0.2, k
        assert abs(int((p >= 0.5).sum()) - int((q >= 0.5).sum())) <= max(3, len(p) // 8), k


# -- errors that name the fix (no process is started) ---------------------------------------------
def _digits_loader(**kw) -> DataLoader:
    return loader(load_digits(seed=0).train, **kw)


def test_a_fit_on_two_processes_hands_n_to_a_price_prior(tmp_path) -> None:
    """SpikeAndSlab(price_per_example=...): the caller's module gets the priors with N, as after a
    fit on one process, and saves and loads with them."""
    splits = load_digits(seed=0)
    bnet = bp.bayesianize(_plain(), bp.priors.SpikeAndSlab(price_per_example=1e-6))
    bp.fit(bnet, loader(splits.train, 64, seed=0), epochs=1, devices=2, progress=False)
    n = len(splits.train)
    assert {p.num_data for p in bnet.priors.values()} == {n}
    assert all(layer.prior.num_data == n for layer in bnet.bayesian_layers.values())
    path = tmp_path / "fit.safetensors"
    bnet.save(path)
    torch.testing.assert_close(bp.load(path, _plain()).kl(), bnet.kl())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"devices": 0}, ValueError, "devices must be a positive integer"),
        ({"devices": True}, ValueError, "devices must be a positive integer"),
        ({"devices": 2, "elbo": pyro.infer.Trace_ELBO()}, ValueError, "Drop elbo="),
        ({"sync_batchnorm": True}, ValueError, "pass devices=N > 1"),
        ({"devices": 2, "sync_batchnorm": True}, ValueError, "runs on GPUs only"),
    ],
)
def test_option_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        bp.fit(_mlp(), _digits_loader(batch_size=64), progress=False, **kwargs)


def test_loaders_that_cannot_be_sharded() -> None:
    splits = load_digits(seed=0)
    batches = list(_digits_loader(batch_size=64))
    with pytest.raises(TypeError, match="not a DataLoader"):
        bp.fit(_mlp(), batches, num_data=len(splits.train), devices=2, progress=False)
    sampler = DistributedSampler(splits.train, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="pass the undivided loader"):
        bp.fit(_mlp(), DataLoader(splits.train, 64, sampler=sampler), devices=2, progress=False)
    with pytest.raises(ValueError, match="use batch_size >= 3"):
        bp.fit(_mlp(), _digits_loader(batch_size=2), devices=3, progress=False)
    # 898 training images in batches of 64: a last batch of 2, fewer than 3 processes
    assert len(splits.train) % 64 == 2
    with pytest.raises(ValueError, match="drop_last=True"):
        bp.fit(_mlp(), _digits_loader(batch_size=64), devices=3, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_more_gpus_than_there_are() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        bp.fit(_mlp(), _digits_loader(batch_size=64), devices=2, device="cuda", progress=False)


def test_cli_devices_reach_fit(tmp_path, monkeypatch) -> None:
    seen = fit_options_of_cli(tmp_path, monkeypatch, "--devices", "2")
    assert seen["devices"] == 2 and seen["sync_batchnorm"] is False


def test_cli_device_errors(tmp_path, capsys) -> None:
    from bayesprune.cli import main

    base = ["fit", "--model", "lenet_300_100", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*base, "--sync-batchnorm"]) == 2
    assert "--sync-batchnorm synchronizes" in capsys.readouterr().err
    assert main([*base, "--devices", "2", "--sync-batchnorm"]) == 2
    assert "needs GPUs" in capsys.readouterr().err
    assert main([*base, "--devices", "4", "--batch-size", "2"]) == 2
    assert "--batch-size >= 4" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_fit_on_two_processes(tmp_path) -> None:
    import json

    from bayesprune.cli import main

    out = tmp_path / "run"
    argv = ["fit", "--model", "lenet_300_100", "--out", str(out), "--epochs", "2",
            "--pretrain-epochs", "1", "--no-progress", "--threads", "1", "--devices", "2"]  # fmt: skip
    assert main(argv) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert fit["devices"] == 2 and len(fit["loss"]) == 2 * len(_digits_loader(batch_size=128))
    assert fit["bayes_val_accuracy"] > 0.8


def test_launch_returns_by_rank_and_raises_a_process_error_with_its_own_type() -> None:
    """Results and errors come back through a pipe between the call's own processes (nothing is
    unpickled from disk), and a failing process's exception keeps its type."""
    import operator

    from bayesprune.distributed import launch

    assert launch(operator.add, 2, (1, 2), threads=1) == [3, 3]
    with pytest.raises(ZeroDivisionError):
        launch(operator.truediv, 2, (1, 0), threads=1)
