"""cifar100: torchvision's on-disk format, label mapping, augmentation options, missing-data errors."""
import pickle
import shutil

import pytest
import torch

from data import DatasetError, DatasetNotFoundError, build_loaders
from data.datasets import CIFAR100_MEAN, CIFAR100_STD

from .conftest import CIFAR_CLASSES, CIFAR_TEST_PER_CLASS, CIFAR_TRAIN_PER_CLASS, loader_kwargs


def red_to_label(inputs: torch.Tensor) -> torch.Tensor:
    """The fixture's red channel is 2 × label everywhere: undo the normalisation and read it back."""
    red = inputs[:, 0] * CIFAR100_STD[0] + CIFAR100_MEAN[0]
    return torch.round(red.mean(dim=(1, 2)) * 255 / 2).long()


def test_fixture_is_torchvision_format(cifar_root):
    with open(f"{cifar_root}/cifar-100-python/train", "rb") as f:
        train = pickle.load(f, encoding="latin1")
    assert set(train) == {"filenames", "batch_label", "fine_labels", "coarse_labels", "data"}
    assert train["data"].dtype.name == "uint8" and train["data"].shape == (200, 3072)
    with open(f"{cifar_root}/cifar-100-python/meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20


def test_loaders_sizes_shapes_and_labels(cifar_root):
    train, _, test = build_loaders("cifar100", **loader_kwargs(root=cifar_root, batch_size=32, eval_batch_size=64))
    n_train, n_test = CIFAR_CLASSES * CIFAR_TRAIN_PER_CLASS, CIFAR_CLASSES * CIFAR_TEST_PER_CLASS
    assert (train.dataset_size, test.dataset_size) == (n_train, n_test)
    assert (len(train), len(test)) == (n_train // 32, -(-n_test // 64))
    inputs, targets = zip(*test)
    inputs, targets = torch.cat(inputs), torch.cat(targets)
    assert inputs.shape == (n_test, 3, 32, 32) and inputs.dtype == torch.float32 and targets.dtype == torch.int64
    assert torch.equal(red_to_label(inputs), targets)
    assert torch.equal(torch.bincount(targets), torch.full((CIFAR_CLASSES,), CIFAR_TEST_PER_CLASS))
    # Green/blue are uniform noise in 0..255: normalised range is exactly [(0-m)/s, (1-m)/s].
    low, high = [(v - CIFAR100_MEAN[1]) / CIFAR100_STD[1] for v in (0.0, 1.0)]
    assert inputs[:, 1].min().item() == pytest.approx(low, abs=1e-5)
    assert inputs[:, 1].max().item() == pytest.approx(high, abs=1e-5)
    train.set_epoch(0)
    batch, labels = next(iter(train))
    assert batch.shape == (32, 3, 32, 32) and torch.equal(red_to_label(batch), labels)


def test_standard_augmentation_keeps_labels_and_pads_with_black(cifar_root):
    augment = {"crop_padding": 4, "hflip": True, "cutout": 8}
    train, _, _ = build_loaders("cifar100", **loader_kwargs(root=cifar_root, batch_size=200, augment=augment))
    train.set_epoch(3)
    inputs, targets = next(iter(train))
    black = (0 - CIFAR100_MEAN[2]) / CIFAR100_STD[2]
    # The centre pixel is never padding; Cutout zeroes (= the mean colour) some centre pixels but not all.
    centre_red = inputs[:, 0, 16, 16] * CIFAR100_STD[0] + CIFAR100_MEAN[0]
    not_cut = inputs[:, 0, 16, 16] != 0
    assert 0 < (~not_cut).sum() < 100
    assert torch.equal(torch.round(centre_red[not_cut] * 255 / 2).long(), targets[not_cut])
    # Padding shows up as black borders in some images.
    assert (inputs[:, 2, 0, :] == torch.tensor(black)).all(dim=1).any()


@pytest.mark.parametrize("policy", ["autoaugment", "rand-m9-mstd0.5", "augmix-m3-w2"])
def test_auto_augment_policies_run(cifar_root, policy):
    train, _, _ = build_loaders("cifar100", **loader_kwargs(root=cifar_root, augment={"auto_augment": policy}))
    train.set_epoch(0)
    inputs, _ = next(iter(train))
    assert inputs.shape == (16, 3, 32, 32) and torch.isfinite(inputs).all()


@pytest.mark.parametrize("augment,message", [
    ({"crop_pad": 4}, "unknown augment key"),
    ({"crop_padding": -1}, "augment.crop_padding must be an integer >= 0"),
    ({"hflip": "yes"}, "augment.hflip must be true or false"),
    ({"mixup": -0.2}, "augment.mixup must be an alpha >= 0"),
    ({"auto_augment": "trivial"}, "unknown augment.auto_augment 'trivial'"),
    ({"random_resized_crop": True}, "apply to imagenet only"),
])
def test_bad_augment_options_fail_clearly(cifar_root, augment, message):
    with pytest.raises(ValueError, match=message) as info:
        build_loaders("cifar100", **loader_kwargs(root=cifar_root, augment=augment))
    assert "\n" not in str(info.value)


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_loaders("cifar100", **loader_kwargs(root=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message
    assert f"{tmp_path}/cifar-100-python/train" in message and "cifar-100-python.tar.gz" in message
    assert "data.download=true" in message


@pytest.mark.parametrize("damage", ["truncated", "not a pickle"])
def test_a_damaged_file_says_to_re_extract(tmp_path, cifar_root, damage):
    shutil.copytree(cifar_root, tmp_path, dirs_exist_ok=True)
    train_file = tmp_path / "cifar-100-python" / "train"
    train_file.write_bytes(train_file.read_bytes()[:1000] if damage == "truncated" else b"<html>404</html>")
    with pytest.raises(DatasetError) as info:
        build_loaders("cifar100", **loader_kwargs(root=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message and f"CIFAR-100 files in {tmp_path}/cifar-100-python are unreadable" in message
    assert "cifar-100-python.tar.gz" in message and "data.download=true" in message


def test_missing_root_says_to_set_it():
    with pytest.raises(DatasetNotFoundError, match="cifar100 needs data.root"):
        build_loaders("cifar100", **loader_kwargs())


def test_unknown_dataset_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'; choose one of: digits, cifar100, imagenet"):
        build_loaders("cifar10", **loader_kwargs())
    with pytest.raises(ValueError, match="batch_size 2000 exceeds the 1437 training examples"):
        build_loaders("digits", **loader_kwargs(batch_size=2000))
    with pytest.raises(ValueError, match="eval_batch_size must be >= 1"):
        build_loaders("digits", **loader_kwargs(eval_batch_size=0))
