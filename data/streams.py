"""Token-stream batching for stateful language models: BPTT windows for training, one stream for evaluation.

:class:`TrainStreams` cuts the train stream into ``world_size × batch_size`` contiguous streams of equal
length ``L`` (the remainder at the end is dropped); rank ``r`` owns streams ``r·B .. r·B+B−1``, so each rank
trains on its own contiguous parts. An epoch is ``N = (L − 1) // window`` windows, the same on every rank;
window ``k`` covers positions ``bounds[k] .. bounds[k+1]`` of every stream: inputs are the tokens there and
targets the next ones, so the last target of a window is the first input of the next, and a model that
carries (and detaches) its state across windows reads every stream without a gap. Each stream's last
``(L − 1) − N·window`` predictions are never trained on (as ``drop_last`` drops a partial batch: every
window has ``window`` tokens).

With ``variable=True`` the boundaries move each epoch, AWD-LSTM style (Merity et al. 2017): a raw length
per window is drawn, ``window`` with probability 0.95 else ``window / 2``, plus normal noise of std 5, at
least ``min(5, window)``; the lengths are then rescaled (cumulatively, rounded) to cover the same
``N·window`` positions, so ``len()`` and the tokens of an epoch stay fixed, the mean length is exactly
``window`` and a single window rarely exceeds ``window`` by more than a few times the noise. The draws
depend on ``(seed, epoch)`` only (not the rank), so every rank steps through windows of the same lengths.
AWD-LSTM also scales the learning rate by ``length / window``: the length is ``inputs.shape[1]``.

Iteration is a pure function of ``(seed, epoch)`` and yields views cut from the streams (one small int64
copy per window), so a resumed epoch skips its first batches with ``next()`` at almost no cost.
:class:`EvalStream` is the whole valid or test stream as one sequence (batch 1) in windows, state carried by
the caller; its first token is context only, so it makes ``len(tokens) − 1`` predictions. Tensors are CPU
``int64`` (``LongTensor``) ``[batch, length]``.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .sampling import epoch_seed

# AWD-LSTM's variable-length BPTT (Merity et al. 2017, section 4.1).
VARIABLE_FULL_P = 0.95
VARIABLE_STD = 5.0
VARIABLE_MIN = 5


def zipf_tokens(count: int, vocabulary: int, *, seed: int = 0) -> np.ndarray:
    """``count`` synthetic token ids following Zipf's law over a frequency-sorted vocabulary: p(id) ∝ 1 / (id + 1)
    (word frequencies in text roughly do); for benchmarks and for counting untrained language models."""
    weights = 1.0 / np.arange(1, vocabulary + 1)
    return np.random.default_rng(seed).choice(vocabulary, size=count, p=weights / weights.sum()).astype(np.int32)


def _window_pair(streams: np.ndarray, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(streams[:, start:stop].astype(np.int64)),
            torch.from_numpy(streams[:, start + 1:stop + 1].astype(np.int64)))


def _check_window(window: int) -> None:
    if window < 1:
        raise ValueError(f"the BPTT window must be at least 1 token, got {window} ; fix: set a positive window")


class TrainStreams:
    """``(inputs, targets)`` windows ``[batch_size, length]`` of this rank's streams (module doc).

    ``tokens``: the train stream (1-D integer array, e.g. a memory-mapped :attr:`data.wikitext.Corpus.train`).
    ``len()`` = windows per epoch; ``dataset_size`` = tokens in the train stream (all ranks); ``streams`` = this
    rank's ``[batch_size, L]`` view of it. Call :meth:`set_epoch` before iterating an epoch.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, window: int, *, variable: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        _check_window(window)
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                             f"rank={rank}, world_size={world_size}")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"expected a 1-D integer token stream, got {tokens.dtype} {tokens.shape}")
        streams = world_size * batch_size
        length = len(tokens) // streams
        if length < window + 1:
            max_batch, max_window = len(tokens) // (world_size * (window + 1)), length - 1
            fixes = [f"batch_size <= {max_batch} at window {window}"] if max_batch else []
            if max_window:
                fixes.append(f"window <= {max_window} at batch_size {batch_size}")
            raise ValueError(f"the train stream of {len(tokens):,} tokens is too short for {streams} streams "
                             f"(batch_size {batch_size} x {world_size} processes) of window + 1 = {window + 1} "
                             f"tokens: each gets {length:,} ; fix: {' or '.join(fixes) or 'a longer train stream'}")
        self.streams = tokens[rank * batch_size * length:(rank + 1) * batch_size * length].reshape(batch_size, length)
        self.batch_size, self.window, self.variable, self.seed = batch_size, window, variable, seed
        self.num_windows = (length - 1) // window
        self.dataset_size = len(tokens)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration's windows a function of (seed, epoch) (only ``variable`` ones change)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_windows

    def bounds(self) -> np.ndarray:
        """The ``len() + 1`` window boundaries of the current epoch (positions in each stream, from 0 to
        ``len() · window``): window ``k`` has inputs at ``bounds[k]:bounds[k+1]``."""
        n, w = self.num_windows, self.window
        if not self.variable:
            return np.arange(n + 1, dtype=np.int64) * w
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch))
        base = np.where(rng.random(n) < VARIABLE_FULL_P, w, w / 2)
        raw = np.maximum(min(VARIABLE_MIN, w), np.rint(rng.normal(base, VARIABLE_STD)))
        span, k = n * w, np.arange(1, n + 1)
        ends = np.rint(np.cumsum(raw) * (span / raw.sum())).astype(np.int64)
        # Rounding may leave a window empty: keep every window >= 1 token and the last end at span.
        ends = np.maximum.accumulate(np.maximum(np.minimum(ends, span - n + k) - k, 0)) + k
        return np.concatenate([[0], ends])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bounds = self.bounds().tolist()
        for start, stop in zip(bounds[:-1], bounds[1:]):
            yield _window_pair(self.streams, start, stop)


class EvalStream:
    """One stream (batch 1) in consecutive windows of ``window`` tokens (the last one shorter).

    ``predictions`` = ``len(tokens) − 1``; ``dataset_size`` = ``len(tokens)``; ``len()`` = windows.
    """

    def __init__(self, tokens: np.ndarray, window: int) -> None:
        _check_window(window)
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or len(tokens) < 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"expected a 1-D integer token stream of at least 2 tokens, got {tokens.dtype} "
                             f"{tokens.shape}")
        self.stream, self.window = tokens.reshape(1, -1), window
        self.predictions = len(tokens) - 1
        self.dataset_size = len(tokens)

    def __len__(self) -> int:
        return -(-self.predictions // self.window)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.predictions, self.window):
            yield _window_pair(self.stream, start, min(start + self.window, self.predictions))
