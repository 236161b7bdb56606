"""digits: the fixed stratified split and its normalisation."""
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from data import build_loaders
from data.datasets import digits_splits

from .conftest import loader_kwargs


def test_split_sizes_and_stratification():
    splits = digits_splits()
    assert (len(splits.train), len(splits.test)) == (1437, 360)
    totals = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(splits.test.targets, minlength=10)
    # Stratified: each class keeps 20% of its images in the test set, up to rounding.
    assert np.all(np.abs(test_counts - 0.2 * totals) <= 1)
    assert np.array_equal(np.bincount(splits.train.targets, minlength=10) + test_counts, totals)


def test_split_is_fixed_and_partitions_the_data():
    a, b = digits_splits(), digits_splits()
    assert np.array_equal(a.test.images, b.test.images) and np.array_equal(a.test.targets, b.test.targets)

    def rows(images, targets):
        return Counter((image.tobytes(), int(t)) for image, t in zip(images, targets))

    digits = load_digits()
    assert rows(a.train.images, a.train.targets) + rows(a.test.images, a.test.targets) == rows(
        (digits.images * 15).astype(np.uint8)[..., None], digits.target)


def test_test_set_does_not_depend_on_the_run_seed():
    batches = []
    for seed in (0, 7):
        _, _, test = build_loaders("digits", **loader_kwargs(seed=seed))
        batches.append(torch.cat([x for x, _ in test]))
    assert torch.equal(*batches)


def test_loaders_shapes_and_normalisation():
    train, _, test = build_loaders("digits", **loader_kwargs(batch_size=64, eval_batch_size=100))
    assert (train.dataset_size, test.dataset_size) == (1437, 360)
    assert (len(train), len(test)) == (1437 // 64, 4)
    train.set_epoch(0)
    inputs, targets = next(iter(train))
    assert inputs.shape == (64, 1, 8, 8) and inputs.dtype == torch.float32 and targets.dtype == torch.int64
    everything = torch.cat([x for x, _ in test])
    assert everything.shape == (360, 1, 8, 8)
    # Normalised with the train split's statistics: the test split is close to zero mean, unit std.
    assert abs(everything.mean().item()) < 0.05 and abs(everything.std().item() - 1) < 0.05
    # Pixel 0 (ink-free background) maps to -mean/std; 16 to the largest value.
    splits = digits_splits()
    background = -splits.mean[0] / splits.std[0]
    assert torch.isclose(everything.min(), torch.tensor(background), atol=1e-5)
    assert torch.isclose(everything.max(), torch.tensor((240 / 255 - splits.mean[0]) / splits.std[0]), atol=1e-5)


def _examples(loader) -> Counter:
    """Every example of a loader (without augmentation) as (pixels, label) rows."""
    return Counter((x.numpy().tobytes(), int(y)) for xs, ys in loader for x, y in zip(xs, ys))


@pytest.mark.parametrize("val_split, held", [(0.1, 144), (100, 100)])  # round(0.1 × 1437) = 144
def test_a_validation_split_is_a_fixed_stratified_hold_out_of_the_training_data(val_split, held):
    train, val, test = build_loaders("digits", **loader_kwargs(batch_size=1, val_split=val_split))
    plain, none, _ = build_loaders("digits", **loader_kwargs(batch_size=1))
    assert none is None and (train.dataset_size, val.dataset_size, test.dataset_size) == (1437 - held, held, 360)
    # Train and validation partition the 1437 training images; the test set is untouched.
    assert _examples(train) + _examples(val) == _examples(plain)
    assert not set(_examples(val)) & set(_examples(test))
    # Stratified: each class is held out in proportion to its share of the 1437 (up to rounding).
    counts = np.bincount([label for _, label in _examples(val).elements()], minlength=10)
    shares = np.bincount(digits_splits().train.targets, minlength=10) * held / 1437
    assert np.all(np.abs(counts - shares) <= 1)
    # Fixed: the run seed does not move it.
    other = build_loaders("digits", **loader_kwargs(batch_size=1, val_split=val_split, seed=3)).val
    assert _examples(other) == _examples(val)


@pytest.mark.parametrize("val_split", [5, 1432, 1437])
def test_a_validation_split_that_cannot_hold_every_class_is_refused(val_split):
    with pytest.raises(ValueError, match=rf"data.val_split={val_split} holds out {val_split} of the 1437 training "
                                         r"examples; a stratified hold-out needs between 10 and 1427") as info:
        build_loaders("digits", **loader_kwargs(val_split=val_split))
    assert "\n" not in str(info.value)
