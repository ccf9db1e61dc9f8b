"""fit(compile=True): the compiled loss equals the eager one on the same draws, a failed
compilation falls back to the eager step with a warning, and the options are checked."""

from __future__ import annotations

import pyro.infer
import pytest
import torch
from helpers import fit_options_of_cli
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesprune as bp
from bayesprune._compiled import LossStep
from bayesprune.inference import LocalReparamELBO


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))


def _data(n: int = 128) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def _steps(compile: bool) -> tuple[list[torch.Tensor], list[dict], LossStep]:
    """Three seeded losses and gradients of a fresh module, eager or compiled."""
    torch.manual_seed(1)
    bnet = bp.bayesianize(_net())
    bnet.num_data = 640
    step = LossStep(LocalReparamELBO(), bnet, compile=compile)
    x, y = next(iter(_data(64)))
    losses, grads = [], []
    for i in range(3):
        torch.manual_seed(10 + i)
        bnet.zero_grad()
        loss = step.backward(step(x, y), x, y)
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in bnet.named_parameters() if p.grad is not None})
    return losses, grads, step


@pytest.mark.slow
def test_the_compiled_loss_and_gradients_are_the_eager_ones_on_the_same_draws() -> None:
    eager_losses, eager_grads, _ = _steps(compile=False)
    losses, grads, step = _steps(compile=True)
    assert step.compiled and step.fallback is None and step.compile_seconds > 0
    for le, lc, ge, gc in zip(eager_losses, losses, eager_grads, grads, strict=True):
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-4)
        assert set(gc) == set(ge) and ge
        for name in ge:
            scale = float(ge[name].abs().max()) + 1e-6
            assert float((gc[name] - ge[name]).abs().max()) / scale < 1e-4, name


@pytest.mark.slow
def test_a_compiled_fit_reports_its_compile_time_and_fits_like_the_eager_one() -> None:
    eager = bp.fit(bp.bayesianize(_net()), _data(), epochs=2, progress=False, seed=0)
    compiled = bp.fit(
        bp.bayesianize(_net()), _data(), epochs=2, progress=False, seed=0, compile=True
    )
    assert compiled.compiled and compiled.compile_seconds > 0
    assert not eager.compiled and eager.compile_seconds == 0
    # the first step draws the same gates; later ones may part (a gate draw rand < q flips
    # under float differences), so only the first loss is compared tightly
    assert compiled.loss[0] == pytest.approx(eager.loss[0], rel=1e-5)
    assert len(compiled.loss) == len(eager.loss)


@pytest.mark.slow
def test_every_fit_compiles_graphs_of_its_own(monkeypatch) -> None:
    # dynamo counts recompilations per code object against a limit, past which it runs eager
    # without a word: fits of other networks in one process must not share that count
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    graphs = []
    for width in (8, 12):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, 3))
        before = counters["stats"]["unique_graphs"]
        result = bp.fit(bp.bayesianize(net), _data(130), epochs=1, progress=False, compile=True)
        graphs.append(counters["stats"]["unique_graphs"] - before)
        assert result.compiled
    assert graphs[0] >= 1 and graphs[1] >= 1, graphs  # (the last batch of 2 rows: no new graph)


def test_a_failed_compilation_falls_back_to_the_eager_step_with_the_same_draws(
    monkeypatch,
) -> None:
    def broken(fn, **kwargs):
        def run(*args):
            torch.rand(1000)  # consumes random numbers, as a partial attempt might
            raise RuntimeError("no C++ compiler found\nsecond line")

        return run

    eager = bp.fit(bp.bayesianize(_net()), _data(), epochs=2, progress=False, seed=0)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler"):
        result = bp.fit(
            bp.bayesianize(_net()), _data(), epochs=2, progress=False, seed=0, compile=True
        )
    assert not result.compiled and result.compile_seconds == 0
    assert result.loss == eager.loss  # the random state of the failed attempt was put back


class _BackwardFails(torch.autograd.Function):
    """Identity whose backward raises, as a backward graph that fails to compile would."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward graph failed to compile")


def test_a_backward_that_fails_to_compile_falls_back_with_the_same_draws(monkeypatch) -> None:
    def lazy_backward(fn, **kwargs):
        def run(*args):
            torch.rand(1000)  # the compiled attempt consumes random numbers
            return _BackwardFails.apply(fn(*args))

        return run

    eager = bp.fit(bp.bayesianize(_net()), _data(), epochs=2, progress=False, seed=0)
    monkeypatch.setattr(torch, "compile", lazy_backward)
    with pytest.warns(UserWarning, match="backward graph failed to compile"):
        result = bp.fit(
            bp.bayesianize(_net()), _data(), epochs=2, progress=False, seed=0, compile=True
        )
    assert not result.compiled and result.compile_seconds == 0
    assert result.loss == eager.loss


def test_a_compile_call_that_raises_at_once_falls_back_too(monkeypatch) -> None:
    def refused(fn, **kwargs):
        raise RuntimeError("Windows not yet supported for torch.compile")

    monkeypatch.setattr(torch, "compile", refused)
    with pytest.warns(UserWarning, match="Windows not yet supported"):
        result = bp.fit(bp.bayesianize(_net()), _data(), epochs=1, progress=False, compile=True)
    assert not result.compiled


def test_a_model_error_is_raised_as_without_compile(monkeypatch) -> None:
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("compiler failed")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    wrong = DataLoader(TensorDataset(torch.randn(64, 7), torch.zeros(64).long()), batch_size=32)
    with pytest.raises(Exception, match="first batch") as info:
        bp.fit(bp.bayesianize(_net()), wrong, epochs=1, progress=False, compile=True)
    assert "compiler failed" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"compile": "yes"}, TypeError, "compile must be True or False"),
        ({"compile": True, "elbo": pyro.infer.Trace_ELBO()}, ValueError, "drop elbo="),
        ({"compile": True, "devices": 2}, ValueError, "one process"),
    ],
)
def test_compile_option_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        bp.fit(bp.bayesianize(_net()), _data(), epochs=1, progress=False, **kwargs)


def test_the_cli_passes_compile_to_fit(tmp_path, monkeypatch) -> None:
    seen = fit_options_of_cli(tmp_path, monkeypatch, "--subset", "500", "--compile")
    assert seen["compile"] is True


def test_the_cli_refuses_compile_with_devices(tmp_path, capsys) -> None:
    from bayesprune.cli import main

    argv = ["fit", "--model", "lenet_300_100", "--out", str(tmp_path / "run"), "--epochs", "1",
            "--no-progress", "--devices", "2", "--compile"]  # fmt: skip
    assert main(argv) == 2
    assert "--compile compiles the step of one process" in capsys.readouterr().err
