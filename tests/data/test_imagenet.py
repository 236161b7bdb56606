"""imagenet: class folders, resize/crop geometry, label mapping, missing-data errors."""
import shutil

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from data import DatasetError, DatasetNotFoundError, build_loaders
from tests.fixtures import imagenet_red

from .conftest import IMAGENET_CLASSES, IMAGENET_TRAIN_PER_CLASS, IMAGENET_VAL_PER_CLASS, loader_kwargs

AUGMENT = {"random_resized_crop": True, "hflip": True, "eval_resize": 232}


def red_levels(inputs: torch.Tensor) -> torch.Tensor:
    return (inputs[:, 0] * IMAGENET_DEFAULT_STD[0] + IMAGENET_DEFAULT_MEAN[0]).mean(dim=(1, 2)) * 255


def test_loaders_sizes_shapes_and_labels(imagenet_root):
    train, _, val = build_loaders("imagenet", **loader_kwargs(root=imagenet_root, batch_size=4, eval_batch_size=4,
                                                           augment=AUGMENT))
    n_train, n_val = IMAGENET_CLASSES * IMAGENET_TRAIN_PER_CLASS, IMAGENET_CLASSES * IMAGENET_VAL_PER_CLASS
    assert (train.dataset_size, val.dataset_size) == (n_train, n_val)
    assert (len(train), len(val)) == (n_train // 4, -(-n_val // 4))
    inputs, targets = zip(*val)
    inputs, targets = torch.cat(inputs), torch.cat(targets)
    assert inputs.shape == (n_val, 3, 224, 224) and targets.dtype == torch.int64
    # Class folders are sorted wnids; each class is a flat colour whose red encodes its index (JPEG: ±3).
    expected = torch.tensor([imagenet_red(int(t)) for t in targets], dtype=torch.float32)
    assert torch.allclose(red_levels(inputs), expected, atol=3)
    assert torch.equal(targets, torch.arange(IMAGENET_CLASSES).repeat_interleave(IMAGENET_VAL_PER_CLASS))
    train.set_epoch(0)
    batch, labels = next(iter(train))
    assert batch.shape == (4, 3, 224, 224)
    assert torch.allclose(red_levels(batch), torch.tensor([float(imagenet_red(int(t))) for t in labels]), atol=3)


@pytest.mark.parametrize("augment,message", [
    ({"crop_padding": 4}, "crop_padding applies to CIFAR-sized data"),
    ({"eval_resize": 200}, "eval_resize \\(200\\) must be >= the 224-pixel crop"),
])
def test_imagenet_rejects_bad_geometry(imagenet_root, augment, message):
    with pytest.raises(ValueError, match=message):
        build_loaders("imagenet", **loader_kwargs(root=imagenet_root, batch_size=4, augment=augment))


def test_missing_split_names_the_layout(tmp_path, imagenet_root):
    shutil.copytree(f"{imagenet_root}/train", tmp_path / "train")
    with pytest.raises(DatasetNotFoundError) as info:
        build_loaders("imagenet", **loader_kwargs(root=str(tmp_path), batch_size=4))
    assert f"{tmp_path}/val missing" in str(info.value) and "val/<wnid>/*.JPEG" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="imagenet needs data.root"):
        build_loaders("imagenet", **loader_kwargs(batch_size=4))


def test_mismatched_class_folders_fail(tmp_path, imagenet_root):
    shutil.copytree(imagenet_root, tmp_path, dirs_exist_ok=True)
    first_val_class = sorted((tmp_path / "val").iterdir())[0]
    shutil.rmtree(first_val_class)
    with pytest.raises(DatasetError, match=rf"train/ has 3 class folders and val/ has 2, with different names "
                                           rf"\(only in train/: {first_val_class.name}\)") as info:
        build_loaders("imagenet", **loader_kwargs(root=str(tmp_path), batch_size=4))
    assert not isinstance(info.value, ValueError)  # not reported as a bad config value: the folder is the problem


def test_an_empty_class_folder_fails_clearly(tmp_path, imagenet_root):
    shutil.copytree(imagenet_root, tmp_path, dirs_exist_ok=True)
    first_val_class = sorted((tmp_path / "val").iterdir())[0]
    for image in first_val_class.iterdir():
        image.unlink()
    with pytest.raises(DatasetError) as info:
        build_loaders("imagenet", **loader_kwargs(root=str(tmp_path), batch_size=4))
    assert str(info.value) == (f"ImageNet {tmp_path}/val: Found no valid file for the classes {first_val_class.name} "
                               "; fix: every <wnid> folder must hold images (.JPEG)")


def test_gpu_resident_is_refused_for_imagenet(imagenet_root):
    with pytest.raises(ValueError, match="gpu_resident loading needs a CIFAR-sized dataset"):
        build_loaders("imagenet", **loader_kwargs(root=imagenet_root, batch_size=4, gpu_resident=True))
