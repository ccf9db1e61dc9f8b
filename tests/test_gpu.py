"""The user's path on a GPU: fit (eager and compiled), prune, predict, certify and reload with
``device="cuda"``. Skipped without one (CI has none); ``benchmarks/gpu_check.sh`` runs this file
first on a lent GPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune.data import load_digits, loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _conv() -> nn.Module:
    """A conv net on the 1x8x8 digits images: its input shape cannot be read off its first layer,
    so the fit must trace it on a batch that lives on the GPU."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def test_a_fit_on_the_gpu_traces_its_hidden_layers_and_prunes_exactly(digits, tmp_path) -> None:
    bnet = bp.bayesianize(_conv())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = bp.fit(
            bnet,
            loader(digits.train, 64),
            epochs=3,
            val_loader=loader(digits.val, 256),
            device="cuda",
            progress=False,
            seed=0,
        )
    assert not [w for w in caught if "could not trace" in str(w.message)]
    # the output layer is never counted among the hidden nodes
    assert set(result.nodes_off) == {"0", "4"}
    assert bnet.device.type == "cuda"
    x, _ = next(iter(loader(digits.test, 128)))
    x = x.cuda()
    probs = bnet.predict(x, num_samples=8, seed=0)
    assert probs.device.type == "cuda" and torch.allclose(
        probs.sum(-1), torch.ones(128, device="cuda")
    )
    small = bp.prune(bnet, threshold=0.5)
    assert next(small.parameters()).device.type == "cuda"
    pips = bnet.inclusion_probs()
    masked = bnet.mean_module({k: pips[k] >= 0.5 for k in ("0", "4")}).eval()
    torch.testing.assert_close(small.eval()(x), masked(x), atol=1e-5, rtol=1e-5)
    path = tmp_path / "small.safetensors"
    bp.save_pruned(small, path)
    again = bp.load_pruned(path, _conv, device="cuda")
    torch.testing.assert_close(again.eval()(x), small(x), atol=1e-6, rtol=1e-6)


def test_certify_on_the_gpu(digits) -> None:
    bnet = bp.bayesianize(_conv())
    bp.fit(bnet, loader(digits.train, 64), epochs=2, device="cuda", progress=False, seed=0)
    cert = bp.conformal.certify(bnet, loader(digits.cal, 128), alpha=0.1, delta=0.1)
    assert cert.n == len(digits.cal)
    assert cert.index is None or next(cert.model.parameters()).device.type == "cuda"


def test_a_compiled_fit_on_the_gpu_matches_the_eager_first_loss(digits) -> None:
    data = loader(digits.train, 64)
    eager = bp.fit(bp.bayesianize(_conv()), data, epochs=1, device="cuda", progress=False, seed=0)
    compiled = bp.fit(
        bp.bayesianize(_conv()), data, epochs=1, device="cuda", progress=False, seed=0,
        compile=True,
    )  # fmt: skip
    assert compiled.compiled and compiled.compile_seconds > 0
    assert compiled.loss[0] == pytest.approx(eager.loss[0], rel=1e-4)
