"""Per-image CPU transform pipelines (PIL in, normalised float tensor out) built from the augment options.

torchvision and timm are imported by the functions that build a pipeline, not with the module: importing them costs
start-up that a command which builds no pipeline (``--help``, a refusal, ``python -m scoring`` on an architecture)
need not pay (benchmarks/README.md, "Start-up").
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .augment import AugmentOptions, Cutout

if TYPE_CHECKING:
    from torchvision.transforms import Compose

DEFAULT_EVAL_RESIZE = 256


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


def _to_normalised(mean: Sequence[float], std: Sequence[float]) -> list:
    from torchvision import transforms as T

    return [T.ToTensor(), T.Normalize(mean, std)]


def train_transform(options: AugmentOptions, image_size: int, mean: Sequence[float], std: Sequence[float],
                    resize_crop: bool) -> Compose:
    """Training pipeline: geometry, flip, auto-augment, normalisation, Cutout (zeroes = the mean colour).

    ``resize_crop`` selects ImageNet geometry (RandomResizedCrop, or resize + center crop); otherwise the
    image keeps its native size and ``crop_padding`` gives CIFAR's pad-and-crop.
    """
    from torchvision import transforms as T

    if resize_crop and options.crop_padding:
        raise ValueError("augment.crop_padding applies to CIFAR-sized data; for imagenet use random_resized_crop")
    if resize_crop:
        geometry = ([T.RandomResizedCrop(image_size)] if options.random_resized_crop
                    else _resize_center_crop(options, image_size))
    elif options.random_resized_crop or options.eval_resize is not None:
        raise ValueError("augment.random_resized_crop / eval_resize apply to imagenet only; use crop_padding here")
    else:
        geometry = [T.RandomCrop(image_size, padding=options.crop_padding)] if options.crop_padding else []
    steps = geometry + ([T.RandomHorizontalFlip()] if options.hflip else [])
    if options.auto_augment:
        steps.append(_auto_augment(options.auto_augment, image_size, mean))
    steps += _to_normalised(mean, std)
    if options.cutout:
        steps.append(Cutout(options.cutout))
    return T.Compose(steps)


def _resize_center_crop(options: AugmentOptions, image_size: int) -> list:
    from torchvision import transforms as T

    resize = options.eval_resize or DEFAULT_EVAL_RESIZE
    if resize < image_size:  # the center crop would pad with black
        raise ValueError(f"augment.eval_resize ({resize}) must be >= the {image_size}-pixel crop")
    return [T.Resize(resize), T.CenterCrop(image_size)]


def eval_transform(options: AugmentOptions, image_size: int, mean: Sequence[float], std: Sequence[float],
                   resize_crop: bool) -> Compose:
    """Evaluation pipeline: (ImageNet: resize + center crop), normalisation."""
    from torchvision import transforms as T

    return T.Compose((_resize_center_crop(options, image_size) if resize_crop else []) + _to_normalised(mean, std))
