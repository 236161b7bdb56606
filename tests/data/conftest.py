"""Shared fixture datasets for the data tests (generated once per session in the real on-disk formats)."""
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from data.wikitext import streams_sha256
from tests.fixtures import make_cifar100, make_imagenet

CIFAR_CLASSES, CIFAR_TRAIN_PER_CLASS, CIFAR_TEST_PER_CLASS = 100, 2, 1
IMAGENET_CLASSES, IMAGENET_TRAIN_PER_CLASS, IMAGENET_VAL_PER_CLASS = 3, 4, 2


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar100(root, train_per_class=CIFAR_TRAIN_PER_CLASS, test_per_class=CIFAR_TEST_PER_CLASS,
                  classes=CIFAR_CLASSES)
    return str(root)


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet(root, classes=IMAGENET_CLASSES, train_per_class=IMAGENET_TRAIN_PER_CLASS,
                  val_per_class=IMAGENET_VAL_PER_CLASS, size=40)
    return str(root)


def loader_kwargs(**overrides):
    """build_loaders keywords for a small single-process CPU run, with ``overrides``."""
    kwargs = dict(root=None, batch_size=16, eval_batch_size=32, augment={}, num_workers=0, pin_memory=False,
                  download=False, seed=0)
    return {**kwargs, **overrides}


def edit_token_cache(npy: Path, edit: Callable[[list[str], np.ndarray], None]) -> None:
    """Edit a token cache as someone who knows its format would: ``edit(vocab, ids)`` changes the vocabulary
    and ids in place, then the ids and the recorded sha256 are rewritten to match, so the cache is
    consistent with itself."""
    meta_path = npy.with_suffix(".json")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    ids = np.load(npy)
    edit(meta["vocab"], ids)
    np.save(npy, ids)
    meta["sha256"] = streams_sha256(meta["vocab"], *np.split(ids, np.cumsum(meta["lengths"])[:-1]))
    meta_path.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
