"""WikiText-103 as integer token streams, and the corpus machinery the embedded demo shares.

**Tokenization** (the challenge's rule): every line of a ``wiki.*.tokens`` file, blank lines included, is
``line.split() + ["<eos>"]``; lines are what Python's text-mode files yield (split at ``\\n``, ``\\r\\n`` or
``\\r``; a last line without a newline counts too). ``<unk>`` is an ordinary token of the files.

**Vocabulary**: every distinct train token (``<eos>`` included), sorted by train frequency, most frequent
first; ties are broken by first appearance in the train stream (what vocabularies built with
``Counter.most_common`` give, e.g. Transformer-XL's). Ids index :attr:`Corpus.vocab`.

**The standard WikiText-103** (Merity et al. 2016, ``wikitext-103-v1.zip``): 267,735 types, no valid or test
type unseen in train, 217,646 valid and 245,569 test tokens (``<eos>`` included; train has 103,227,021, which
is not checked: the vocabulary check already covers train). Anything else is refused with one line naming
what differs, before anything is cached.

**Cache.** The first load tokenizes (one to a few minutes for the 540 MB train file, with a progress bar); the ids
are then cached as one int32 ``.npy`` (train, valid, test concatenated) and a ``.json`` (vocabulary, split
lengths, the streams' sha256), named by a key derived from the three files' sha256, so a changed file is
tokenized again. Both files are written atomically (temporary file in the same folder, fsync,
``os.replace``), the ``.json`` last. Later loads hash the files (about a second), memory-map the ids,
re-hash the streams and check the cache against its source (:func:`cached_corpus`: for WikiText-103, the
valid and test streams against their files and the vocabulary's order against the train stream): a cache
that fails either is logged, rebuilt and never used.
Where: ``cache_dir`` if given; else ``micronet-cache/`` inside the data folder when it is writable; else
:func:`user_cache_dir`. A cache that cannot be written is skipped with a warning (the next run tokenizes
again). Under ``torchrun``, let rank 0 load first (and the others after a barrier) so that only one
process tokenizes.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import struct
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .datasets import DatasetError, DatasetNotFoundError

log = logging.getLogger(__name__)

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")

WT103_URL = "https://wikitext.smerity.com/wikitext-103-v1.zip"
WT103_FOLDER = "wikitext-103"
WT103_VOCAB_SIZE = 267_735
WT103_VALID_TOKENS = 217_646
WT103_TEST_TOKENS = 245_569
# File names per split: the archive's, and the ones other tools use. Tried in this order.
WT103_NAMES = ({s: f"wiki.{s}.tokens" for s in SPLITS}, {s: f"{s}.txt" for s in SPLITS})
_FIX = f"fix: use the files of {WT103_URL} unchanged (the tokenized archive, not wikitext-103-raw-v1.zip)"

CACHE_FORMAT = 1  # bump when the cached files or the tokenization change: old caches are then ignored
_READ_BYTES = 1 << 22  # chunk size for hashing and tokenizing (whole lines are added to each chunk)


@dataclass(frozen=True)
class Corpus:
    """A word-level corpus as int32 id streams (1-D arrays, memory-mapped when loaded from the cache).

    ``vocab[i]`` is the token of id ``i``; ``sha256`` identifies the vocabulary and the three streams
    (:func:`streams_sha256`).
    """

    vocab: list[str]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    sha256: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, name: str) -> np.ndarray:
        """The id stream of split ``name`` (train, valid or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of: {', '.join(SPLITS)}")
        return getattr(self, name)


def tokenize(text: str) -> list[str]:
    """WikiText's tokens of ``text``: each line's ``line.split()`` followed by ``<eos>``, blank lines included."""
    if "\r" in text:  # universal newlines, as text-mode files read them
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    tokens = text.replace("\n", f" {EOS} ").split()
    if text and not text.endswith("\n"):
        tokens.append(EOS)
    return tokens


def iter_file_tokens(path: str | os.PathLike, *, chunk_bytes: int = _READ_BYTES,
                     progress: tqdm | None = None) -> Iterator[list[str]]:
    """:func:`tokenize` of a UTF-8 file, chunk by chunk (each about ``chunk_bytes``, extended to a whole line).

    A file that is not UTF-8 is a :class:`DatasetError`. ``progress`` is advanced by the bytes read.
    """
    with open(path, "rb") as f:
        offset = 0
        while raw := f.read(chunk_bytes) + f.readline():
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(f"{path} is not UTF-8 text (byte {offset + err.start}) ; {_FIX}") from None
            offset += len(raw)
            if progress is not None:
                progress.update(len(raw))
            yield tokenize(text)


class Encoder:
    """Assigns ids to tokens in order of first appearance (``words[i]`` is the token of id ``i``)."""

    def __init__(self) -> None:
        self.index: defaultdict[str, int] = defaultdict()
        self.index.default_factory = self.index.__len__  # a new token gets the next id

    def __call__(self, tokens: Sequence[str]) -> np.ndarray:
        return np.fromiter(map(self.index.__getitem__, tokens), dtype=np.int32, count=len(tokens))

    def __len__(self) -> int:
        return len(self.index)

    @property
    def words(self) -> list[str]:
        return list(self.index)


def corpus_from_ids(words: Sequence[str], train: np.ndarray, valid: np.ndarray, test: np.ndarray) -> Corpus:
    """The :class:`Corpus` of streams of first-appearance ids (:class:`Encoder`), renumbered in vocabulary order.

    The vocabulary is the types that occur in ``train``, by train frequency (ties: smaller first-appearance id,
    i.e. earlier in train first); every valid/test id must be one of them.
    """
    counts = np.bincount(train, minlength=len(words))
    order = np.lexsort((np.arange(len(words)), -counts))[:np.count_nonzero(counts)]
    new_id = np.full(len(words), -1, dtype=np.int32)
    new_id[order] = np.arange(len(order), dtype=np.int32)
    streams = [new_id[ids] for ids in (train, valid, test)]
    if min((int(s.min()) for s in streams[1:] if len(s)), default=0) < 0:
        raise ValueError("valid/test hold types that train does not; map them to a train type first")
    vocab = [words[i] for i in order]
    return Corpus(vocab, *streams, sha256=streams_sha256(vocab, *streams))


def streams_sha256(vocab: Sequence[str], train: np.ndarray, valid: np.ndarray, test: np.ndarray) -> str:
    """sha256 of the vocabulary and the three streams as little-endian int32 (lengths included)."""
    digest = hashlib.sha256(b"micronet-kit token streams v1\n")
    digest.update(struct.pack("<Q", len(vocab)))
    digest.update("\n".join(vocab).encode("utf-8"))  # tokens hold no whitespace: the join is unambiguous
    for ids in (train, valid, test):
        digest.update(struct.pack("<Q", len(ids)))
        digest.update(np.ascontiguousarray(ids, dtype="<i4"))
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks (the 540 MB train file: about a second)."""
    digest, buffer = hashlib.sha256(), bytearray(_READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/micronet-kit`` (``~/.cache/micronet-kit`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "micronet-kit"


def _can_write(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _write_atomic(path: Path, write: Callable[[object], None]) -> None:
    """Write ``path`` via a temporary file in its folder, fsync'd, then renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cache_paths(folder: Path, name: str, key: str) -> tuple[Path, Path]:
    stem = folder / f"{name}-{key[:20]}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _cache_load(folder: Path, name: str, key: str, verify: Callable[[Corpus], None]) -> Corpus | None:
    """The cached corpus, or None (logged) when absent, not exactly what was written or refused by ``verify``."""
    ids_path, meta_path = _cache_paths(folder, name, key)
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["format"] != CACHE_FORMAT or meta["key"] != key:
            raise ValueError("written for other files or by another version")
        ids = np.load(ids_path, mmap_mode="r", allow_pickle=False)
        lengths = [int(n) for n in meta["lengths"]]
        if ids.dtype != np.int32 or ids.shape != (sum(lengths),):
            raise ValueError(f"ids are {ids.dtype} {ids.shape}, expected int32 ({sum(lengths)},)")
        bounds = np.cumsum([0, *lengths])
        streams = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        vocab = list(meta["vocab"])
        if streams_sha256(vocab, *streams) != meta["sha256"]:
            raise ValueError("the token streams do not match their recorded sha256")
        corpus = Corpus(vocab, *streams, sha256=meta["sha256"])
        verify(corpus)
    except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError) as err:
        log.warning("token cache %s is damaged (%s: %s); rebuilding it", ids_path, type(err).__name__, err)
        return None
    return corpus


