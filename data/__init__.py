"""Datasets, transforms and loaders: ``build_loaders(dataset, ...)`` for digits, cifar100 and imagenet.

See :func:`data.loaders.build_loaders` for the loader contract and :class:`data.augment.AugmentOptions`
for the ``augment`` keys.
"""
from .augment import AugmentOptions, build_mixup
from .datasets import DatasetError, DatasetNotFoundError
from .loaders import DATASETS, Loaders, build_loaders, gpu_resident_by_default, gpu_resident_supported

__all__ = ["DATASETS", "AugmentOptions", "Loaders", "DatasetError", "DatasetNotFoundError", "build_loaders", "build_mixup",
           "gpu_resident_by_default", "gpu_resident_supported"]
