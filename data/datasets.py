"""Datasets on disk and their normalisation: digits (scikit-learn), CIFAR-100 (torchvision format), ImageNet.

Every dataset yields ``(PIL image, int label)``; transforms are applied by the loaders. Small datasets
(digits, CIFAR-100) are held as uint8 arrays (:class:`ArrayImageDataset`) so the GPU-resident loader can
move them to the device whole. CIFAR-100's files are pickles: they are read by an unpickler that builds
only what those files hold (numpy arrays, lists, strings), so a file that would run code is refused unrun.

scikit-learn, timm and torchvision are imported by the functions that read a dataset with them, not by this module:
together they cost two seconds of start-up (torchvision pulls in torch._dynamo), which commands that read no data,
or only digits, need not pay.
"""
from __future__ import annotations

import http.client
import os
import pickle
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# The digits split never depends on the run's seed, so every run is evaluated on the same 360 images.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

IMAGENET_CROP = 224

# The validation hold-out never depends on the run's seed either: runs that differ in their seed train on the
# same examples and are compared on the same held-out ones.
VAL_SPLIT_SEED = 0

_Read = TypeVar("_Read")


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
    from sklearn.model_selection import train_test_split

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
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * 15).astype(np.uint8)[..., None]
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED)
    scaled = train_x / 255.0
    return Splits(ArrayImageDataset(train_x, train_y), ArrayImageDataset(test_x, test_y),
                  mean=(float(scaled.mean()),), std=(float(scaled.std()),))


# The only globals CIFAR-100's pickles name: a numpy array (``data``) is rebuilt from these. The official files
# were written by Python 2 with numpy 1 (``numpy.core``); files written with numpy 2 name ``numpy._core``.
_CIFAR100_GLOBALS = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                               ("numpy", "ndarray"), ("numpy", "dtype")})


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """What pickle protocol 2 calls (as ``_codecs.encode``) to rebuild bytes written by Python 3."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"it encodes bytes as {encoding!r}, which pickle protocol 2 never does")
    return text.encode("latin1")


class _CIFAR100Unpickler(pickle.Unpickler):
    """Unpickles CIFAR-100's files and nothing else: a pickle may call any importable function while it loads
    (``os.system`` included), so every global but the numpy array's few is refused before it is called."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in _CIFAR100_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a pickle that would call {module}.{name}, which CIFAR-100's files never do "
                                     "(refused, not run)")


def _read_cifar100_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        content = _CIFAR100Unpickler(f, encoding="latin1").load()  # Python 2's str as latin-1, as torchvision reads
    if not isinstance(content, dict):
        raise TypeError(f"a pickled {type(content).__name__}, not CIFAR-100's dict")
    return content


def _cifar100_images(path: str) -> ArrayImageDataset:
    """A train or test file: images ``(N, 32, 32, 3)`` uint8 and fine labels 0..99."""
    content = _read_cifar100_pickle(path)
    images, labels = content["data"], content["fine_labels"]
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
            and images.shape[1] == 3 * 32 * 32 and isinstance(labels, list) and len(labels) == len(images)
            and all(type(label) is int and 0 <= label < 100 for label in labels)):
        raise ValueError("data is not N 32x32 RGB uint8 images with N fine labels in 0..99")
    return ArrayImageDataset(images.reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1)), np.array(labels))


def _cifar100_class_names(path: str) -> list[str]:
    """The meta file: the 100 fine class names."""
    names = _read_cifar100_pickle(path)["fine_label_names"]
    if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise TypeError("fine_label_names is not a list of names")
    return names


def _read_cifar100_file(root: str, name: str, read: Callable[[str], _Read]) -> _Read:
    """``read(root/cifar-100-python/name)``; a file it cannot read is a one-line :class:`DatasetError`."""
    from torchvision.datasets import CIFAR100

    folder = os.path.join(root, CIFAR100.base_folder)
    path = os.path.join(folder, name)
    try:
        return read(path)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, UnicodeDecodeError, ImportError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DatasetError(f"CIFAR-100 files in {folder} are unreadable ({path}: {type(err).__name__}: {detail}) ; "
                           f"fix: re-extract {CIFAR100.url} into {root}, or delete {folder} and set "
                           "data.download=true") from None


def cifar100_splits(root: str | None, download: bool) -> Splits:
    """CIFAR-100 from ``root/cifar-100-python/{train,test,meta}``; downloaded there only when ``download``.

    The files are pickles, read by :class:`_CIFAR100Unpickler`: one that would run anything but rebuild
    CIFAR-100's arrays and lists is refused without running it.
    """
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    if root is None:
        raise DatasetNotFoundError("cifar100 needs data.root: the folder that holds (or, with data.download=true, "
                                   "will hold) cifar-100-python/")
    folder = os.path.join(root, CIFAR100.base_folder)
    missing = [name for name in ("train", "test", "meta") if not os.path.isfile(os.path.join(folder, name))]
    if missing and not download:
        raise DatasetNotFoundError(
            f"CIFAR-100 not found: {', '.join(os.path.join(folder, m) for m in missing)} missing; extract "
            f"{CIFAR100.url} into {root}, or set data.download=true to download it there")
    if missing:
        try:
            download_and_extract_archive(CIFAR100.url, root, filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            raise DatasetError(f"could not download CIFAR-100 from {CIFAR100.url} into {root} ({reason}) ; fix: check "
                               f"the network connection (or its proxy settings), or download the archive elsewhere "
                               f"and extract it into {root}") from None
    _read_cifar100_file(root, "meta", _cifar100_class_names)
    train, test = (_read_cifar100_file(root, name, _cifar100_images) for name in ("train", "test"))
    return Splits(train, test, mean=CIFAR100_MEAN, std=CIFAR100_STD)


def imagenet_splits(root: str | None) -> Splits:
    """ImageNet as class folders ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

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
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(folder)
    except FileNotFoundError as err:
        raise DatasetError(f"ImageNet {folder}: {str(err).split('. Supported')[0]} ; fix: every <wnid> folder "
                           "must hold images (.JPEG)") from None