def _cache_store(folder: Path, name: str, key: str, corpus: Corpus) -> None:
    ids_path, meta_path = _cache_paths(folder, name, key)
    meta = {"format": CACHE_FORMAT, "key": key, "lengths": [len(corpus.split(s)) for s in SPLITS],
            "sha256": corpus.sha256, "vocab": corpus.vocab}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(ids_path, lambda f: np.save(f, np.concatenate([corpus.split(s) for s in SPLITS])))
        _write_atomic(meta_path, lambda f: f.write(json.dumps(meta, ensure_ascii=False).encode("utf-8")))
    except OSError as err:
        log.warning("could not write the token cache %s (%s); the next run tokenizes again", ids_path, err)


def cached_corpus(name: str, key: str, cache_dir: Path, build: Callable[[], Corpus],
                  verify: Callable[[Corpus], None]) -> Corpus:
    """The corpus cached in ``cache_dir`` under ``name`` for ``key``; else ``build()``, then cached there.

    A cache's recorded sha256 only shows it was not damaged by accident: whoever rewrites the streams can
    rewrite it too. So every read also passes the cached corpus to ``verify``, which raises ValueError (saying
    why) unless it is the corpus of its source: such a cache is logged and rebuilt, never used.
    """
    if (corpus := _cache_load(cache_dir, name, key, verify)) is not None:
        return corpus
    corpus = build()
    _cache_store(cache_dir, name, key, corpus)
    return corpus


