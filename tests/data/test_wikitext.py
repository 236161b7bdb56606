"""WikiText-103: tokenization, vocabulary order, the standard-size checks and their errors, the token cache."""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import data.wikitext as wikitext
from data.datasets import DatasetError, DatasetNotFoundError
from data.wikitext import EOS, Encoder, corpus_from_ids, iter_file_tokens, load_wikitext103, streams_sha256, tokenize
from tests.fixtures import WT103_TEST_TOKENS, WT103_TRAIN_WORDS, WT103_VALID_TOKENS, make_wikitext103

from .conftest import edit_token_cache

NAMES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")


def rule_tokens(path) -> list[str]:
    """The rules doc's tokenization, literally: every line of the text-mode file is line.split() + ['<eos>']."""
    tokens = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens += line.split() + ["<eos>"]
    return tokens


@pytest.fixture(scope="session")
def wt103_folder(tmp_path_factory) -> Path:
    return make_wikitext103(tmp_path_factory.mktemp("wt103"))


@pytest.fixture(scope="session")
def wt103_cached(wt103_folder, tmp_path_factory):
    """(corpus, cache folder) of the standard fixture, loaded once; tests copy the cache folder."""
    cache = tmp_path_factory.mktemp("wt103_cache")
    return load_wikitext103(wt103_folder.parent, cache_dir=cache), cache


@pytest.fixture
def copy_of(tmp_path):
    """Copy the fixture's files to ``tmp_path/root/<folder>/`` under ``names`` (returns the root)."""
    def copy(folder: Path, names=NAMES, sub="wikitext-103") -> Path:
        target = tmp_path / "root" / sub
        target.mkdir(parents=True, exist_ok=True)
        for src, dst in zip(NAMES, names):
            shutil.copyfile(folder / src, target / dst)
        return tmp_path / "root"
    return copy


@pytest.fixture
def files_read(monkeypatch):
    """The names of the files tokenized."""
    names = []
    original = wikitext.iter_file_tokens
    monkeypatch.setattr(wikitext, "iter_file_tokens", lambda path, **kw: names.append(Path(path).name) or original(path, **kw))
    return names


@pytest.fixture
def tokenizations(monkeypatch):
    """Counts the full tokenizations (cache misses) of WikiText-103."""
    calls = []
    original = wikitext._tokenize_wikitext103
    monkeypatch.setattr(wikitext, "_tokenize_wikitext103", lambda paths: calls.append(1) or original(paths))
    return calls


def test_tokenize_counted_by_hand():
    text = " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : <unk> Chronicles , a role @-@ playing game . \n"
    tokens = tokenize(text)
    # Lines: blank (1 <eos>), heading (5 tokens + <eos>), blank (1), paragraph (14 tokens + <eos>): 1+6+1+15 = 23.
    assert len(tokens) == 23
    assert tokens[:8] == [EOS, "=", "Valkyria", "Chronicles", "III", "=", EOS, EOS]
    assert tokens[8:] == ["Senjō", "no", "Valkyria", "3", ":", "<unk>", "Chronicles", ",", "a", "role", "@-@",
                          "playing", "game", ".", EOS]
    # A 3-line text without a final newline: "a b" (2 + 1), "" (1), " c " (1 + 1) = 6 tokens.
    assert tokenize("a b\n\n c ") == ["a", "b", EOS, EOS, "c", EOS]
    assert tokenize("") == []


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 22])
def test_file_tokens_follow_the_rule_on_awkward_text(tmp_path, chunk_bytes):
    path = tmp_path / "awkward.tokens"
    # CRLF and a lone CR (line breaks in text mode), no-break space, tab and U+2028 (whitespace inside a line for
    # both file iteration and str.split), non-ASCII words, runs of blank lines, no final newline.
    path.write_bytes(" = Ünïcode = \r\n \r\nalpha\xa0beta\tgamma\u2028delta\r\r\n\n\n  ε ζ @-@ η ".encode("utf-8"))
    expected = rule_tokens(path)
    # 7 lines: heading (3+1), blank (1), "alpha beta gamma delta" (4+1), 3 empty ones (3), "ε ζ @-@ η" (4+1).
    assert len(expected) == 4 + 1 + 5 + 3 + 5
    chunks = list(iter_file_tokens(path, chunk_bytes=chunk_bytes))
    assert [t for chunk in chunks for t in chunk] == expected


