"""Augmentation options (the task config's ``augment`` mapping) and the batched tensor augmentations.

The batched ops run on any device: the GPU-resident loader applies them to whole batches, and the CPU
path's :class:`Cutout` applies the same op to one image, so Cutout is defined once.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentOptions:
    """Training augmentation; every field is a key of the task config's ``augment`` mapping."""

    crop_padding: int = 0                 # CIFAR-style random crop from the image zero-padded by this much
    hflip: bool = False                   # random horizontal flip, p = 0.5
    auto_augment: str | None = None       # "autoaugment" (torchvision) or a timm string: "rand-m9-mstd0.5", "augmix-m5"
    cutout: int = 0                       # side of the square zeroed after normalisation (0 = off)
    mixup: float = 0.0                    # mixup alpha (0 = off), applied to batches by build_mixup's callable
    cutmix: float = 0.0                   # CutMix alpha (0 = off)
    random_resized_crop: bool = False     # ImageNet: RandomResizedCrop instead of resize + center crop
    eval_resize: int | None = None        # ImageNet: shorter side before the center crop (default 256)

    @property
    def is_random(self) -> bool:
        """Whether the per-image CPU pipeline draws random numbers."""
        return bool(self.crop_padding or self.hflip or self.auto_augment or self.cutout or self.random_resized_crop)

    @classmethod
    def from_mapping(cls, augment: Mapping | None) -> AugmentOptions:
        """Validate ``augment`` (unknown keys, types, ranges) and fill in the defaults."""
        augment = dict(augment or {})
        unknown = sorted(set(augment) - set(_CHECKS))
        if unknown:
            raise ValueError(f"unknown augment key(s) {', '.join(unknown)}; valid keys: {', '.join(_CHECKS)}")
        for key, value in augment.items():
            is_valid, expected = _CHECKS[key]
            if not is_valid(value):
                raise ValueError(f"augment.{key} must be {expected}, got {value!r}")
        return cls(**augment)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_alpha(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and value >= 0


_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "crop_padding": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "hflip": (lambda v: isinstance(v, bool), "true or false"),
    "auto_augment": (lambda v: v is None or isinstance(v, str), "null or a policy string"),
    "cutout": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "mixup": (_is_alpha, "an alpha >= 0 (0 = off)"),
    "cutmix": (_is_alpha, "an alpha >= 0 (0 = off)"),
    "random_resized_crop": (lambda v: isinstance(v, bool), "true or false"),
    "eval_resize": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null"),
}


def crop_flip(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Random crop of each image from its zero-padded copy, then a random horizontal flip (p = 0.5).

    ``images`` is ``(N, C, H, W)`` of any dtype; offsets are uniform in ``[0, 2 * padding]`` like
    torchvision's ``RandomCrop(size, padding)``. One gather does both the crop and the flip.
    """
    n, _, h, w = images.shape
    device = images.device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    if padding:
        images = F.pad(images, (padding,) * 4)
        rows = rows + torch.randint(2 * padding + 1, (n, 1), device=device, generator=generator)
        col_offsets = torch.randint(2 * padding + 1, (n, 1), device=device, generator=generator)
    else:
        col_offsets = torch.zeros(n, 1, dtype=torch.long, device=device)
    if hflip:
        flipped = torch.rand(n, 1, device=device, generator=generator) < 0.5
        cols = torch.where(flipped, w - 1 - cols, cols)
    cols = cols + col_offsets
    batch = torch.arange(n, device=device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice put the broadcast dims first: (N, H, W, C).
    return images[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def cutout_(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero a ``size``×``size`` square per image, in place (DeVries & Taylor, 2017).

    The square's centre is uniform over the image and the square is clipped at the borders.
    """
    n, _, h, w = images.shape
    device = images.device
    top = torch.randint(h, (n, 1, 1), device=device, generator=generator) - size // 2
    left = torch.randint(w, (n, 1, 1), device=device, generator=generator) - size // 2
    ys = torch.arange(h, device=device)[None, :, None]
    xs = torch.arange(w, device=device)[None, None, :]
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return images.masked_fill_(inside[:, None], 0.0)


class Cutout:
    """Transform form of :func:`cutout_` for one normalised ``(C, H, W)`` tensor (uses torch's global RNG)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return cutout_(image[None], self.size)[0]

    def __repr__(self) -> str:
        return f"Cutout(size={self.size})"


def build_mixup(augment: Mapping | None, num_classes: int) -> Callable | None:
    """timm's Mixup/CutMix for ``(inputs, targets)`` batches, or None when both alphas are 0.

    The callable returns soft targets; label smoothing stays with the loss (not applied here).
    Batches must have an even size.
    """
    options = AugmentOptions.from_mapping(augment)
    if not (options.mixup or options.cutmix):
        return None
    from timm.data import Mixup  # imported when used: timm (with torchvision) costs a second of start-up

    return Mixup(mixup_alpha=float(options.mixup), cutmix_alpha=float(options.cutmix), label_smoothing=0.0,
                 num_classes=num_classes)
