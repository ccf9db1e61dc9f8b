import pytest
import torch
from torch import nn

from bayesprune.metrics import (
    count_flops,
    count_nonzero,
    count_params,
    flops_by_layer,
    measure_latency,
)
from bayesprune.models import lenet5_caffe, lenet_300_100


def test_linear_counts_by_hand():
    net = lenet_300_100()
    assert count_params(net) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert count_flops(net, torch.zeros(3, 1, 28, 28)) == count_params(net)  # MACs + bias adds


def test_conv_and_batchnorm_counts_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, groups=2)
    )
    x = torch.zeros(5, 3, 6, 6)
    per_layer = flops_by_layer(net, x)
    assert per_layer == {"0": 4 * 6 * 6 * 3 * 9, "1": 4 * 6 * 6, "2": 2 * 6 * 6 * 2 + 2 * 6 * 6}
    assert count_params(net) == 4 * 3 * 9 + 2 * 4 + (2 * 2 * 1 + 2)


def test_lenet5_caffe_flops_match_literature():
    # 2.3M MACs is the usual figure for LeNet-5-Caffe on 28x28 input
    macs = count_flops(lenet5_caffe(), torch.zeros(1, 1, 28, 28))
    assert (
        macs
        == 24 * 24 * 20 * 25
        + 24 * 24 * 20
        + 8 * 8 * 50 * 20 * 25
        + 8 * 8 * 50
        + 800 * 500
        + 500
        + 500 * 10
        + 10
    )


def test_count_nonzero_and_restore_mode():
    net = nn.Linear(4, 2)
    with torch.no_grad():
        net.weight[0].zero_()
    assert count_nonzero(net) == 4 + int(torch.count_nonzero(net.bias))
    net.train()
    count_flops(net, torch.zeros(1, 4))
    assert net.training


def test_numpy_or_misshapen_inputs_get_errors_that_name_the_fix():
    net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    for fn in (count_flops, measure_latency):
        with pytest.raises(TypeError, match=r"example_input is a ndarray.*torch\.from_numpy"):
            fn(net, torch.zeros(2, 8).numpy())
    with pytest.raises(ValueError, match=r"running Sequential on example_input of shape \(2, 9\)"):
        count_flops(net, torch.zeros(2, 9))
    # neither leaves hooks behind or unfreezes a module the user keeps in eval mode
    bn = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4)).train()
    bn[1].eval()
    count_flops(bn, torch.zeros(2, 8))
    measure_latency(bn, torch.zeros(2, 8), repeats=1, warmup=0)
    assert bn.training and not bn[1].training
    assert not bn[0]._forward_hooks and not bn[1]._forward_hooks


def test_latency_is_positive_and_checks_arguments():
    net = nn.Linear(8, 8)
    assert measure_latency(net, torch.zeros(2, 8), repeats=3, warmup=1) > 0
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(net, torch.zeros(2, 8), repeats=0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            measure_latency(net, torch.zeros(2, 8), device="cuda")
