"""data/transforms.py builds the crop, flip and normalisation of digits and CIFAR from tensor ops, without
torchvision: their outputs must be bit-identical to the torchvision pipeline they replace, draw for draw."""
import numpy as np
import pytest
import torch
from torchvision import transforms as T

from data.augment import AugmentOptions, Cutout
from data.datasets import ArrayImageDataset
from data.sampling import AugmentedDataset, EpochSampler
from data.transforms import eval_transform, train_transform

IMAGES = 64
DIGITS = dict(shape=(8, 8, 1), mean=(0.2725,), std=(0.3212,), augment={"crop_padding": 1})  # the digits task's
CIFAR = dict(shape=(32, 32, 3), mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
             augment={"crop_padding": 4, "hflip": True, "cutout": 8})
FLIP_ONLY = dict(CIFAR, augment={"hflip": True})


def torchvision_train(options: AugmentOptions, size: int, mean, std) -> T.Compose:
    """The CPU training pipeline as it was built with torchvision."""
    return T.Compose(([T.RandomCrop(size, padding=options.crop_padding)] if options.crop_padding else [])
                     + ([T.RandomHorizontalFlip()] if options.hflip else [])
                     + [T.ToTensor(), T.Normalize(mean, std)] + ([Cutout(options.cutout)] if options.cutout else []))


def random_images(shape: tuple[int, int, int]) -> ArrayImageDataset:
    images = np.random.default_rng(0).integers(0, 256, (IMAGES, *shape), dtype=np.uint8)
    return ArrayImageDataset(images, np.zeros(IMAGES, dtype=np.int64))


def epoch(dataset: ArrayImageDataset, transform, stochastic: bool) -> torch.Tensor:
    """Every image of one seeded epoch, each under its own augmentation seed, as the CPU loader draws them."""
    images = AugmentedDataset(dataset, transform, stochastic=stochastic)
    sampler = EpochSampler(images, seed=3)
    sampler.set_epoch(1)
    return torch.stack([images[key][0] for key in sampler])


@pytest.mark.parametrize("case", [DIGITS, CIFAR, FLIP_ONLY], ids=["digits", "cifar", "flip_only"])
def test_train_and_eval_pipelines_equal_torchvisions_bit_for_bit(case):
    options = AugmentOptions.from_mapping(case["augment"])
    size, geometry = case["shape"][0], dict(mean=case["mean"], std=case["std"])
    dataset = random_images(case["shape"])
    ours = epoch(dataset, train_transform(options, size, resize_crop=False, **geometry), stochastic=True)
    reference = epoch(dataset, torchvision_train(options, size, **geometry), stochastic=True)
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, epoch(dataset, eval_transform(options, size, resize_crop=False, **geometry),
                                       stochastic=False))  # the draws did change the images
    assert torch.equal(epoch(dataset, eval_transform(options, size, resize_crop=False, **geometry), stochastic=False),
                       epoch(dataset, T.Compose([T.ToTensor(), T.Normalize(**geometry)]), stochastic=False))
