"""Saving and loading a BayesianModule (bnet.save, bp.load; the format of bayesprune/io.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune.models import lenet_300_100, resnet20


def _small_resnet() -> nn.Module:
    return resnet20(widths=(4, 8, 8))


@pytest.mark.parametrize(
    ("prior", "weight_sd"),
    [
        (bp.priors.SpikeAndSlab(prior_inclusion="theory"), "per_weight"),
        (bp.priors.GroupHorseshoe(global_scale=0.3), "per_weight"),
        (bp.priors.SpikeAndSlab(prior_inclusion="theory"), "rank1"),
    ],
)
def test_save_load_round_trip(tmp_path, prior, weight_sd) -> None:
    bnet = bp.bayesianize(_small_resnet(), prior=prior, reparam="shared", weight_sd=weight_sd)
    with torch.no_grad():
        for p in bnet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    bnet.num_data = 123
    path = tmp_path / "b.safetensors"
    bnet.save(path)
    back = bp.load(path, _small_resnet())
    assert back.num_data == 123 and back.priors == bnet.priors and back.reparam == "shared"
    assert back.weight_sd == weight_sd
    for (k, a), (k2, b) in zip(bnet.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    for k, p in bnet.inclusion_probs().items():
        torch.testing.assert_close(back.inclusion_probs()[k], p, atol=0, rtol=0)
    bnet.eval()
    back.eval()
    x = torch.randn(2, 1, 28, 28)
    torch.manual_seed(5)
    a = bnet.predict(x, num_samples=3)
    torch.manual_seed(5)
    torch.testing.assert_close(back.predict(x, num_samples=3), a)


def test_load_errors(tmp_path) -> None:
    bnet = bp.bayesianize(lenet_300_100(in_features=16))
    path = tmp_path / "b.safetensors"
    bnet.save(path)
    with pytest.raises(ValueError, match="does not match the architecture"):
        bp.load(path, lenet_300_100(in_features=32))
    with pytest.raises(FileNotFoundError):
        bp.load(tmp_path / "missing.safetensors", lenet_300_100())
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        bp.load(damaged, lenet_300_100(in_features=16))
    with pytest.raises(FileNotFoundError, match=r"folder .*nope does not exist"):
        bnet.save(tmp_path / "nope" / "b.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    # a group-horseshoe file saved before the PIP reference existed cannot be read back silently
    ghs = bp.bayesianize(lenet_300_100(in_features=16), prior=bp.priors.GroupHorseshoe())
    ghs.save(path)
    state = {k: v for k, v in load_file(str(path)).items() if not k.endswith("hs_reference")}
    save_file(state, str(path), metadata=safe_open(str(path), "pt").metadata())
    with pytest.raises(ValueError, match=r"no 'hs_reference'.*fit the network again"):
        bp.load(path, lenet_300_100(in_features=16))

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a bayesprune BayesianModule file"):
        bp.load(tmp_path / "other.safetensors", lenet_300_100())
