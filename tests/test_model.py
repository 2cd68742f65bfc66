"""The networks: parameter counts from their layer shapes, output shapes, the model factory."""

import pytest
import torch
import torchvision
from torch import nn

import config
from model import ResNet18Cifar, SimpleCNN, build_model, count_params


def conv_params(c_in: int, c_out: int, k: int, bias: bool) -> int:
    return c_out * c_in * k * k + (c_out if bias else 0)


def bn_params(c: int) -> int:
    return 2 * c  # weight and bias


def test_simplecnn_parameter_count_matches_its_layer_shapes():
    # Five 3x3 conv (with bias) + BN layers, then linear 128 -> 10.
    widths = [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128)]
    expected = sum(conv_params(i, o, 3, bias=True) + bn_params(o) for i, o in widths) + 128 * 10 + 10
    n = count_params(SimpleCNN())
    assert n == expected
    assert round(n / 1e6, 3) == 0.141  # the study's "0.141 M parameters"


def test_resnet18cifar_parameter_count_matches_its_layer_shapes():
    def block(c_in, c_out, stride):
        n = conv_params(c_in, c_out, 3, False) + bn_params(c_out) + conv_params(c_out, c_out, 3, False)
        n += bn_params(c_out)
        if stride != 1 or c_in != c_out:
            n += conv_params(c_in, c_out, 1, False) + bn_params(c_out)
        return n

    expected = conv_params(3, 64, 3, False) + bn_params(64)
    c_in = 64
    for width, stride in zip((64, 128, 256, 512), (1, 2, 2, 2), strict=True):
        expected += block(c_in, width, stride) + block(width, width, 1)
        c_in = width
    expected += 512 * 10 + 10
    assert count_params(ResNet18Cifar()) == expected


def test_resnet18cifar_has_torchvision_resnet18_parameters_with_a_cifar_stem():
    # torchvision's ResNet-18 with the 7x7 stem swapped for a bias-free 3x3 conv and no max-pool.
    reference = torchvision.models.resnet18(num_classes=10)
    reference.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    n = count_params(ResNet18Cifar())
    assert n == count_params(reference)
    assert round(n / 1e6, 3) == 11.174


@pytest.mark.parametrize("name", ["simplecnn", "resnet18"])
@pytest.mark.parametrize("num_classes", [10, 7])
def test_output_shape(name, num_classes):
    net = build_model(name, num_classes=num_classes).eval()
    with torch.no_grad():
        out = net(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


def test_build_model_accepts_the_resnet18cifar_alias_in_any_case():
    assert isinstance(build_model("ResNet18Cifar"), ResNet18Cifar)
    assert isinstance(build_model("RESNET18"), ResNet18Cifar)
    assert isinstance(build_model("SimpleCNN"), SimpleCNN)


def test_build_model_unknown_name_lists_the_valid_names():
    with pytest.raises(config.ConfigError) as info:
        build_model("vgg16")
    message = str(info.value)
    assert "vgg16" in message
    for name in config.MODELS:
        assert name in message


def test_count_params_skips_frozen_parameters():
    net = SimpleCNN()
    total = count_params(net)
    net.classifier.requires_grad_(False)
    assert count_params(net) == total - (128 * 10 + 10)


def test_simplecnn_dropout_only_in_training_mode():
    net = SimpleCNN()
    x = torch.randn(4, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
    net.train()
    torch.manual_seed(0)
    with torch.no_grad():
        a = net.classifier(net.dropout(torch.ones(4, 128)))
        b = net.classifier(torch.ones(4, 128))
    assert not torch.allclose(a, b)