def find_wikitext103(root: str | os.PathLike | None) -> dict[str, Path]:
    """The three files of WikiText-103 under ``root``: ``root/wikitext-103/`` or ``root`` itself, each with
    ``wiki.{train,valid,test}.tokens`` or ``{train,valid,test}.txt``; missing: :class:`DatasetNotFoundError`."""
    layout = f"{WT103_FOLDER}/wiki.{{train,valid,test}}.tokens (or train/valid/test.txt)"
    where = f"download {WT103_URL} and extract it into {root}"
    if root is None:
        raise DatasetNotFoundError(f"wikitext103 needs data.root: the folder that holds {layout} ; fix: {where} "
                                   "and set data.root")
    partial: list[Path] = []
    for folder in (Path(root) / WT103_FOLDER, Path(root)):
        for names in WT103_NAMES:
            paths = {split: folder / name for split, name in names.items()}
            present = [p.is_file() for p in paths.values()]
            if all(present):
                return paths
            if any(present) and not partial:
                partial = [p for p, ok in zip(paths.values(), present) if not ok]
    found = f" ({', '.join(map(str, partial))} missing)" if partial else ""
    raise DatasetNotFoundError(f"WikiText-103 not found under {root}{found}: expected {layout} ; fix: {where}")


def load_wikitext103(root: str | os.PathLike | None, *, cache_dir: str | os.PathLike | None = None) -> Corpus:
    """The standard WikiText-103 under ``root`` (see :func:`find_wikitext103`), checked and cached (module doc)."""
    paths = find_wikitext103(root)
    folder = paths["train"].parent
    digest = hashlib.sha256(f"wikitext103 cache v{CACHE_FORMAT}\n".encode())
    for split in SPLITS:
        digest.update(file_sha256(paths[split]).encode())
    if cache_dir is not None:
        cache = Path(cache_dir)
    else:
        cache = folder / "micronet-cache"
        cache = cache if cache.is_dir() or _can_write(cache) else user_cache_dir()
    return cached_corpus("wikitext103", digest.hexdigest(), cache, lambda: _tokenize_wikitext103(paths),
                         functools.partial(_verify_wikitext103, paths))


