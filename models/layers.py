"""Bias-free convolution constructors shared by the architectures (digits_cnn, densenet, wide_resnet,
resnet_cifar).

They equal torchvision's ``models.resnet.conv1x1`` / ``conv3x3`` (same layers, same parameter draws), written here
because importing torchvision pulls in torch._dynamo, a second of start-up that a digits run need not pay.
May import torch only.
"""
from __future__ import annotations

from torch import nn


def conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    """A 1×1 convolution without bias (a batch norm follows or precedes it)."""
    return nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)


def conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    """A 3×3 convolution with padding 1 without bias: the spatial size stays unless ``stride`` reduces it."""
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
