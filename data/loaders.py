"""``build_loaders``: the train and test loaders of a task's dataset, on the CPU path or GPU-resident."""
from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from .augment import AugmentOptions
from .datasets import IMAGENET_CROP, Splits, cifar100_splits, digits_splits, hold_out, imagenet_splits
from .gpu_loader import GpuResidentLoader, unsupported_on_device
from .sampling import AugmentedDataset, EpochSampler
from .transforms import eval_transform, train_transform
from .workers import worker_init

#: Each image dataset's splits, read from ``(root, download)``.
SPLIT_READERS: dict[str, Callable[[str | None, bool], Splits]] = {
    "digits": lambda root, download: digits_splits(),
    "cifar100": cifar100_splits,
    "imagenet": lambda root, download: imagenet_splits(root),
}
DATASETS = tuple(SPLIT_READERS)
#: Datasets of variable-size photos: random-resized crops for training, resize + centre crop for evaluation.
RESIZE_CROP_DATASETS = ("imagenet",)
GPU_RESIDENT_DATASETS = ("digits", "cifar100")  # uint8 arrays small enough to live on the device
#: Where "auto" keeps the data on the GPU: CIFAR-100, whose per-image augmentation on the CPU limits a GPU's
#: training speed (benchmarks/train_speed.py). Digits stays on the CPU path, the one a CPU run takes.
GPU_RESIDENT_BY_DEFAULT = ("cifar100",)


class SizedDataLoader(DataLoader):
    """A DataLoader that knows its dataset's size (``len()`` stays the number of batches) and how many processes
    share it (``world_size``: each reads its share; 1 = this process reads all of it)."""

    def __init__(self, dataset: Dataset, *, world_size: int = 1, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.dataset_size, self.world_size = len(dataset), world_size


class EpochDataLoader(SizedDataLoader):
    """The training DataLoader: forwards ``set_epoch`` to its :class:`EpochSampler`."""

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration's order and augmentation a function of (seed, epoch)."""
        self.sampler.set_epoch(epoch)


class Loaders(NamedTuple):
    """A task's loaders: training, validation (None without a validation split) and test."""

    train: Any
    val: Any
    test: Any


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed=True needs an initialized process group; launch with torchrun")
    return dist.get_rank(), dist.get_world_size()


def gpu_resident_supported(dataset: str, augment: Mapping | None) -> bool:
    """Whether ``build_loaders(dataset, augment=augment, gpu_resident=True)`` is possible."""
    return dataset in GPU_RESIDENT_DATASETS and not unsupported_on_device(AugmentOptions.from_mapping(augment))


def gpu_resident_by_default(dataset: str, augment: Mapping | None, *, cuda: bool) -> bool:
    """What ``gpu_resident`` "auto" means: on a CUDA device, for a dataset of :data:`GPU_RESIDENT_BY_DEFAULT` whose
    ``augment`` the device can apply; elsewhere the CPU path."""
    return cuda and dataset in GPU_RESIDENT_BY_DEFAULT and gpu_resident_supported(dataset, augment)


def _check_counts(*, batch_size: int, eval_batch_size: int, num_workers: int, seed: int) -> None:
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def build_loaders(dataset: str, *, root: str | None, batch_size: int, eval_batch_size: int,
                  augment: Mapping | None, num_workers: int, pin_memory: bool, download: bool, seed: int,
                  distributed: bool = False, device: torch.device | None = None,
                  gpu_resident: bool = False, val_split: float | int = 0) -> Loaders:
    """Train, validation and test loaders yielding ``(normalised float NCHW inputs, int64 targets)``.

    The train loader shuffles, augments with ``augment`` (see :class:`AugmentOptions`) and drops the last
    partial batch; call its ``set_epoch(epoch)`` before each epoch. ``val_split`` (a fraction in (0, 1) or a
    count; 0 = none) holds out a stratified, fixed part of the training data (:func:`data.datasets.hold_out`)
    as the validation set. The validation and test loaders keep dataset order and do not augment. When
    ``distributed``, each rank trains and validates on its share (validation: every world-size-th example, no
    padding, so summed counts are exact); the test loader is the whole split on every rank: one process evaluates
    and counts it, as ``verify`` does. ``gpu_resident`` (digits, cifar100) keeps the data on ``device`` and
    augments there. Every loader has ``len()`` (batches on this rank), ``dataset_size`` (examples in the dataset)
    and ``world_size`` (the processes sharing it).
    """
    _check_counts(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    if gpu_resident and dataset not in GPU_RESIDENT_DATASETS:
        raise ValueError(f"gpu_resident loading needs a CIFAR-sized dataset ({', '.join(GPU_RESIDENT_DATASETS)}), "
                         f"not {dataset}; set data.gpu_resident=false")
    options = AugmentOptions.from_mapping(augment)
    if (options.mixup or options.cutmix) and batch_size % 2:
        raise ValueError(f"augment.mixup / augment.cutmix need an even batch_size (each example is mixed with "
                         f"its mirror in the batch), got {batch_size}")
    rank, world_size = _rank_and_world(distributed)
    splits = SPLIT_READERS[dataset](root, download)
    train_examples, val_examples = hold_out(splits.train, val_split) if val_split else (splits.train, None)
    if len(train_examples) // world_size < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train_examples) // world_size} training examples "
                         f"per rank of {dataset}; lower it")
    if gpu_resident:
        common = dict(mean=splits.mean, std=splits.std, device=device or torch.device("cpu"), seed=seed)
        shared = dict(common, rank=rank, world_size=world_size)
        val = None if val_examples is None else GpuResidentLoader(val_examples, batch_size=eval_batch_size,
                                                                  options=None, **shared)
        test = GpuResidentLoader(splits.test, batch_size=eval_batch_size, options=None, **common)
        return Loaders(GpuResidentLoader(train_examples, batch_size=batch_size, options=options, **shared), val, test)

    resize_crop = dataset in RESIZE_CROP_DATASETS
    image_size = IMAGENET_CROP if resize_crop else splits.train.images.shape[1]
    geometry = dict(image_size=image_size, mean=splits.mean, std=splits.std, resize_crop=resize_crop)
    train_set = AugmentedDataset(train_examples, train_transform(options, **geometry), stochastic=options.is_random)
    workers = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                   worker_init_fn=functools.partial(worker_init, os.getpid()) if num_workers else None)
    train = EpochDataLoader(
        train_set, batch_size=batch_size, drop_last=True, world_size=world_size,
        sampler=EpochSampler(train_set, seed, num_replicas=world_size, rank=rank),
        # Worker seeds come from this generator, never from the global RNG the training step draws from.
        generator=torch.Generator().manual_seed(seed), **workers)

    def evaluation(examples: Dataset | None, rank: int, world_size: int) -> SizedDataLoader | None:
        if examples is None:
            return None
        dataset = AugmentedDataset(examples, eval_transform(options, **geometry))
        return SizedDataLoader(dataset, batch_size=eval_batch_size, world_size=world_size,
                               sampler=range(rank, len(dataset), world_size),
                               generator=torch.Generator().manual_seed(seed), **workers)
    return Loaders(train, evaluation(val_examples, rank, world_size), evaluation(splits.test, 0, 1))