def test_file_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.tokens"
    path.write_bytes(" caf\xe9 \n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"is not UTF-8 text \(byte 4\) ; fix: ") as err:
        list(iter_file_tokens(path))
    assert "\n" not in str(err.value)


def test_vocabulary_by_frequency_ties_by_first_appearance():
    encode = Encoder()
    train = encode(tokenize("b a c\na b d\n"))  # b a c <eos> a b d <eos>
    valid = encode(tokenize("d b\n"))
    corpus = corpus_from_ids(encode.words, train, valid, valid[:0])
    # Counts: b 2, a 2, <eos> 2, c 1, d 1. Equal counts keep the order of first appearance in train:
    # b (position 0) < a (1) < <eos> (3); c (2) < d (6).
    assert corpus.vocab == ["b", "a", EOS, "c", "d"]
    assert corpus.train.tolist() == [0, 1, 3, 2, 1, 0, 4, 2]
    assert corpus.valid.tolist() == [4, 0, 2]
    assert corpus.sha256 == streams_sha256(corpus.vocab, corpus.train, corpus.valid, corpus.test)
    held_out_only = encode(["zz"])  # a type train does not have
    with pytest.raises(ValueError, match="types that train does not"):
        corpus_from_ids(encode.words, train, held_out_only, valid[:0])


def test_streams_sha256_sees_every_part():
    vocab, train, valid, test = ["a", "b"], np.array([0, 1, 1], np.int32), np.array([1], np.int32), np.zeros(0, np.int32)
    reference = streams_sha256(vocab, train, valid, test)
    assert streams_sha256(["b", "a"], train, valid, test) != reference
    assert streams_sha256(vocab, train[:2], valid, test) != reference
    # The same tokens split differently between train and valid are different streams.
    assert streams_sha256(vocab, train[:2], np.array([1, 1], np.int32), test) != reference
    assert streams_sha256(vocab, train.astype(np.int64), valid, test) == reference  # ids, not their dtype


def test_standard_fixture_loads_exactly(wt103_folder, wt103_cached):
    corpus, _ = wt103_cached
    assert corpus.vocab_size == WT103_TRAIN_WORDS + 1 == 267_735
    assert (len(corpus.valid), len(corpus.test)) == (WT103_VALID_TOKENS, WT103_TEST_TOKENS) == (217_646, 245_569)
    tokens = {split: rule_tokens(wt103_folder / f"wiki.{split}.tokens") for split in ("train", "valid", "test")}
    assert len(corpus.train) == len(tokens["train"])
    vocab = np.array(corpus.vocab, dtype=object)
    for split in ("train", "valid", "test"):  # the ids decode back to the files' tokens
        assert vocab[corpus.split(split)].tolist() == tokens[split]
    counts = np.bincount(corpus.train, minlength=corpus.vocab_size)
    assert np.all(np.diff(counts) <= 0) and counts.min() >= 1  # most frequent first, every type from train
    assert corpus.train.dtype == np.int32 and corpus.vocab[0] == "="  # the fixture's headings make "=" top


@pytest.mark.parametrize("variant, expected", [
    (dict(train_words=WT103_TRAIN_WORDS - 1), "wiki.train.tokens has 267,734 types with <eos> (standard: 267,735)"),
    (dict(train_words=WT103_TRAIN_WORDS + 1), "wiki.train.tokens has 267,736 types with <eos> (standard: 267,735)"),
    (dict(unseen_test_words=4),
     "wiki.test.tokens has 4 types not in wiki.train.tokens ('unseen0', 'unseen1', 'unseen2', ...)"),
    (dict(test_tokens=WT103_TEST_TOKENS + 1), "wiki.test.tokens has 245,570 tokens with <eos> (standard: 245,569)"),
    (dict(valid_tokens=WT103_VALID_TOKENS - 1), "wiki.valid.tokens has 217,645 tokens with <eos> (standard: 217,646)"),
    (dict(valid_tokens=WT103_VALID_TOKENS - 1, test_tokens=WT103_TEST_TOKENS - 2),
     "wiki.valid.tokens has 217,645 tokens with <eos> (standard: 217,646); "
     "wiki.test.tokens has 245,567 tokens with <eos> (standard: 245,569)"),
])
def test_non_standard_data_refused_in_one_line(tmp_path, variant, expected, files_read):
    folder = make_wikitext103(tmp_path / "data", **variant)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as err:
        load_wikitext103(tmp_path / "data", cache_dir=cache)
    message = str(err.value)
    assert message == (f"not the standard WikiText-103 in {folder}: {expected} ; fix: use the files of "
                       f"{wikitext.WT103_URL} unchanged (the tokenized archive, not wikitext-103-raw-v1.zip)")
    assert not cache.exists()  # nothing cached for refused data
    # Held-out lengths are checked before the (minutes-long) train file is tokenized.
    assert files_read == ["wiki.valid.tokens", "wiki.test.tokens"] + (["wiki.train.tokens"] if "train" in expected
                                                                       or "types" in expected else [])


def test_missing_files_name_layout_and_archive(tmp_path, wt103_folder, copy_of):
    with pytest.raises(DatasetNotFoundError) as err:
        load_wikitext103(tmp_path)
    assert str(err.value) == (f"WikiText-103 not found under {tmp_path}: expected wikitext-103/wiki.{{train,valid,"
                              f"test}}.tokens (or train/valid/test.txt) ; fix: download "
                              f"https://wikitext.smerity.com/wikitext-103-v1.zip and extract it into {tmp_path}")
    root = copy_of(wt103_folder)
    (root / "wikitext-103" / "wiki.test.tokens").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"\(.*wikitext-103/wiki\.test\.tokens missing\): expected") as err:
        load_wikitext103(root)
    assert "\n" not in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="wikitext103 needs data.root"):
        load_wikitext103(None)


