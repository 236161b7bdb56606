"""ImageNet-scale architectures built by timm (no pretrained weights), and EfficientNet-B0 for 32×32 inputs.

timm is imported when one of them is built, not when they are registered: it imports torchvision and with it
torch._dynamo, more than a second of start-up that every command would pay otherwise.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from torch import nn

from .registry import register_model

if TYPE_CHECKING:
    from timm.models.efficientnet import EfficientNet


# Registered as timm builds them (untrained), under timm's names.
_TIMM_MODELS = {
    "efficientnet_b0": "EfficientNet-B0 (224×224)",
    "mixnet_s": "MixNet-S (224×224)",
    "resnet50": "ResNet-50 (224×224)",
    "mobilenetv2_140": "MobileNetV2 with width 1.4 (224×224), the ImageNet baseline architecture",
}


def _register_timm_model(name: str, description: str) -> None:
    def entrypoint(num_classes: int = 1000, **kwargs) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"timm's {description}, without pretrained weights."
    register_model(entrypoint)


for _name, _description in _TIMM_MODELS.items():
    _register_timm_model(_name, _description)


# EfficientNet-B0's stages in timm's arch-def notation, with stage 2 at stride 1 instead of 2. Together with a
# stride-1 stem, the total stride drops from 32 to 8: a 32×32 input ends on a 4×4 map, as 224 ends on 7×7.
_B0_CIFAR_ARCH = [
    ["ds_r1_k3_s1_e1_c16_se0.25"],
    ["ir_r2_k3_s1_e6_c24_se0.25"],
    ["ir_r2_k5_s2_e6_c40_se0.25"],
    ["ir_r3_k3_s2_e6_c80_se0.25"],
    ["ir_r3_k5_s1_e6_c112_se0.25"],
    ["ir_r4_k5_s2_e6_c192_se0.25"],
    ["ir_r1_k3_s1_e6_c320_se0.25"],
]


@register_model
def efficientnet_b0_cifar(num_classes: int = 100, in_chans: int = 3, **kwargs) -> EfficientNet:
    """EfficientNet-B0 for 32×32 inputs: B0's blocks and widths, total stride 8 instead of 32.

    Same parameters as ``efficientnet_b0``; only the stem and the first stage-2 block change stride.
    """
    from timm.layers import create_conv2d
    from timm.models import efficientnet
    from timm.models._efficientnet_builder import decode_arch_def

    model = efficientnet.EfficientNet(
        block_args=decode_arch_def(_B0_CIFAR_ARCH),
        num_classes=num_classes,
        in_chans=in_chans,
        stem_size=32,
        num_features=1280,
        round_chs_fn=partial(efficientnet.round_channels, multiplier=1.0, divisor=8),
        act_layer=nn.SiLU,
        **kwargs,
    )
    # timm's EfficientNet always builds a stride-2 stem; keep the input resolution instead.
    model.conv_stem = create_conv2d(in_chans, model.conv_stem.out_channels, 3, stride=1)
    return model
