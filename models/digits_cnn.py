"""The digits task's reference CNN (input 1×8×8).

Its exact layout is part of the contract: the scorer's digits baseline is this model counted dense at
32 bits, so any change here changes the baseline.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.ops import Conv2dNormActivation

from .registry import register_model


@register_model
def digits_cnn(num_classes: int = 10, in_chans: int = 1) -> nn.Sequential:
    """conv(32)-BN-ReLU → conv(64)-BN-ReLU → max-pool 2 → conv(128)-BN-ReLU → global avg pool → linear.

    All convolutions are 3×3, padding 1, without bias (BN follows).
    """
    return nn.Sequential(OrderedDict(
        conv1=Conv2dNormActivation(in_chans, 32, kernel_size=3),
        conv2=Conv2dNormActivation(32, 64, kernel_size=3),
        pool=nn.MaxPool2d(2),
        conv3=Conv2dNormActivation(64, 128, kernel_size=3),
        global_pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(1),
        fc=nn.Linear(128, num_classes),
    ))
