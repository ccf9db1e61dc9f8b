"""Tests of bayesprune.batchnorm: recalibrating and folding BatchNorm after pruning."""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune.batchnorm import fold_batchnorm, recalibrate_batchnorm
from bayesprune.models import resnet20
from bayesprune.pruning import load_pruned, prune_module, save_pruned


def _random_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding changes
    the weights (fresh BatchNorms are identities)."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=gen))
            m.bias.data.copy_(torch.randn(n, generator=gen))
    return net.eval()


def test_recalibrate_batchnorm_recomputes_the_running_statistics() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    net[1].running_mean.fill_(100.0)  # stale statistics, as after pruning
    net[1].momentum = 0.3
    batches = [(torch.randn(6, 2, 5, 5) * 2 + 1, torch.zeros(6)) for _ in range(5)]
    recalibrate_batchnorm(net, batches, num_batches=4, progress=False)
    with torch.no_grad():
        h = [net[0](x) for x, _ in batches[:4]]  # only the first num_batches count
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in h]).mean(0)
    var = torch.stack([b.transpose(0, 1).flatten(1).var(dim=1) for b in h]).mean(0)
    assert torch.allclose(net[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(net[1].running_var, var, atol=1e-4)
    assert net[1].momentum == 0.3 and not net.training and int(net[1].num_batches_tracked) == 4


def test_recalibrate_batchnorm_restores_a_pruned_resnet() -> None:
    """Pruning a trained ResNet-20's inner channels shifts the activations its BatchNorms saw;
    recalibrated statistics fit the data again (the eval-mode output matches train-mode batch
    normalisation far better than with the stale statistics)."""
    torch.manual_seed(0)
    net = resnet20()
    x = torch.randn(64, 1, 28, 28)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # exact dense statistics, so only pruning makes them stale
    with torch.no_grad():
        net.train()(x)
    masks = {f"layer{i}.0.conv1": torch.arange(16 * 2 ** (i - 1)) < 2 for i in (1, 2, 3)}
    small = prune_module(net.eval(), masks, x[:2])
    ref = small.train()(x).detach()  # batch statistics of the pruned net
    stale = (small.eval()(x) - ref).abs().mean()
    recalibrate_batchnorm(small, [(x,)] * 3, progress=False)
    fresh = (small(x) - ref).abs().mean()
    assert fresh < 0.1 * stale


def test_recalibrate_batchnorm_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        recalibrate_batchnorm(nn.Linear(2, 2), [torch.zeros(1, 2)], progress=False)
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="positive integer"):
        recalibrate_batchnorm(net, [torch.zeros(2, 2)], num_batches=0, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(net, [], progress=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        recalibrate_batchnorm(
            nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)), [], progress=False
        )
    # a failed call leaves the trained statistics as they were
    with torch.no_grad():
        net[1].running_mean.fill_(3.0)
    for bad, error in (([], ValueError), ([torch.zeros(4, 2), torch.zeros(4, 3)], ValueError),
                       ([{"x": torch.zeros(4, 2)}], TypeError)):  # fmt: skip
        with pytest.raises(error):
            recalibrate_batchnorm(net, bad, progress=False)
        assert net[1].running_mean.tolist() == [3.0, 3.0]
        assert int(net[1].num_batches_tracked) == 0


def test_fold_batchnorm_is_exact_and_removes_every_directly_following_batchnorm() -> None:
    torch.manual_seed(0)
    net = _random_statistics(
        nn.Sequential(
            nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3)
        )
    )
    x = torch.randn(5, 2, 8, 8)
    folded = fold_batchnorm(net, example_input=x)
    assert isinstance(folded[1], nn.Identity) and isinstance(net[1], nn.BatchNorm2d)  # a copy
    assert folded[0].bias is not None and not folded.training
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-5)
        # the weight rows are rescaled by gamma / sqrt(var + eps)
        bn = net[1]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        assert torch.allclose(folded[0].weight, net[0].weight * scale[:, None, None, None])
        assert torch.allclose(folded[0].bias, bn.bias - scale * bn.running_mean, atol=1e-6)
    with pytest.raises(ValueError, match=r"on example_input of shape \(5, 3, 8, 8\) failed"):
        fold_batchnorm(net, example_input=torch.randn(5, 3, 8, 8))  # 3 channels, not 2


