"""The embedded language-modelling demo: real English Wikipedia text that ships inside gensim's wheel.

Source: gensim's test excerpt of the English Wikipedia dump (:data:`DEMO_FILE` in the gensim package; 206
pages, 107 of them articles that are not redirects). Built with gensim's own Wikipedia utilities: pages from
``extract_pages`` (main namespace), markup stripped by ``filter_wiki``, words by ``gensim.utils.tokenize``
(runs of word characters without digits, case kept: no numbers or punctuation). Redirects, gensim's ignored namespaces and articles
under its ``ARTICLE_MIN_WORDS`` are skipped (106 articles remain).

Each article is written in WikiText's layout: a blank line, `` = Title = ``, a blank line, then one line per
paragraph; a section heading ``==History==`` becomes `` = = History = = `` between blank lines. The articles
are split into train / valid / test by a fixed order (sorted by the sha256 of :data:`DEMO_SPLIT_SEED` and the
title; not the run's seed, and no library's random generator): its first articles go to test until it holds
:data:`DEMO_HELD_OUT_TOKENS` tokens, the next ones likewise to valid, the rest to train (each split in dump
order). Words seen fewer than :data:`DEMO_MIN_COUNT` times
in train, and held-out words not in train, become ``<unk>``. The text is then read exactly like WikiText-103
(:mod:`data.wikitext`: ``<eos>`` per line, vocabulary from train by frequency).

The result must have the sha256 :data:`DEMO_SHA256`, so every machine trains and evaluates on the same
tokens; anything else (another gensim shipping another excerpt or tokenizing differently) is refused with
one line. The build takes a few seconds; it is cached in :func:`data.wikitext.user_cache_dir` (or
``cache_dir``) like WikiText-103, keyed by the excerpt's sha256 and the settings above. Every read checks the
cached corpus against :data:`DEMO_SHA256` too (not only against the sha256 the cache records, which whoever
edits the cache can rewrite): anything else is rebuilt.
"""
from __future__ import annotations

import bz2
import hashlib
import os
from collections import Counter
from importlib import metadata, util
from pathlib import Path

from .datasets import DatasetError, DatasetNotFoundError
from .wikitext import CACHE_FORMAT, SPLITS, UNK, Corpus, Encoder, cached_corpus, corpus_from_ids, file_sha256, \
    tokenize, user_cache_dir

DEMO_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEMO_SPLIT_SEED = 0
DEMO_HELD_OUT_TOKENS = 30_000  # at least this many tokens (with <eos>) in each of valid and test
DEMO_MIN_COUNT = 3  # as in WikiText-103, where every vocabulary word occurs at least 3 times in train
# What the build gives with gensim 4.4.0's excerpt and tokenizer (checked on every build).
DEMO_VOCAB_SIZE = 13_329
DEMO_TOKENS = {"train": 432_811, "valid": 39_565, "test": 30_336}
DEMO_SHA256 = "f6866c88dbddb592df9908474922d96b606bd44ceff673363fe0f2abd63e7f54"
_REQUIREMENT = "gensim>=4.4,<5"


def _excerpt() -> Path:
    # Located without importing gensim (seconds), which only a build needs.
    spec = util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise DatasetNotFoundError(f"the wikitext_demo task needs gensim ; fix: pip install '{_REQUIREMENT}'")
    path = Path(spec.origin).parent / DEMO_FILE
    if not path.is_file():
        raise DatasetNotFoundError(f"gensim {metadata.version('gensim')} does not ship {path} ; fix: pip install "
                                   f"'{_REQUIREMENT}' (a full wheel, with its test data)")
    return path


def _article_lines(title: str, text: str) -> list[list[str]]:
    """An article's lines in WikiText's layout, as lists of words (an empty list is a blank line)."""
    from gensim.corpora.wikicorpus import filter_wiki
    from gensim.utils import tokenize as words_of

    lines: list[list[str]] = []

    def heading(level: int, words: list[str]) -> None:
        if not lines or lines[-1]:
            lines.append([])
        lines.extend([["="] * level + words + ["="] * level, []])

    heading(1, list(words_of(title)))
    for line in filter_wiki(text).split("\n"):
        line = line.strip()
        level = len(line) - len(line.lstrip("="))
        words = list(words_of(line.strip("=")))
        if level and line.endswith("=" * level) and words:
            heading(level, words)
        elif words:
            lines.append(words)
    return lines


