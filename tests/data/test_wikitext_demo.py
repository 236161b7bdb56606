"""The embedded demo corpus: gensim's Wikipedia excerpt in WikiText's conventions, fixed by its sha256."""
import logging
import shutil

import numpy as np
import pytest
from gensim.utils import PAT_ALPHABETIC

import data.wikitext as wikitext
import data.wikitext_demo as demo
from data.datasets import DatasetError
from data.wikitext import EOS, SPLITS, UNK

from .conftest import edit_token_cache


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("demo_cache")


@pytest.fixture(scope="session")
def articles():
    return demo.demo_articles()


@pytest.fixture(scope="session")
def corpus(demo_cache, articles):
    with pytest.MonkeyPatch.context() as patch:  # parse the excerpt once per session
        patch.setattr(demo, "demo_articles", lambda: articles)
        return demo.load_wikitext_demo(cache_dir=demo_cache)


def lines_of(corpus, split: str) -> list[list[str]]:
    """The split's lines (tokens between <eos>) as words."""
    vocab = np.array(corpus.vocab, dtype=object)
    words = vocab[corpus.split(split)].tolist()
    lines, line = [], []
    for word in words:
        if word == EOS:
            lines.append(line)
            line = []
        else:
            line.append(word)
    assert line == []  # every split ends with an <eos>
    return lines


def titles(lines: list[list[str]]) -> list[tuple[str, ...]]:
    """Article titles: `` = Title = `` lines (level 1: one "=" on each side)."""
    return [tuple(line[1:-1]) for line in lines if len(line) > 2 and line[0] == line[-1] == "=" and line[1] != "="]


def test_sizes_and_sha256_are_the_reference(corpus):
    assert corpus.sha256 == demo.DEMO_SHA256
    assert corpus.vocab_size == demo.DEMO_VOCAB_SIZE == 13_329
    assert {split: len(corpus.split(split)) for split in SPLITS} == demo.DEMO_TOKENS
    # The sizes the task needs: a vocabulary of 10k-30k types, held-out streams of 20k-50k tokens.
    assert 10_000 <= corpus.vocab_size <= 30_000
    assert all(demo.DEMO_HELD_OUT_TOKENS <= len(corpus.split(s)) <= 50_000 for s in ("valid", "test"))


def test_wikitext_conventions(corpus):
    vocab = corpus.vocab
    counts = np.bincount(corpus.train, minlength=corpus.vocab_size)
    # Vocabulary from train by frequency; every type (<unk> and <eos> included) occurs at least DEMO_MIN_COUNT
    # times in train: rarer words became <unk>.
    assert np.all(np.diff(counts) <= 0) and counts.min() >= demo.DEMO_MIN_COUNT == 3
    assert {UNK, EOS, "="} <= set(vocab[:10])
    for split in SPLITS:
        ids = corpus.split(split)
        assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < corpus.vocab_size
        lines = lines_of(corpus, split)
        # Each article opens with a blank line, its title heading and a blank line, as in WikiText.
        assert lines[0] == [] and lines[1][0] == lines[1][-1] == "=" and lines[2] == []
        for line in (line for line in lines if line and line[0] == "="):  # `` = = Section = = ``: balanced
            level = next(i for i, w in enumerate(line) if w != "=")
            assert line[-level:] == ["="] * level and line[-level - 1] != "="
        # Lines hold gensim's words (runs of word characters without digits: "km²", not "2"), "=" or <unk>.
        assert all(PAT_ALPHABETIC.fullmatch(w) or w in ("=", UNK) for line in lines for w in line)
    unk = vocab.index(UNK)
    assert all(np.count_nonzero(corpus.split(s) == unk) > 0 for s in SPLITS)  # held-out words unseen in train


def test_split_by_article(corpus, articles):
    assert len(articles) == 106  # the excerpt's 107 articles that are not redirects, less one without words
    members = demo.demo_split(articles)
    assert sorted(i for ids in members.values() for i in ids) == list(range(106))  # a partition
    assert [len(members[s]) for s in SPLITS] == [91, 6, 9]
    for split in ("valid", "test"):  # whole articles until each held-out split has its tokens
        sizes = [sum(len(line) + 1 for line in articles[i][1]) for i in members[split]]
        assert sum(sizes) >= demo.DEMO_HELD_OUT_TOKENS
    for split in SPLITS:  # the stream holds exactly its articles' title headings, in dump order
        assert len(titles(lines_of(corpus, split))) == len(members[split])
    assert titles(lines_of(corpus, "train"))[:2] == [("Anarchism",), ("Albedo",)]
    assert [articles[i][0] for i in members["train"][:2]] == ["Anarchism", "Albedo"]


def test_cached_load_does_not_rebuild(corpus, demo_cache, monkeypatch):
    monkeypatch.setattr(demo, "build_wikitext_demo", lambda: pytest.fail("rebuilt although cached"))
    again = demo.load_wikitext_demo(cache_dir=demo_cache)
    assert isinstance(again.train, np.memmap) and again.sha256 == corpus.sha256 == demo.DEMO_SHA256
    assert np.array_equal(again.test, corpus.test) and again.vocab == corpus.vocab


def test_a_cache_edited_with_its_sha256_is_rebuilt(corpus, demo_cache, articles, tmp_path, monkeypatch, caplog):
    mine = tmp_path / "cache"
    shutil.copytree(demo_cache, mine)

    def edit(vocab, ids):
        ids[-10] = (ids[-10] + 1) % len(vocab)  # a token of the test stream

    edit_token_cache(next(mine.glob("*.npy")), edit)
    monkeypatch.setattr(demo, "demo_articles", lambda: articles)
    with caplog.at_level(logging.WARNING, logger="data.wikitext"):
        again = demo.load_wikitext_demo(cache_dir=mine)
    assert "is damaged" in caplog.text and "not the reference" in caplog.text and "rebuilding it" in caplog.text
    assert again.sha256 == corpus.sha256 == demo.DEMO_SHA256 and np.array_equal(again.test, corpus.test)


def test_other_tokens_are_refused_in_one_line(monkeypatch, tmp_path, articles):
    monkeypatch.setattr(demo, "demo_articles", lambda: articles)
    texts = demo.demo_texts()
    # As if another gensim tokenized one word differently: the first "the" of train becomes "The".
    monkeypatch.setattr(demo, "demo_texts", lambda: {**texts, "train": texts["train"].replace(" the ", " The ", 1)})
    with pytest.raises(DatasetError) as err:
        demo.load_wikitext_demo(cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith("the wikitext_demo tokens built with gensim 4.4.0 differ")
    assert f"expected {demo.DEMO_SHA256[:12]}" in message and "; fix: pip install 'gensim==4.4.0'" in message
    assert list(tmp_path.iterdir()) == []  # nothing cached


@pytest.mark.slow
def test_build_is_deterministic(corpus):
    first, second = demo.build_wikitext_demo(), demo.build_wikitext_demo()
    for split in SPLITS:
        assert np.array_equal(first.split(split), second.split(split))
        assert np.array_equal(first.split(split), corpus.split(split))
    assert first.vocab == second.vocab == corpus.vocab


def test_excerpt_missing_is_one_line(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_FILE", "test/test_data/no-such-excerpt.bz2")
    with pytest.raises(wikitext.DatasetNotFoundError, match=r"does not ship .*no-such-excerpt\.bz2 ; fix: pip install"):
        demo.load_wikitext_demo()