@pytest.mark.parametrize("names, sub", [(("train.txt", "valid.txt", "test.txt"), "wikitext-103"), (NAMES, "")])
def test_other_layouts_give_the_same_corpus(wt103_folder, wt103_cached, copy_of, tmp_path, names, sub):
    """train/valid/test.txt names, or root pointing at the wikitext-103 folder itself."""
    root = copy_of(wt103_folder, names, sub)
    corpus = load_wikitext103(root, cache_dir=tmp_path / "cache")
    assert corpus.sha256 == wt103_cached[0].sha256


def test_second_load_reads_the_memory_mapped_cache(wt103_folder, wt103_cached, tmp_path, tokenizations):
    corpus, cache = wt103_cached
    again = load_wikitext103(wt103_folder.parent, cache_dir=cache)
    assert tokenizations == []  # served from the cache
    assert isinstance(again.train, np.memmap) and again.train.dtype == np.int32
    assert again.sha256 == corpus.sha256 and again.vocab == corpus.vocab
    for split in ("train", "valid", "test"):
        assert np.array_equal(again.split(split), corpus.split(split))
    # One .npy (all ids) and one .json per entry; no temporary files left behind.
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy"]
    meta = json.loads(next(cache.glob("*.json")).read_text(encoding="utf-8"))
    assert meta["lengths"] == [len(corpus.train), 217_646, 245_569] and meta["sha256"] == corpus.sha256