def test_fold_batchnorm_on_a_pruned_resnet20_reloads_to_identical_outputs() -> None:
    torch.manual_seed(0)
    net = _random_statistics(resnet20())
    x = torch.randn(3, 1, 28, 28)
    masks = {f"layer{i}.0.conv1": torch.arange(16 * 2 ** (i - 1)) < 3 for i in (1, 2, 3)}
    small = prune_module(net, masks, x)
    folded = fold_batchnorm(small, example_input=x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), small(x), atol=1e-5)
        path = tempfile.mkdtemp() + "/folded.safetensors"
        save_pruned(folded, path)
        again = load_pruned(path, resnet20).eval()
        assert torch.equal(again(x), folded(x))
    assert again.layer1[0].conv1.out_channels == 3 and isinstance(again.layer1[0].bn1, nn.Identity)


def test_fold_batchnorm_leaves_batchnorms_it_cannot_fold_and_names_them() -> None:
    conv = nn.Conv2d(2, 3, 1)

    class Shared(nn.Module):  # the conv output feeds the BatchNorm and a second branch
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = conv, nn.BatchNorm2d(3)

        def forward(self, x):
            h = self.conv(x)
            return self.bn(h) + h

    x = torch.randn(2, 2, 4, 4)
    for net, name in [
        (nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.BatchNorm2d(3)), "'2'"),  # after a ReLU
        (Shared(), "'bn'"),
    ]:
        net = _random_statistics(net)
        with pytest.warns(UserWarning, match=name):
            folded = fold_batchnorm(net, example_input=x)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 1
        with torch.no_grad():
            assert torch.allclose(folded(x), net(x), atol=1e-6)


def test_fold_batchnorm_folds_a_linear_only_when_the_input_shows_its_layout() -> None:
    net = _random_statistics(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU()))
    x = torch.randn(6, 5)
    with pytest.warns(UserWarning, match="pass example_input"):
        kept = fold_batchnorm(net)
    assert isinstance(kept[1], nn.BatchNorm1d)
    folded = fold_batchnorm(net, example_input=x)
    assert isinstance(folded[1], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-5)
    # a Linear over [batch, channels, features] with BatchNorm1d on the channels cannot be folded
    net3 = _random_statistics(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(3)))
    with pytest.warns(UserWarning, match="stay"):
        same = fold_batchnorm(net3, example_input=torch.randn(2, 3, 4))
    assert isinstance(same[1], nn.BatchNorm1d)


def test_fold_batchnorm_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        fold_batchnorm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_batchnorm(
            nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
        )

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not traceable
                return self.bn(self.conv(x))
            return x

    with pytest.raises(ValueError, match=r"torch\.fx"):
        fold_batchnorm(Branchy())


def test_batchnorm_tools_are_exported() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("fold_batchnorm", "recalibrate_batchnorm"):
            assert name in bp.__all__ and callable(getattr(bp, name))


def test_compression_report_compares_a_dense_net_with_its_folded_pruned_version() -> None:
    torch.manual_seed(0)
    net = _random_statistics(resnet20())
    x = torch.randn(2, 1, 28, 28)
    small = prune_module(net, {"layer1.0.conv1": torch.arange(16) < 4}, x)
    folded = fold_batchnorm(small, example_input=x)
    rep = bp.compression_report(net, folded, x, batch_sizes=())
    rows = {s.name: s for s in rep.layers}
    assert rows["layer1.0.bn1"].kind == "BatchNorm2d (folded)"
    assert rows["layer1.0.bn1"].width_after == 0 and rows["layer1.0.bn1"].params_after == 0
    assert rows["layer1.0.conv1"].width_after == 4
    # folding trades each BatchNorm's per-element MAC for a bias add: the FLOP count is unchanged
    assert rep.flops_after == bp.compression_report(net, small, x, batch_sizes=()).flops_after
    assert rep.params_after == bp.count_params(folded)


def test_fold_batchnorm_checks_every_tensor_of_a_tuple_output() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)

        def forward(self, x):
            h = self.bn(self.conv(x))
            return h.mean((2, 3)), h.amax((2, 3))

    net = _random_statistics(TwoHeads())
    x = torch.randn(2, 1, 6, 6)
    folded = fold_batchnorm(net, example_input=x)
    assert isinstance(folded.bn, nn.Identity)
    with torch.no_grad():
        for a, b in zip(folded(x), net(x), strict=True):
            assert torch.allclose(a, b, atol=1e-5)