def demo_articles() -> list[tuple[str, list[list[str]]]]:
    """The excerpt's articles as ``(title, lines)`` in dump order (redirects and short pages skipped)."""
    from gensim.corpora.wikicorpus import ARTICLE_MIN_WORDS, IGNORED_NAMESPACES, extract_pages

    articles = []
    with bz2.open(_excerpt(), "rb") as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip()[:9].upper() == "#REDIRECT" or any(title.startswith(f"{ns}:") for ns in IGNORED_NAMESPACES):
                continue
            lines = _article_lines(title, text)
            if sum(len(line) for line in lines) >= ARTICLE_MIN_WORDS:
                articles.append((title, lines))
    return articles


def demo_split(articles: list[tuple[str, list[list[str]]]]) -> dict[str, list[int]]:
    """The indices of ``articles`` in each split, in dump order (module doc)."""
    size = [sum(len(line) + 1 for line in lines) for _, lines in articles]  # tokens with one <eos> per line
    # A seeded order that no library version can change: articles sorted by a hash of (seed, title).
    order = sorted(range(len(articles)),
                   key=lambda i: hashlib.sha256(f"{DEMO_SPLIT_SEED}:{articles[i][0]}".encode()).digest())
    chosen: dict[str, list[int]] = {"test": [], "valid": []}
    for split in chosen:
        while sum(size[i] for i in chosen[split]) < DEMO_HELD_OUT_TOKENS:
            chosen[split].append(order.pop(0))
    return {"train": sorted(order), **{split: sorted(ids) for split, ids in chosen.items()}}


def demo_texts() -> dict[str, str]:
    """The demo's train / valid / test text in WikiText-103's format (rare words already ``<unk>``)."""
    articles = demo_articles()
    members = demo_split(articles)
    counts = Counter(w for i in members["train"] for line in articles[i][1] for w in line)
    texts = {}
    for split in SPLITS:
        lines = (line for i in members[split] for line in articles[i][1])
        texts[split] = "".join(" " + "".join(f"{w if counts[w] >= DEMO_MIN_COUNT else UNK} " for w in line) + "\n"
                               for line in lines)
    return texts


def load_wikitext_demo(*, cache_dir: str | os.PathLike | None = None) -> Corpus:
    """The demo corpus (module doc), checked against :data:`DEMO_SHA256`; cached in ``cache_dir``
    (default :func:`data.wikitext.user_cache_dir`)."""
    excerpt = _excerpt()
    settings = f"wikitext_demo v{CACHE_FORMAT} {DEMO_SPLIT_SEED} {DEMO_HELD_OUT_TOKENS} {DEMO_MIN_COUNT}"
    key = hashlib.sha256(f"{settings}\n{file_sha256(excerpt)}".encode()).hexdigest()
    return cached_corpus("wikitext_demo", key, Path(cache_dir) if cache_dir is not None else user_cache_dir(),
                         build_wikitext_demo, _verify_reference)


def _verify_reference(corpus: Corpus) -> None:
    """Raise ValueError unless ``corpus`` (read from the cache) is the reference, :data:`DEMO_SHA256`."""
    if corpus.sha256 != DEMO_SHA256:
        raise ValueError(f"its tokens have the sha256 {corpus.sha256[:12]}…, not the reference {DEMO_SHA256[:12]}…")


def build_wikitext_demo() -> Corpus:
    """Build the demo corpus from the excerpt (no cache) and check its sha256."""
    texts = demo_texts()
    encode = Encoder()
    streams = [encode(tokenize(texts[split])) for split in SPLITS]
    corpus = corpus_from_ids(encode.words, *streams)
    if corpus.sha256 != DEMO_SHA256:
        raise DatasetError(
            f"the wikitext_demo tokens built with gensim {metadata.version('gensim')} differ from the reference (sha256 "
            f"{corpus.sha256[:12]}…, expected {DEMO_SHA256[:12]}…: {corpus.vocab_size:,} types, "
            f"{', '.join(f'{s} {len(corpus.split(s)):,}' for s in SPLITS)} tokens; reference {DEMO_VOCAB_SIZE:,}, "
            f"{', '.join(f'{s} {n:,}' for s, n in DEMO_TOKENS.items())}) ; fix: pip install 'gensim==4.4.0' (the "
            "reference was built with its excerpt and tokenizer, on Python 3.11); if it is installed, report the sha256")
    return corpus
