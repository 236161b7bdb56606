"""Stateful LM batching: B contiguous streams per rank, fixed / variable BPTT windows, resume, evaluation stream.

The token stream is ``np.arange(T)``, so every id is its own position and contiguity can be read off the values.
"""
import numpy as np
import pytest
import torch

from data.streams import EvalStream, TrainStreams

T = 1000


def test_fixed_windows_shapes_values_and_count():
    loader = TrainStreams(np.arange(T, dtype=np.int32), batch_size=4, window=10)
    # 4 streams of L = 1000 // 4 = 250 tokens; (250 - 1) // 10 = 24 windows; 249 - 240 = 9 predictions dropped.
    assert len(loader) == 24 and loader.dataset_size == 1000
    batches = list(loader)
    assert len(batches) == 24
    for k, (inputs, targets) in enumerate(batches):
        assert inputs.shape == targets.shape == (4, 10)
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.is_contiguous() and targets.is_contiguous()
        assert torch.equal(targets, inputs + 1)  # targets are the next tokens
        assert inputs[:, 0].tolist() == [b * 250 + 10 * k for b in range(4)]  # stream b starts at b * L
    # Contiguity: in every stream, the last target of window k is the first input of window k + 1.
    for (_, targets), (next_inputs, _) in zip(batches, batches[1:]):
        assert torch.equal(targets[:, -1], next_inputs[:, 0])
    assert batches[-1][1][:, -1].tolist() == [b * 250 + 240 for b in range(4)]


