"""Every registered model runs at its input size; parameter counts derived by hand from the architectures."""
import pytest
import timm
import torch
from torch import nn

from models import create_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k  # all convolutions here are bias-free


def bn(c: int) -> int:
    return 2 * c


@pytest.mark.parametrize("name,in_chans,size,num_classes", [
    ("digits_cnn", 1, 8, 10),
    ("resnet18_cifar", 3, 32, 100),
    ("wrn28_10", 3, 32, 100),
    ("efficientnet_b0_cifar", 3, 32, 100),
    ("efficientnet_b0", 3, 224, 1000),
    ("mixnet_s", 3, 224, 1000),
    ("resnet50", 3, 224, 1000),
    ("mobilenetv2_140", 3, 224, 1000),
])
def test_forward_shape(name, in_chans, size, num_classes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_digits_cnn_matches_the_contract():
    model = create_model("digits_cnn", num_classes=10)
    expected = (conv(1, 32, 3) + bn(32) + conv(32, 64, 3) + bn(64) + conv(64, 128, 3) + bn(128)
                + 128 * 10 + 10)
    assert n_params(model) == expected == 94_186
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding, c.bias) for c in convs] == [
        (1, 32, (3, 3), (1, 1), None), (32, 64, (3, 3), (1, 1), None), (64, 128, (3, 3), (1, 1), None)]
    assert [type(m).__name__ for m in model.modules() if not list(m.children())] == [
        "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU", "AdaptiveAvgPool2d", "Flatten", "Linear"]


def test_resnet18_cifar_parameters_and_stem():
    model = create_model("resnet18_cifar", num_classes=100)
    stem = conv(3, 64, 3) + bn(64)
    widths = [64, 128, 256, 512]
    stages = 0
    for i, width in enumerate(widths):
        cin = widths[i - 1] if i else 64
        first = conv(cin, width, 3) + bn(width) + conv(width, width, 3) + bn(width)
        if cin != width:  # 1×1 stride-2 projection + its BN
            first += conv(cin, width, 1) + bn(width)
        second = 2 * (conv(width, width, 3) + bn(width))
        stages += first + second
    assert n_params(model) == stem + stages + 512 * 100 + 100 == 11_220_132
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    # 32×32 in → 4×4 before the pool (stride 8 over the three strided stages).
    features = nn.Sequential(*list(model.children())[:-2])
    assert features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)


def test_wrn28_10_parameters():
    model = create_model("wrn28_10", num_classes=100)
    total, cin = conv(3, 16, 3), 16
    for width in (160, 320, 640):
        for block in range(4):  # (28 - 4) / 6 blocks per group
            block_in = cin if block == 0 else width
            total += bn(block_in) + conv(block_in, width, 3) + bn(width) + conv(width, width, 3)
            if block == 0:
                total += conv(block_in, width, 1)  # projection shortcut
        cin = width
    total += bn(640) + 640 * 100 + 100
    assert n_params(model) == total == 36_536_884


def test_wrn_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = create_model("wrn28_10", num_classes=10, drop_rate=0.5)
    block = model.groups[0][1]
    x = torch.randn(2, 160, 8, 8)
    block.train()
    assert not torch.equal(block(x), block(x))
    block.eval()
    assert torch.equal(block(x), block(x))


def test_wrn_rejects_a_depth_that_is_not_6n_plus_4():
    from models.wide_resnet import WideResNet
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=27, widen_factor=2, num_classes=10)


def test_efficientnet_b0_cifar_is_b0_with_total_stride_8():
    model = create_model("efficientnet_b0_cifar", num_classes=100)
    assert n_params(model) == n_params(timm.create_model("efficientnet_b0", num_classes=100)) == 4_135_648
    assert model.conv_stem.stride == (1, 1)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 1280, 4, 4)
