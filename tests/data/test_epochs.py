"""set_epoch: each epoch's order and augmentation are a pure function of (seed, epoch), with or without
worker processes; rank splits cover the data disjointly."""
import random

import numpy as np
import pytest
import torch

from data import build_loaders
from data.sampling import EpochSampler

from .conftest import loader_kwargs

AUGMENT = {"crop_padding": 4, "hflip": True, "cutout": 8, "auto_augment": "rand-m9-mstd0.5"}


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_is_a_function_of_seed_and_epoch(cifar_root, num_workers):
    def loader():
        return build_loaders("cifar100", **loader_kwargs(root=cifar_root, batch_size=50, augment=AUGMENT,
                                                         num_workers=num_workers))[0]

    first = loader()
    epoch0, epoch1 = epoch_batches(first, 0), epoch_batches(first, 1)
    resumed = loader()  # a fresh process resuming at epoch 1
    assert same(epoch_batches(resumed, 1), epoch1)
    assert same(epoch_batches(first, 0), epoch0)  # re-running an epoch repeats it
    assert not torch.equal(epoch0[0][1], epoch1[0][1])  # different order
    # Same example in both epochs, augmented differently: compare the first example of epoch 0 with itself.
    x0, y0 = torch.cat([x for x, _ in epoch0]), torch.cat([y for _, y in epoch0])
    x1, y1 = torch.cat([x for x, _ in epoch1]), torch.cat([y for _, y in epoch1])
    assert sorted(y0.tolist()) == sorted(y1.tolist())
    assert not torch.equal(x0.sum(dim=(1, 2, 3)).sort().values, x1.sum(dim=(1, 2, 3)).sort().values)


def test_workers_do_not_change_the_batches(cifar_root):
    batches = [epoch_batches(build_loaders("cifar100", **loader_kwargs(
        root=cifar_root, batch_size=50, augment=AUGMENT, num_workers=workers))[0], 2) for workers in (0, 2)]
    assert same(*batches)


def test_loading_leaves_the_global_rngs_alone(cifar_root):
    train, _, test = build_loaders("cifar100", **loader_kwargs(root=cifar_root, augment=AUGMENT))
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    epoch_batches(train, 0), list(test)
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]


def test_rank_samplers_cover_the_dataset_disjointly():
    dataset = list(range(101))
    ranks = [EpochSampler(dataset, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(5)
    keys = [list(sampler) for sampler in ranks]
    assert len(keys[0]) == len(keys[1]) == 51  # DistributedSampler pads 101 to 2 × 51 with one repeat
    indices = [index for rank_keys in keys for index, _ in rank_keys]
    assert sorted(set(indices)) == dataset and len(indices) == 102
    # An example's augmentation seed depends on (seed, epoch, index) only, not on its rank or position.
    seeds = {}
    for index, seed in keys[0] + keys[1]:
        assert seeds.setdefault(index, seed) == seed
    single = EpochSampler(dataset, seed=3)
    single.set_epoch(5)
    assert dict(single) == seeds


def test_distributed_needs_a_process_group():
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        build_loaders("digits", **loader_kwargs(distributed=True))