def test_each_rank_gets_its_own_contiguous_streams():
    tokens = np.arange(T, dtype=np.int32)
    single = list(TrainStreams(tokens, batch_size=4, window=10))
    ranks = [list(TrainStreams(tokens, batch_size=2, window=10, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 24  # every rank steps the same number of windows
    # Rank r of 2 holds streams 2r, 2r+1 of the 4: rank 1's first window starts at 2 * 250 and 3 * 250.
    assert ranks[1][0][0][:, 0].tolist() == [500, 750]
    for k in range(24):
        assert torch.equal(torch.cat([ranks[0][k][0], ranks[1][k][0]]), single[k][0])


def test_variable_windows_are_seeded_fixed_in_count_and_contiguous():
    tokens = np.arange(20_000, dtype=np.int32)
    loader = TrainStreams(tokens, batch_size=2, window=70, variable=True, seed=3)
    # L = 10,000 per stream; (10,000 - 1) // 70 = 142 windows covering 142 * 70 = 9,940 positions every epoch.
    assert len(loader) == 142
    epochs = {}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        bounds = loader.bounds()
        lengths = np.diff(bounds)
        assert len(lengths) == 142 and bounds[0] == 0 and bounds[-1] == 9_940 and lengths.min() >= 1
        assert len(set(lengths.tolist())) > 10  # lengths really vary
        batches = list(loader)
        assert [b[0].shape[1] for b in batches] == lengths.tolist()
        assert torch.equal(torch.cat([b[0] for b in batches], 1)[0], torch.arange(9_940))  # stream 0, no gap
        assert torch.equal(torch.cat([b[1] for b in batches], 1)[1], torch.arange(10_001, 19_941))
        epochs[epoch] = lengths
    assert not np.array_equal(epochs[0], epochs[1])  # the boundaries move each epoch
    again = TrainStreams(tokens, batch_size=2, window=70, variable=True, seed=3)
    again.set_epoch(1)
    assert np.array_equal(np.diff(again.bounds()), epochs[1])  # a function of (seed, epoch)
    other_seed = TrainStreams(tokens, batch_size=2, window=70, variable=True, seed=4)
    assert not np.array_equal(np.diff(other_seed.bounds()), epochs[0])
    # Ranks share the lengths (same shapes in lockstep) but not the streams.
    rank1 = TrainStreams(tokens, batch_size=1, window=70, variable=True, seed=3, rank=1, world_size=2)
    assert np.array_equal(np.diff(rank1.bounds()), epochs[0])


@pytest.mark.parametrize("variable", [False, True])
def test_resume_by_skipping_equals_uninterrupted(variable):
    tokens = np.arange(5_000, dtype=np.int32)
    full = TrainStreams(tokens, batch_size=3, window=12, variable=variable, seed=1)
    full.set_epoch(2)
    uninterrupted = list(full)
    resumed = TrainStreams(tokens, batch_size=3, window=12, variable=variable, seed=1)
    resumed.set_epoch(2)  # what the trainer does: set_epoch, iterate, next() the batches already done
    batches = iter(resumed)
    for _ in range(40):
        next(batches)
    rest = list(batches)
    assert len(rest) == len(uninterrupted) - 40 == len(resumed) - 40
    for (a, b), (c, d) in zip(rest, uninterrupted[40:]):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_windows_that_do_not_fit_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^the BPTT window must be at least 1 token, got 0 ; fix: "):
        TrainStreams(np.arange(100), batch_size=2, window=0)
    # 100 tokens over 8 x 2 = 16 streams: 6 each, fewer than window + 1 = 21. The largest batch at window 20 is
    # 100 // (2 * 21) = 2; the largest window at batch 8 is 6 - 1 = 5.
    with pytest.raises(ValueError) as err:
        TrainStreams(np.arange(100), batch_size=8, window=20, world_size=2)
    assert str(err.value) == ("the train stream of 100 tokens is too short for 16 streams (batch_size 8 x 2 "
                              "processes) of window + 1 = 21 tokens: each gets 6 ; fix: batch_size <= 2 at window "
                              "20 or window <= 5 at batch_size 8")
    with pytest.raises(ValueError, match="each gets 1 ; fix: batch_size <= 1 at window 1$"):
        TrainStreams(np.arange(3), batch_size=2, window=1)
    TrainStreams(np.arange(42), batch_size=2, window=20)  # 21 tokens per stream: exactly fits, one window
    with pytest.raises(ValueError, match="^the BPTT window must be at least 1"):
        EvalStream(np.arange(100), window=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        EvalStream(np.arange(1), window=4)


def test_eval_stream_is_one_sequence_with_len_minus_one_predictions():
    tokens = np.arange(101, dtype=np.int32)
    stream = EvalStream(tokens, window=30)
    # 100 predictions in windows of 30, 30, 30 and 10.
    assert (stream.predictions, stream.dataset_size, len(stream)) == (100, 101, 4)
    batches = list(stream)
    assert [inputs.shape for inputs, _ in batches] == [(1, 30), (1, 30), (1, 30), (1, 10)]
    assert torch.equal(torch.cat([i for i, _ in batches], 1)[0], torch.arange(100))  # the first token is context
    assert torch.equal(torch.cat([t for _, t in batches], 1)[0], torch.arange(1, 101))
    assert all(i.dtype == torch.int64 for i, _ in batches)
    # A window that divides the predictions exactly: 100 / 25 = 4 windows; one window of everything.
    assert len(EvalStream(tokens, 25)) == 4 and [i.shape[1] for i, _ in EvalStream(tokens, 25)] == [25] * 4
    assert len(EvalStream(tokens, 1000)) == 1


def test_streams_are_views_of_a_memory_mapped_corpus(tmp_path):
    """The cached corpus arrays are read-only int32 memory maps: batching cuts views, never a copy of the stream."""
    np.save(tmp_path / "ids.npy", np.arange(T, dtype=np.int32))
    ids = np.load(tmp_path / "ids.npy", mmap_mode="r")
    loader = TrainStreams(ids, batch_size=4, window=10)
    assert np.shares_memory(loader.streams, ids)
    inputs, targets = next(iter(loader))
    assert inputs.dtype == torch.int64 and inputs[:, 0].tolist() == [0, 250, 500, 750]
    inputs, targets = next(iter(EvalStream(ids, window=10)))
    assert inputs.tolist() == [list(range(10))] and targets.tolist() == [list(range(1, 11))]
