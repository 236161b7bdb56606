"""Wide ResNet (Zagoruyko & Komodakis, 2016) for 32×32 inputs; WRN-28-10 is the CIFAR-100 baseline.

Pre-activation wide basic blocks (BN-ReLU-conv3×3-BN-ReLU-dropout-conv3×3), a 1×1 projection shortcut
where the width or stride changes, three groups of widths 16k, 32k, 64k at strides 1, 2, 2.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import conv1x1, conv3x3
from .registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block; the projection shortcut reads the pre-activated input."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_chs, out_chs, stride)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(drop_rate)
        self.conv2 = conv3x3(out_chs, out_chs)
        self.shortcut = conv1x1(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(act)
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: (depth - 4) / 6 blocks per group."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_chans: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (e.g. 16, 22, 28, 40), got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(in_chans, 16)
        groups, in_chs = [], 16
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = [WideBasicBlock(in_chs if i == 0 else width, width, stride if i == 0 else 1, drop_rate)
                      for i in range(blocks_per_group)]
            groups.append(nn.Sequential(*blocks))
            in_chs = width
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.groups(self.conv1(x))))
        return self.fc(torch.flatten(self.global_pool(x), 1))


@register_model
def wrn28_10(num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """WRN-28-10 (36.5M parameters for 100 classes); the paper trains it with ``drop_rate=0.3``."""
    return WideResNet(28, 10, num_classes, in_chans=in_chans, drop_rate=drop_rate)
