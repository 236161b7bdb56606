"""DenseNet-BC (Huang et al., 2017, "Densely Connected Convolutional Networks") for 32×32 inputs.

The CIFAR configuration of the paper: a 3×3 stem conv with 2k channels; three dense blocks of (depth - 4) / 6
bottleneck layers, each BN-ReLU-conv1×1(4k)-BN-ReLU-conv3×3(k) whose k new channels are concatenated to its
input; between blocks a transition BN-ReLU-conv1×1(⌊θ·C⌋)-avg-pool2 (θ the compression, 0.5 for "C");
then BN-ReLU-global average pool-linear. DenseNet-BC-100 with k = 12 is the 2019 MicroNet CIFAR-100 winner's
starting architecture (0.8M parameters).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import conv1x1, conv3x3
from .registry import register_model

#: Channels of a bottleneck layer's 1×1 conv, in growth rates (the "B" of BC).
BOTTLENECK_WIDTH = 4


class DenseLayer(nn.Module):
    """Bottleneck layer: its ``growth_rate`` new feature maps, appended to its input."""

    def __init__(self, in_chs: int, growth_rate: int, drop_rate: float) -> None:
        super().__init__()
        width = BOTTLENECK_WIDTH * growth_rate
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(in_chs, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, growth_rate)
        # On the new features only (as torchvision's DenseNet), so the 1×1 conv's batch norm still reads it.
        self.dropout = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x))))))
        return torch.cat([x, self.dropout(new)], 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1×1-avg-pool2: compresses the channels and halves the resolution between dense blocks."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv = conv1x1(in_chs, out_chs)
        self.pool = nn.AvgPool2d(2)


class DenseNet(nn.Module):
    """DenseNet-BC-``depth`` with growth rate ``growth_rate`` (k) and compression ``compression`` (θ)."""

    def __init__(self, depth: int, growth_rate: int, num_classes: int, in_chans: int = 3,
                 compression: float = 0.5, drop_rate: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n+4 with n >= 1 (e.g. 100, 190, 250), got {depth}")
        if not 0 < compression <= 1:
            raise ValueError(f"DenseNet-BC compression must be in (0, 1], got {compression}")
        layers_per_block = (depth - 4) // 6  # each bottleneck layer holds two of the depth's convs
        channels = 2 * growth_rate
        self.conv1 = conv3x3(in_chans, channels)
        stages: list[nn.Module] = []
        for block in range(3):
            if block:
                compressed = int(compression * channels)
                stages.append(Transition(channels, compressed))
                channels = compressed
            layers = [DenseLayer(channels + i * growth_rate, growth_rate, drop_rate) for i in range(layers_per_block)]
            stages.append(nn.Sequential(*layers))
            channels += layers_per_block * growth_rate
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.features(self.conv1(x))))
        return self.fc(torch.flatten(self.global_pool(x), 1))


@register_model
def densenet_bc(num_classes: int = 100, in_chans: int = 3, depth: int = 100, growth_rate: int = 12,
                compression: float = 0.5, drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-BC of any 6n+4 ``depth`` and growth rate; the paper's CIFAR models are 100/12, 250/24, 190/40.

    ``drop_rate`` drops each bottleneck layer's new features in training (the paper drops 0.2 after every conv
    but the stem when it trains without augmentation).
    """
    return DenseNet(depth, growth_rate, num_classes, in_chans=in_chans, compression=compression, drop_rate=drop_rate)


@register_model
def densenet_bc_100(num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0) -> DenseNet:
    """DenseNet-BC-100 with k = 12 (800,032 parameters for 100 classes), the MicroNet 2019 CIFAR-100 winner's base."""
    return DenseNet(100, 12, num_classes, in_chans=in_chans, drop_rate=drop_rate)
