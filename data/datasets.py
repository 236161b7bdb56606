"""Datasets on disk and their normalisation: digits (scikit-learn), CIFAR-100 (torchvision format), ImageNet.

Every dataset yields ``(PIL image, int label)``; transforms are applied by the loaders. Small datasets
(digits, CIFAR-100) are held as uint8 arrays (:class:`ArrayImageDataset`) so the GPU-resident loader can
move them to the device whole.
"""
from __future__ import annotations

import http.client
import os
import pickle
import urllib.error
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset
from torchvision.datasets import CIFAR100, ImageFolder

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# The digits split never depends on the run's seed, so every run is evaluated on the same 360 images.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

IMAGENET_CROP = 224

# The validation hold-out never depends on the run's seed either: runs that differ in their seed train on the
# same examples and are compared on the same held-out ones.
VAL_SPLIT_SEED = 0


class DatasetError(Exception):
    """A dataset's files are missing or unusable; the message says what is wrong and how to fix it."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset's files are missing; the message says where they must be and how to get them."""


class ArrayImageDataset(Dataset):
    """Images held in memory as a uint8 array ``(N, H, W, C)`` with int64 labels ``(N,)``."""

    def __init__(self, images: np.ndarray, targets: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(targets):
            raise ValueError(f"expected uint8 images (N, H, W, C) and N labels, got {images.dtype} "
                             f"{images.shape} and {len(targets)} labels")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = self.images[index]
        return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), int(self.targets[index])


class LabelledSubset(Subset):
    """A :class:`~torch.utils.data.Subset` that keeps the ``targets`` of the examples it selects."""

    @property
    def targets(self) -> list[int]:
        targets = self.dataset.targets
        return [int(targets[i]) for i in self.indices]


def hold_out(dataset: Dataset, size: float | int) -> tuple[Dataset, Dataset]:
    """``(rest, held out)``: a stratified validation hold-out of ``size`` examples (an int) or of that fraction
    of ``dataset`` (a float in (0, 1)), drawn with :data:`VAL_SPLIT_SEED`; both keep the dataset's order.

    ``dataset`` has ``targets`` (an :class:`ArrayImageDataset` or torchvision's ImageFolder); array datasets stay
    arrays (the GPU-resident loader needs them), others become :class:`LabelledSubset`.
    """
    targets = np.asarray(dataset.targets)
    total, classes = len(targets), len(np.unique(targets))
    count = round(size * total) if isinstance(size, float) else int(size)
    if not classes <= count <= total - classes:
        raise ValueError(f"data.val_split={size} holds out {count} of the {total} training examples; a stratified "
                         f"hold-out needs between {classes} and {total - classes} (one example of each of the "
                         f"{classes} classes on each side): choose a fraction in (0, 1) or a count in that range")
    rest, held = train_test_split(np.arange(total), test_size=count, stratify=targets, random_state=VAL_SPLIT_SEED)
    rest, held = np.sort(rest), np.sort(held)
    if isinstance(dataset, ArrayImageDataset):
        return (ArrayImageDataset(dataset.images[rest], targets[rest]),
                ArrayImageDataset(dataset.images[held], targets[held]))
    return LabelledSubset(dataset, rest.tolist()), LabelledSubset(dataset, held.tolist())


@dataclass(frozen=True)
class Splits:
    """A dataset's train and test sets with the per-channel mean/std of images scaled to [0, 1]."""

    train: Dataset
    test: Dataset
    mean: tuple[float, ...]
    std: tuple[float, ...]


def digits_splits() -> Splits:
    """scikit-learn's 1797 8×8 digits, split 80/20 (1437/360) stratified with a fixed seed.

    Pixel values 0..16 are stored as uint8 0..240 (×15, exact); the mean/std are the train split's, so
    the scale cancels in normalisation.
    """
    digits = load_digits()
    images = (digits.images * 15).astype(np.uint8)[..., None]
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED)
    scaled = train_x / 255.0
    return Splits(ArrayImageDataset(train_x, train_y), ArrayImageDataset(test_x, test_y),
                  mean=(float(scaled.mean()),), std=(float(scaled.std()),))


class _CIFAR100Files(CIFAR100):
    """torchvision's CIFAR-100 reader checking that the pickles exist rather than their md5 sums, so any file
    in the official format loads (re-packed copies, test fixtures). Downloads still verify the archive's md5."""

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


def cifar100_splits(root: str | None, download: bool) -> Splits:
    """CIFAR-100 from ``root/cifar-100-python/{train,test,meta}``; downloaded there only when ``download``."""
    if root is None:
        raise DatasetNotFoundError("cifar100 needs data.root: the folder that holds (or, with data.download=true, "
                                   "will hold) cifar-100-python/")
    folder = os.path.join(root, CIFAR100.base_folder)
    missing = [name for name in ("train", "test", "meta") if not os.path.isfile(os.path.join(folder, name))]
    if missing and not download:
        raise DatasetNotFoundError(
            f"CIFAR-100 not found: {', '.join(os.path.join(folder, m) for m in missing)} missing; extract "
            f"{CIFAR100.url} into {root}, or set data.download=true to download it there")
    try:
        train = _CIFAR100Files(root, train=True, download=download)
        test = _CIFAR100Files(root, train=False)
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise DatasetError(f"could not download CIFAR-100 from {CIFAR100.url} into {root} ({reason}) ; fix: check "
                           f"the network connection (or its proxy settings), or download the archive elsewhere and "
                           f"extract it into {root}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DatasetError(f"CIFAR-100 files in {folder} are unreadable ({type(err).__name__}: {detail}) ; "
                           f"fix: re-extract {CIFAR100.url} into {root}, or delete {folder} and set "
                           "data.download=true") from None
    return Splits(ArrayImageDataset(train.data, train.targets), ArrayImageDataset(test.data, test.targets),
                  mean=CIFAR100_MEAN, std=CIFAR100_STD)


def imagenet_splits(root: str | None) -> Splits:
    """ImageNet as class folders ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``."""
    layout = "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (validation images sorted into class folders)"
    if root is None:
        raise DatasetNotFoundError(f"imagenet needs data.root: the folder that holds {layout}")
    missing = [os.path.join(root, split) for split in ("train", "val") if not os.path.isdir(os.path.join(root, split))]
    if missing:
        raise DatasetNotFoundError(f"ImageNet not found: {', '.join(missing)} missing; data.root must hold {layout}")
    train, val = _image_folder(os.path.join(root, "train")), _image_folder(os.path.join(root, "val"))
    if train.classes != val.classes:
        only = [f"only in {split}/: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
                for split, names in (("train", sorted(set(train.classes) - set(val.classes))),
                                     ("val", sorted(set(val.classes) - set(train.classes)))) if names]
        raise DatasetError(f"ImageNet train/ has {len(train.classes)} class folders and val/ has {len(val.classes)}, "
                           f"with different names ({'; '.join(only)}) ; fix: give {root}/train and {root}/val the "
                           "same <wnid> folders")
    return Splits(train, val, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def _image_folder(folder: str) -> ImageFolder:
    """torchvision's ImageFolder; a class folder without images (or no class folder) is a :class:`DatasetError`."""
    try:
        return ImageFolder(folder)
    except FileNotFoundError as err:
        raise DatasetError(f"ImageNet {folder}: {str(err).split('. Supported')[0]} ; fix: every <wnid> folder "
                           "must hold images (.JPEG)") from None
