"""GPU-resident loading for CIFAR-sized uint8 datasets (after airbench): the whole dataset is moved to the
device once, and each batch is cropped, flipped, normalised and Cut out there, with draws from a
``torch.Generator`` on that device seeded from (seed, epoch). The augmentation distribution equals the CPU
path's (torchvision RandomCrop + RandomHorizontalFlip, then Cutout after normalisation)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .augment import AugmentOptions, crop_flip, cutout_
from .datasets import ArrayImageDataset
from .sampling import epoch_seed


def unsupported_on_device(options: AugmentOptions) -> list[str]:
    """The augment options the GPU-resident loader cannot apply (they need the per-image CPU path)."""
    return [key for key, active in (("auto_augment", options.auto_augment),
                                    ("random_resized_crop", options.random_resized_crop)) if active]


class GpuResidentLoader:
    """Batches ``(inputs, targets)`` of an :class:`ArrayImageDataset` held on ``device``.

    ``options=None`` gives the evaluation loader: dataset order, no augmentation, no dropped examples (each
    rank takes every ``world_size``-th example). The training loader shuffles, gives every rank the same
    number of examples, and drops the last partial batch, like the CPU training loader.
    """

    def __init__(self, dataset: ArrayImageDataset, *, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, options: AugmentOptions | None, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if options is not None and unsupported_on_device(options):
            raise ValueError(f"gpu_resident loading does not support augment "
                             f"{', '.join(unsupported_on_device(options))}; turn it off or set data.gpu_resident=false")
        self.device = torch.device(device)
        # NHWC uint8 → NCHW once; ~150 MB for CIFAR-100's training set.
        self.images = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.targets = torch.from_numpy(dataset.targets).to(self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.batch_size, self.options, self.seed = batch_size, options, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.dataset_size = len(dataset)

    @property
    def _examples_per_rank(self) -> int:
        if self.options is None:
            return len(range(self.rank, self.dataset_size, self.world_size))
        return self.dataset_size // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration's order and augmentation a function of (seed, epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.options is None:
            return -(-self._examples_per_rank // self.batch_size)
        return self._examples_per_rank // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.options is None:
            order = torch.arange(self.rank, self.dataset_size, self.world_size, device=self.device)
        else:  # one permutation shared by all ranks, each taking its slice
            shared = torch.Generator(self.device).manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.dataset_size, device=self.device, generator=shared)
            order = order[self.rank::self.world_size][:self._examples_per_rank]
        # Augmentation drawn per rank: a shared stream would give every rank's k-th image the same crop.
        generator = torch.Generator(self.device).manual_seed(epoch_seed(self.seed, self.epoch, self.rank))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self._augment(self.images[index], generator), self.targets[index]

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        options = self.options
        if options is not None and (options.crop_padding or options.hflip):
            images = crop_flip(images, options.crop_padding, options.hflip, generator)
        images = (images.float().div_(255) - self.mean).div_(self.std)
        if options is not None and options.cutout:
            cutout_(images, options.cutout, generator)
        return images