def _flip_id(npy: Path) -> None:
    data = bytearray(npy.read_bytes())
    data[-4 * 1000] ^= 1  # an id of the test stream, off by one
    npy.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    _flip_id,
    lambda npy: npy.write_bytes(npy.read_bytes()[:-4]),  # truncated
    lambda npy: npy.unlink(),
    lambda npy: npy.with_suffix(".json").write_text('{"format": 1, "key": ', encoding="utf-8"),
])
def test_damaged_cache_is_rebuilt_never_used(wt103_folder, wt103_cached, tmp_path, damage, tokenizations, caplog):
    corpus, cache = wt103_cached
    mine = tmp_path / "cache"
    shutil.copytree(cache, mine)
    damage(next(mine.glob("*.npy")))
    with caplog.at_level(logging.WARNING, logger="data.wikitext"):
        rebuilt = load_wikitext103(wt103_folder.parent, cache_dir=mine)
    assert len(tokenizations) == 1 and "is damaged" in caplog.text and "rebuilding it" in caplog.text
    assert rebuilt.sha256 == corpus.sha256 and np.array_equal(rebuilt.test, corpus.test)
    load_wikitext103(wt103_folder.parent, cache_dir=mine)  # the rebuilt cache serves the next load
    assert len(tokenizations) == 1


def _change_a_test_token(vocab: list[str], ids: np.ndarray) -> None:
    ids[-10] = (ids[-10] + 1) % len(vocab)


def _swap_two_words(vocab: list[str], ids: np.ndarray) -> None:
    vocab[5], vocab[6] = vocab[6], vocab[5]  # same ids and counts, other words


@pytest.mark.parametrize("edit", [_change_a_test_token, _swap_two_words])
def test_a_cache_edited_with_its_sha256_is_rebuilt(wt103_folder, wt103_cached, tmp_path, edit, tokenizations, caplog):
    corpus, cache = wt103_cached
    mine = tmp_path / "cache"
    shutil.copytree(cache, mine)
    edit_token_cache(next(mine.glob("*.npy")), edit)
    with caplog.at_level(logging.WARNING, logger="data.wikitext"):
        rebuilt = load_wikitext103(wt103_folder.parent, cache_dir=mine)
    assert len(tokenizations) == 1 and "is damaged" in caplog.text and "stream is not the tokens of" in caplog.text
    assert rebuilt.sha256 == corpus.sha256 and rebuilt.vocab == corpus.vocab
    assert np.array_equal(rebuilt.test, corpus.test)


def test_changed_file_is_tokenized_again(wt103_folder, wt103_cached, copy_of, tmp_path, tokenizations):
    corpus, cache = wt103_cached
    root = copy_of(wt103_folder)
    mine = tmp_path / "cache"
    shutil.copytree(cache, mine)
    train = root / "wikitext-103" / "wiki.train.tokens"
    lines = train.read_text(encoding="utf-8").split("\n")
    lines[3], lines[5] = lines[5], lines[3]  # same tokens and sizes, another stream
    train.write_text("\n".join(lines), encoding="utf-8")
    changed = load_wikitext103(root, cache_dir=mine)
    assert len(tokenizations) == 1 and changed.sha256 != corpus.sha256
    assert len(list(mine.glob("*.npy"))) == 2  # keyed by the files' sha256: both entries kept


def test_default_cache_location(wt103_folder, copy_of, tmp_path, monkeypatch):
    root = copy_of(wt103_folder)
    load_wikitext103(root)
    assert len(list((root / "wikitext-103" / "micronet-cache").glob("wikitext103-*.npy"))) == 1
    # A data folder that cannot be written: the user's cache folder.
    other = copy_of(wt103_folder, sub="elsewhere/wikitext-103") / "elsewhere"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(wikitext, "_can_write", lambda folder: "elsewhere" not in str(folder))
    load_wikitext103(other)
    assert len(list((tmp_path / "xdg" / "micronet-kit").glob("wikitext103-*.npy"))) == 1
    assert not (other / "wikitext-103" / "micronet-cache").exists()


def test_cache_write_failure_warns_and_leaves_nothing(wt103_folder, wt103_cached, tmp_path, monkeypatch, caplog):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wikitext.np, "save", disk_full)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="data.wikitext"):
        corpus = load_wikitext103(wt103_folder.parent, cache_dir=cache)
    assert corpus.sha256 == wt103_cached[0].sha256
    assert "could not write the token cache" in caplog.text and "No space left" in caplog.text
    assert list(cache.iterdir()) == []  # the temporary file is removed
