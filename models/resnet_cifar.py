"""ResNet-18 for 32×32 inputs: torchvision's resnet18 with a 3×3 stride-1 stem and no max-pool."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .layers import conv3x3
from .registry import register_model

if TYPE_CHECKING:
    from torchvision.models import ResNet


@register_model
def resnet18_cifar(num_classes: int = 100, in_chans: int = 3) -> ResNet:
    """ResNet-18 whose stem keeps the full 32×32 resolution (the usual CIFAR adaptation)."""
    from torchvision.models import resnet18  # imported when built: torchvision costs a second of start-up

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = conv3x3(in_chans, 64)
    model.maxpool = nn.Identity()
    return model
