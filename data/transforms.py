"""Per-image CPU transform pipelines (PIL in, normalised float tensor out) built from the augment options.

Crops from the zero-padded image, flips and Cutout are data.augment's tensor ops (the GPU-resident loader's): they
draw as torchvision's RandomCrop and RandomHorizontalFlip do, so the pipeline's output is the same as with those.
torchvision and timm are imported only by the pipelines that need PIL steps (ImageNet's resizes and crops, the
auto-augment policies): importing torchvision pulls in torch._dynamo, a second of start-up that a digits or CIFAR
run need not pay.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .augment import AugmentOptions, Cutout, crop_flip

DEFAULT_EVAL_RESIZE = 256


class Pipeline:
    """Steps applied in order, each to the previous one's output (torchvision's Compose, without torchvision)."""

    def __init__(self, steps: Sequence[Callable]) -> None:
        self.steps = list(steps)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(map(repr, self.steps))})"


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a ``(C, H, W)`` uint8 tensor (its own copy of the pixels)."""
    pixels = np.array(image, dtype=np.uint8)
    return torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1).contiguous()


class Normalise:
    """uint8 ``(C, H, W)`` → float32 in [0, 1] → ``(x - mean) / std`` per channel: torchvision's ToTensor then
    Normalize, the same operations in the same order, so the values are bit-identical."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image.to(torch.float32).div(255) - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalise(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class CropFlip:
    """:func:`data.augment.crop_flip` for one ``(C, H, W)`` image, from torch's global RNG."""

    def __init__(self, padding: int, hflip: bool) -> None:
        self.padding, self.hflip = padding, hflip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return crop_flip(image[None], self.padding, self.hflip)[0].contiguous()

    def __repr__(self) -> str:
        return f"CropFlip(padding={self.padding}, hflip={self.hflip})"


def _auto_augment(policy: str, image_size: int, mean: Sequence[float]) -> Callable:
    from timm.data.auto_augment import augment_and_mix_transform, rand_augment_transform
    from torchvision import transforms as T

    if policy == "autoaugment":
        return T.AutoAugment(T.AutoAugmentPolicy.CIFAR10 if image_size <= 32 else T.AutoAugmentPolicy.IMAGENET)
    # timm's policies need the fill colour and the translation scale of this image size.
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
    if policy.startswith("rand"):
        return rand_augment_transform(policy, hparams)
    if policy.startswith("augmix"):
        return augment_and_mix_transform(policy, hparams)
    raise ValueError(f"unknown augment.auto_augment {policy!r}; use autoaugment, rand-<...> (e.g. rand-m9-mstd0.5) "
                     f"or augmix-<...> (timm's notation)")


def _pil_augmentation(options: AugmentOptions, image_size: int, mean: Sequence[float], resize_crop: bool) -> list:
    """The training steps on PIL images: torchvision's geometry and flip, then the auto-augment policy (which needs
    PIL, so the crop and flip before it are torchvision's too)."""
    from torchvision import transforms as T

    if resize_crop:
        steps = ([T.RandomResizedCrop(image_size)] if options.random_resized_crop
                 else _resize_center_crop(options, image_size))
    else:
        steps = [T.RandomCrop(image_size, padding=options.crop_padding)] if options.crop_padding else []
    steps += [T.RandomHorizontalFlip()] if options.hflip else []
    if options.auto_augment:
        steps.append(_auto_augment(options.auto_augment, image_size, mean))
    return steps


def train_transform(options: AugmentOptions, image_size: int, mean: Sequence[float], std: Sequence[float],
                    resize_crop: bool) -> Pipeline:
    """Training pipeline: geometry, flip, auto-augment, normalisation, Cutout (zeroes = the mean colour).

    ``resize_crop`` selects ImageNet geometry (RandomResizedCrop, or resize + center crop); otherwise the
    image keeps its native size and ``crop_padding`` gives CIFAR's pad-and-crop.
    """
    if resize_crop and options.crop_padding:
        raise ValueError("augment.crop_padding applies to CIFAR-sized data; for imagenet use random_resized_crop")
    if not resize_crop and (options.random_resized_crop or options.eval_resize is not None):
        raise ValueError("augment.random_resized_crop / eval_resize apply to imagenet only; use crop_padding here")
    if resize_crop or options.auto_augment:
        steps = _pil_augmentation(options, image_size, mean, resize_crop) + [to_uint8_tensor]
    else:
        steps = [to_uint8_tensor] + ([CropFlip(options.crop_padding, options.hflip)]
                                     if options.crop_padding or options.hflip else [])
    steps.append(Normalise(mean, std))
    if options.cutout:
        steps.append(Cutout(options.cutout))
    return Pipeline(steps)


def _resize_center_crop(options: AugmentOptions, image_size: int) -> list:
    from torchvision import transforms as T

    resize = options.eval_resize or DEFAULT_EVAL_RESIZE
    if resize < image_size:  # the center crop would pad with black
        raise ValueError(f"augment.eval_resize ({resize}) must be >= the {image_size}-pixel crop")
    return [T.Resize(resize), T.CenterCrop(image_size)]


def eval_transform(options: AugmentOptions, image_size: int, mean: Sequence[float], std: Sequence[float],
                   resize_crop: bool) -> Pipeline:
    """Evaluation pipeline: (ImageNet: resize + center crop), normalisation."""
    geometry = _resize_center_crop(options, image_size) if resize_crop else []
    return Pipeline(geometry + [to_uint8_tensor, Normalise(mean, std)])