def _verify_wikitext103(paths: dict[str, Path], corpus: Corpus) -> None:
    """Raise ValueError unless the cached ``corpus`` is the one of ``paths``, as far as a read can afford: its
    valid and test streams are the files' tokens (a fraction of a second) and its vocabulary is the standard's
    size, sorted by train frequency. Re-reading train would take the minutes the cache saves, so an edit of
    the train stream that keeps every word's count goes unseen."""
    if corpus.vocab_size != WT103_VOCAB_SIZE:
        raise ValueError(f"its vocabulary has {corpus.vocab_size:,} types, not the standard {WT103_VOCAB_SIZE:,}")
    counts = np.bincount(corpus.train, minlength=corpus.vocab_size)
    if len(counts) != corpus.vocab_size or counts.min() < 1 or np.any(np.diff(counts) > 0):
        raise ValueError("its vocabulary is not the train stream's types sorted by frequency")
    vocab = np.array(corpus.vocab, dtype=object)
    for split in ("valid", "test"):
        if vocab[corpus.split(split)].tolist() != [t for chunk in iter_file_tokens(paths[split]) for t in chunk]:
            raise ValueError(f"its {split} stream is not the tokens of {paths[split]}")


def _tokenize_wikitext103(paths: dict[str, Path]) -> Corpus:
    """Tokenize and check the three files; the held-out sizes first, before the minutes-long train pass."""
    folder = paths["train"].parent
    held_out = {split: [t for chunk in iter_file_tokens(paths[split]) for t in chunk] for split in ("valid", "test")}
    wrong = [f"{paths[s].name} has {len(held_out[s]):,} tokens with <eos> (standard: {n:,})"
             for s, n in (("valid", WT103_VALID_TOKENS), ("test", WT103_TEST_TOKENS)) if len(held_out[s]) != n]
    if wrong:
        raise DatasetError(f"not the standard WikiText-103 in {folder}: {'; '.join(wrong)} ; {_FIX}")
    encode = Encoder()
    log.info("tokenizing %s once (a few minutes for the full WikiText-103; later runs read the cache)",
             paths["train"])
    with tqdm(total=paths["train"].stat().st_size, unit="B", unit_scale=True, leave=False,
              desc=f"tokenizing {paths['train'].name}") as progress:
        train = np.concatenate([encode(chunk) for chunk in iter_file_tokens(paths["train"], progress=progress)]
                               or [np.zeros(0, np.int32)])
    train_types = len(encode)
    valid, test = encode(held_out["valid"]), encode(held_out["test"])
    if train_types != WT103_VOCAB_SIZE:
        wrong.append(f"{paths['train'].name} has {train_types:,} types with <eos> (standard: {WT103_VOCAB_SIZE:,})")
    words = encode.words
    for split, ids in (("valid", valid), ("test", test)):
        unseen = sorted({words[i] for i in ids[ids >= train_types].tolist()})
        if unseen:
            shown = ", ".join(repr(w) for w in unseen[:3]) + (", ..." if len(unseen) > 3 else "")
            wrong.append(f"{paths[split].name} has {len(unseen):,} types not in {paths['train'].name} ({shown})")
    if wrong:
        raise DatasetError(f"not the standard WikiText-103 in {folder}: {'; '.join(wrong)} ; {_FIX}")
    return corpus_from_ids(words, train, valid, test)
