"""Tiny datasets written in the real on-disk formats, for tests of loaders and end-to-end runs.

The images encode their label so tests can check the label mapping through the loaders:
CIFAR-100 images have red = 2 × fine label everywhere (green/blue noise); ImageNet images are a flat colour
with red = ``imagenet_red(class_index)`` (class index in sorted wnid order, as ImageFolder assigns it).
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR100_FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
CIFAR100_COARSE = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes "
    "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees "
    "vehicles_1 vehicles_2"
).split()


def _cifar_split(rng: np.random.Generator, classes: int, per_class: int, batch_label: str) -> dict:
    fine = np.repeat(np.arange(classes), per_class)
    rng.shuffle(fine)
    images = rng.integers(0, 256, size=(len(fine), 3, 32, 32), dtype=np.uint8)
    images[:, 0] = (2 * fine)[:, None, None]
    return {
        "filenames": [f"{CIFAR100_FINE[label]}_s_{i:06d}.png" for i, label in enumerate(fine)],
        "batch_label": batch_label,
        # Coarse labels are format-correct but not the real superclass map.
        "fine_labels": fine.tolist(),
        "coarse_labels": (fine % len(CIFAR100_COARSE)).tolist(),
        "data": images.reshape(len(fine), 3 * 32 * 32),
    }


def make_cifar100(root: str | os.PathLike, train_per_class: int = 5, test_per_class: int = 2, classes: int = 100,
                  seed: int = 0) -> Path:
    """Write ``root/cifar-100-python/{train,test,meta}`` as torchvision reads them; labels 0..classes-1 are used.

    Returns the ``cifar-100-python`` folder.
    """
    if not 1 <= classes <= 100:
        raise ValueError(f"classes must be in 1..100, got {classes}")
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = {
        "train": _cifar_split(rng, classes, train_per_class, "training batch 1 of 1"),
        "test": _cifar_split(rng, classes, test_per_class, "testing batch 1 of 1"),
        "meta": {"fine_label_names": CIFAR100_FINE, "coarse_label_names": CIFAR100_COARSE},
    }
    for name, content in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(content, f, protocol=2)
    return folder


def imagenet_wnid(class_index: int) -> str:
    """A WordNet-id-like folder name (``n`` + 8 digits), increasing with ``class_index``."""
    return f"n{1440764 + 9973 * class_index:08d}"


def imagenet_red(class_index: int) -> int:
    """The red value of every pixel of class ``class_index``'s images (distinct up to 12 classes)."""
    return 10 + 20 * class_index


def make_imagenet(root: str | os.PathLike, classes: int = 3, train_per_class: int = 4, val_per_class: int = 2,
                  size: int = 40, seed: int = 0) -> Path:
    """Write ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (``size``×``size`` RGB JPEGs)."""
    if not 1 <= classes <= 12:
        raise ValueError(f"classes must be in 1..12 (distinct colours), got {classes}")
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            wnid = imagenet_wnid(c)
            folder = Path(root) / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.empty((size, size, 3), dtype=np.uint8)
                pixels[..., 0] = imagenet_red(c)
                pixels[..., 1:] = rng.integers(0, 256, size=2, dtype=np.uint8)
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{c * per_class + i + 1:08d}.JPEG"
                Image.fromarray(pixels).save(folder / name, quality=95)
    return Path(root)


# The standard WikiText-103 sizes (Merity et al. 2016), written here independently of data/wikitext.py.
WT103_TRAIN_WORDS = 267_734  # distinct train words; with <eos>, the 267,735 types of the vocabulary
WT103_VALID_TOKENS = 217_646  # <eos> included
WT103_TEST_TOKENS = 245_569
# The most frequent words first (ranks of the Zipf-like draw); "=" must be a word: headings are made of it.
_WIKI_WORDS = ("the", ",", ".", "of", "and", "in", "to", "a", "=", "<unk>", '"', "was", "The", "@-@", "'s", "is",
               "(", ")", "for", "on", "as", "with", "by", "@,@", "that", "@.@", "from", "his", "at", "he", "it")


def _wikitext_lines(words: np.ndarray, seq: np.ndarray, rng: random.Random, total: int | None) -> list[str]:
    """Lines in WikiText's layout (articles of `` = Title = ``, `` = = Section = = `` and paragraphs, blank
    lines as `` ``), made of ``words[seq]`` in order. ``total`` (tokens with one ``<eos>`` per line): exactly
    that many; None: every word of ``seq`` is used."""
    lines: list[str] = []
    pos, left = 0, total

    def emit(level: int, k: int) -> None:  # level 0: a paragraph of k words; k == 0: a blank line
        nonlocal pos, left
        text = " ".join(words[seq[pos:pos + k]].tolist())
        lines.append(f" {'= ' * level}{text} {'= ' * level}" if k else " ")
        pos += k
        if left is not None:
            left -= 2 * level + k + 1

    while True:
        level = rng.choice((0, 0, 0, 1, 2, 3)) if lines else 1
        k = rng.randint(1, 4) if level else rng.randint(10, 150)
        cost = k + 1 + (2 * level + 2 if level else 0)  # a heading has a blank line before and after
        if total is not None and cost > left - 2:
            if left >= 1:
                emit(0, left - 1)
            return lines
        if total is None and k > len(seq) - pos:
            if len(seq) > pos:
                emit(0, len(seq) - pos)
            return lines
        if level and (not lines or lines[-1] != " "):
            emit(0, 0)
        emit(level, k)
        if level:
            emit(0, 0)


def make_wikitext103(root: str | os.PathLike, *, train_words: int = WT103_TRAIN_WORDS,
                     valid_tokens: int = WT103_VALID_TOKENS, test_tokens: int = WT103_TEST_TOKENS,
                     unseen_test_words: int = 0, extra_train_tokens: int = 60_000, seed: int = 0) -> Path:
    """Write WikiText-103 in its real format, ``root/wikitext-103/wiki.{train,valid,test}.tokens``; returns
    the ``wikitext-103`` folder.

    By default it has the standard sizes the loader checks: ``train_words`` distinct train words (+ ``<eos>``:
    267,735 types), valid and test drawn from them (no unseen type), 217,646 valid and 245,569 test tokens
    with ``<eos>``. Train holds every word once plus ``extra_train_tokens`` Zipf-distributed ones (about 360k
    tokens). Non-standard variants: other sizes, or ``unseen_test_words`` test words that train lacks.
    """
    if train_words < len(_WIKI_WORDS):
        raise ValueError(f"train_words must be >= {len(_WIKI_WORDS)}, got {train_words}")
    rng = np.random.default_rng(seed)
    unseen = [f"unseen{i}" for i in range(unseen_test_words)]
    words = np.array([*_WIKI_WORDS, *(f"w{i}" for i in range(train_words - len(_WIKI_WORDS))), *unseen], dtype=object)
    zipf = 1.0 / (np.arange(train_words) + 3.0)
    zipf /= zipf.sum()
    train_seq = rng.permutation(np.concatenate([np.arange(train_words),
                                                rng.choice(train_words, extra_train_tokens, p=zipf)]))
    layout = random.Random(seed)
    texts = {"train": _wikitext_lines(words, train_seq, layout, None)}
    for split, total in (("valid", valid_tokens), ("test", test_tokens)):
        seq = rng.choice(train_words, total, p=zipf)
        if split == "test":
            seq[10:10 + len(unseen)] = np.arange(train_words, train_words + len(unseen))  # in the first paragraph
        texts[split] = _wikitext_lines(words, seq, layout, total)
    out = Path(root) / "wikitext-103"
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in texts.items():
        (out / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
