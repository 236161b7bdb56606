"""Epoch-seeded sampling: each epoch's order and every example's augmentation are a pure function of
(seed, epoch), however many workers load the data and whatever else draws from the global RNGs."""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info


def epoch_seed(seed: int, epoch: int, *stream: int) -> int:
    """A 63-bit seed for one epoch, well mixed from (seed, epoch[, stream…]) so nearby tuples give unrelated
    streams (``stream``: e.g. a rank, for draws that must differ between processes)."""
    state = np.random.SeedSequence([seed, epoch, *stream]).generate_state(2, dtype=np.uint32)
    return int(state.view(np.uint64)[0] >> 1)


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, augmentation seed)`` keys for :class:`AugmentedDataset`.

    The order comes from torch's ``DistributedSampler`` (one replica unless distributed); the seeds are
    drawn per dataset index from (seed, epoch), so an example's augmentation does not depend on its position,
    its rank or the worker that loads it. Call :meth:`set_epoch` before iterating.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.order = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch))
        seeds = rng.integers(0, 2**63, size=len(self.order.dataset), dtype=np.int64)
        return ((index, int(seeds[index])) for index in self.order)


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU, Python's and NumPy's global RNGs (transforms draw from all three: torchvision from
    torch, timm's policies from random and numpy).

    In the main process (``num_workers=0``) the previous states are restored afterwards, so loading leaves
    the training step's RNG untouched; a worker process has no other user of them, and skips that cost.
    """
    in_worker = get_worker_info() is not None
    saved = None if in_worker else (torch.default_generator.get_state(), random.getstate(), np.random.get_state())
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also seed every GPU
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
    try:
        yield
    finally:
        if saved is not None:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


class AugmentedDataset(Dataset):
    """Applies ``transform`` to a ``(image, label)`` dataset.

    Keys are plain indices or ``(index, seed)`` pairs from :class:`EpochSampler`; for the latter a ``stochastic``
    transform runs under :func:`isolated_rng` ``(seed)``.
    """

    def __init__(self, base: Dataset, transform: Callable, stochastic: bool = False) -> None:
        self.base = base
        self.transform = transform
        self.stochastic = stochastic

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, target = self.base[index]
        if seed is None or not self.stochastic:
            return self.transform(image), target
        with isolated_rng(seed):
            return self.transform(image), target
