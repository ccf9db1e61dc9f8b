import pytest
import torch

from bayesprune.metrics import count_params
from models import MODELS, get_model, lenet5_caffe


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_build_and_run(name):
    net = get_model(name)
    out = net(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_reference_sizes():
    assert count_params(get_model("lenet_300_100")) == 266_610
    assert count_params(get_model("lenet5_caffe")) == 431_080
    # ResNet-20 has about 0.27M parameters (He et al. 2016)
    assert 0.26e6 < count_params(get_model("resnet20")) < 0.28e6


def test_get_model_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        get_model("nope")
    with pytest.raises(ValueError, match="too small"):
        lenet5_caffe(image_size=8)
