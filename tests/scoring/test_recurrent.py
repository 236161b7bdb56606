"""Recurrent cells counted by hand: LSTM, GRU and Elman cells on every kernel path they take, sparse gate rows,
projections, a QRNN written from standard ops, and the flavours the scorer refuses.

Counts are per step at 32 bits (``freebie=False``); E is the input size, H the hidden size. The LSTM table is
the rules doc's; the GRU table is the project rule derived the same way (scoring/rules.py, ``_GRU``).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn

from scoring import RULES, UnsupportedOpError, count_model
from scoring.counter import count_stream, recurrences
from scoring.oplist import Recurrent, count_oplist

aten = torch.ops.aten
E, H = 3, 4

# LSTM cell, E = 3, H = 4, one step (4H = 16 gate rows):
#   gate dot products over [x; h]: 16 rows × (E + H = 7) = 112 mults, 16 × 6 = 96 adds, + 16 bias adds
#   3H sigmoids: 12 × (2 mults + 1 add) = 24 mults, 12 adds;  2H tanh: 8 mults
#   c' = f·c + i·g, h' = o·tanh(c'): 3H = 12 mults, H = 4 adds
#   = 112 + 24 + 8 + 12 = 156 mults, 96 + 16 + 12 + 4 = 128 adds
#   stored: W_ih 16×3 + W_hh 16×4 + one bias of 16 (b_ih + b_hh summed) = 128 params
LSTM_STEP = (156, 128, 128)
# GRU cell, E = 3, H = 4 (3H = 12 gate rows):
#   r, z rows (8) merge input and recurrent products: 8 × 7 = 56 mults, 8 × (6 + 1 bias) = 56 adds
#   candidate rows (4): W_in x + b_in: 12 mults, 4 × (2 + 1) = 12 adds; W_hn h + b_hn: 16 mults, 4 × (3 + 1) = 16 adds
#   2H sigmoids: 16 mults, 8 adds; H tanh: 4 mults; r·(W_hn h + b_hn) and z·(h - n): 8 mults;
#   + joining the candidate's parts and n + z·(h - n): 8 adds; h - n: 4 adds
#   = 56 + 12 + 16 + 16 + 4 + 8 = 112 mults, 56 + 12 + 16 + 8 + 8 + 4 = 104 adds
#   stored: W_ih 12×3 + W_hh 12×4 + biases 8 (r, z summed) + 4 + 4 (the candidate's two) = 100 params
GRU_STEP = (112, 104, 100)
# Elman RNN, E = 3, H = 4: 4 rows × 7 = 28 mults, 4 × (6 + 1) = 28 adds; tanh (or ReLU) 4 mults; 12 + 16 + 4 params
RNN_STEP = (32, 28, 32)


def _counts(count) -> tuple:
    return count.mults, count.adds, count.params


class LinearLSTMCell(nn.Module):
    """An LSTM cell built from nn.Linear (the models contract): input matrix with the bias, recurrent without."""

    def __init__(self, lstm: nn.LSTMCell):
        super().__init__()
        self.ih, self.hh = nn.Linear(E, 4 * H), nn.Linear(H, 4 * H, bias=False)
        with torch.no_grad():
            self.ih.weight.copy_(lstm.weight_ih)
            self.hh.weight.copy_(lstm.weight_hh)
            self.ih.bias.copy_(lstm.bias_ih + lstm.bias_hh)

    def forward(self, x, state):
        h, c = state
        i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class Online(nn.Module):
    """A one-token-per-call model (the language-model contract): token -> embedding (free, 10 × E stored) -> one
    step of ``step(x, state)``. ``lstm``: the state is (h, c)."""

    def __init__(self, step: Callable, lstm: bool = True, device: str = "cpu", **modules: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(10, E, device=device)
        self.parts = nn.ModuleDict(modules)
        self.step, self.lstm = step, lstm

    def initial_state(self, batch_size, device):
        zeros = torch.zeros(1, batch_size, H, device=device)
        return (zeros, zeros) if self.lstm else zeros

    def forward(self, tokens, state):
        return self.step(self.parts, self.embed(tokens).transpose(0, 1), state)  # x: [1 step, batch, E]


def _weights(rnn: nn.Module) -> list[torch.Tensor]:
    return [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]


def _cell_step(parts, x, state):
    h, c = parts["cell"](x[0], (state[0][0], state[1][0]))
    return h, (h[None], c[None])


def _mkldnn_step(parts, x, state):
    h, c = state
    out, h, c, _ = aten.mkldnn_rnn_layer(x, *_weights(parts["rnn"]), h[0], c[0], False, [], 2, H, 1, True, False,
                                         False, False)
    return out, (h[None], c[None])


def _cudnn_step(mode: int) -> Callable:
    def step(parts, x, state):
        h, c = state if mode == 2 else (state, None)
        out, h, c, *_ = aten._cudnn_rnn(x, _weights(parts["rnn"]), 4, None, h, c, mode, H, 0, 1, False, 0.0, False,
                                        False, [], None)
        return out, ((h, c) if mode == 2 else h)
    return step


def _miopen_step(parts, x, state):
    h, c = state
    out, h, c, *_ = aten.miopen_rnn(x, _weights(parts["rnn"]), 4, h, c, 2, H, 1, False, 0.0, False, False, [], None)
    return out, (h, c)


def _fused_step(parts, x, state):  # what LSTMCell runs on CUDA: two matmuls, then the fused kernel
    w = _weights(parts["rnn"])
    gates_x, gates_h = torch.mm(x[0], w[0].t()), torch.mm(state[0][0], w[1].t())
    h, c, _ = aten._thnn_fused_lstm_cell(gates_x, gates_h, state[1][0], w[2], w[3])
    return h, (h[None], c[None])


# Every way an LSTM step can execute on CPU, and the CUDA kernels on meta tensors (only their shapes are read).
LSTM_PATHS = {
    "nn.LSTM (torch.lstm, oneDNN kernel)": lambda: Online(lambda p, x, s: p["rnn"](x, s), rnn=nn.LSTM(E, H)),
    "nn.LSTMCell (torch.lstm_cell)": lambda: Online(_cell_step, cell=nn.LSTMCell(E, H)),
    "cell built from nn.Linear": lambda: Online(_cell_step, cell=LinearLSTMCell(nn.LSTMCell(E, H))),
    "aten.mkldnn_rnn_layer": lambda: Online(_mkldnn_step, rnn=nn.LSTM(E, H)),
    "aten._cudnn_rnn (meta)": lambda: Online(_cudnn_step(2), device="meta", rnn=nn.LSTM(E, H, device="meta")),
    "aten.miopen_rnn (meta)": lambda: Online(_miopen_step, device="meta", rnn=nn.LSTM(E, H, device="meta")),
    "aten._thnn_fused_lstm_cell (meta)": lambda: Online(_fused_step, device="meta", rnn=nn.LSTM(E, H, device="meta")),
}


@pytest.mark.parametrize("path", LSTM_PATHS)
def test_an_lstm_step_counts_the_rules_table_on_every_kernel_path(path):
    # 3 tokens, the first one warm-up; the embedding lookup is free and stores 10 × 3 = 30 params
    count = count_stream(LSTM_PATHS[path](), torch.tensor([1, 5, 7]), warmup_tokens=1, freebie=False)
    assert (count.examples, count.mults, count.adds, count.params) == (2, *LSTM_STEP[:2], LSTM_STEP[2] + 30)


def test_the_op_list_counts_the_lstm_and_gru_tables():
    for cell, expected in (("lstm", LSTM_STEP), ("gru", GRU_STEP), ("rnn_tanh", RNN_STEP)):
        count = count_oplist([Recurrent(cell=cell, input_size=E, hidden_size=H)])
        assert (count.mults, count.adds, count.params) == expected, cell


class LinearGRUCell(nn.Module):
    """A GRU cell from nn.Linear: r, z from one biased input matrix and an unbiased recurrent one; the candidate's
    recurrent part keeps its own bias (it is multiplied by r before it meets the input part)."""

    def __init__(self):
        super().__init__()
        self.ih, self.hh_rz, self.hh_n = nn.Linear(E, 3 * H), nn.Linear(H, 2 * H, bias=False), nn.Linear(H, H)

    def forward(self, x, h):
        x_r, x_z, x_n = self.ih(x).unsafe_chunk(3, -1)  # as torch's own decomposition splits: data movement
        h_r, h_z = self.hh_rz(h).chunk(2, -1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * self.hh_n(h))
        return n + z * (h - n)


def _gru_cell_step(parts, x, state):
    h = parts["cell"](x[0], state[0])
    return h, h[None]


GRU_PATHS = {
    "nn.GRU (torch.gru)": lambda: Online(lambda p, x, s: p["rnn"](x, s), lstm=False, rnn=nn.GRU(E, H)),
    "nn.GRUCell (torch.gru_cell)": lambda: Online(_gru_cell_step, lstm=False, cell=nn.GRUCell(E, H)),
    "cell built from nn.Linear": lambda: Online(_gru_cell_step, lstm=False, cell=LinearGRUCell()),
    "aten._cudnn_rnn mode 3 (meta)": lambda: Online(_cudnn_step(3), lstm=False, device="meta",
                                                    rnn=nn.GRU(E, H, device="meta")),
}


@pytest.mark.parametrize("path", GRU_PATHS)
def test_a_gru_step_counts_the_project_table_on_every_kernel_path(path):
    count = count_stream(GRU_PATHS[path](), torch.tensor([1, 5, 7]), warmup_tokens=1, freebie=False)
    assert (count.examples, count.mults, count.adds, count.params) == (2, *GRU_STEP[:2], GRU_STEP[2] + 30)


def test_the_fused_gru_cell_reads_its_arguments_as_the_gru_rule():
    # _thnn_fused_gru_cell has neither a CPU nor a meta kernel: its argument reading is checked directly. Gates of
    # 2 sequences × 3H = 12: 2 steps of a 4-unit GRU cell with both biases.
    gates = torch.zeros(2, 12)
    (rec,) = recurrences("_thnn_fused_gru_cell", RULES["_thnn_fused_gru_cell"],
                         {"input_gates": gates, "hidden_gates": gates, "hx": torch.zeros(2, 4),
                          "input_bias": torch.zeros(12), "hidden_bias": torch.zeros(12)})
    assert (rec.hidden, rec.steps, rec.cell.gates, rec.cell.merged, rec.w_ih) == (4, 2, 3, 2, None)


@pytest.mark.parametrize("module, expected", [
    (nn.RNN(E, H), RNN_STEP), (nn.RNNCell(E, H), RNN_STEP),
    (nn.RNN(E, H, nonlinearity="relu"), RNN_STEP), (nn.RNNCell(E, H, nonlinearity="relu"), RNN_STEP),
])
def test_elman_rnns_count_one_gate_row_per_unit(module, expected):
    shape = (1, 1, E) if isinstance(module, nn.RNN) else (1, E)
    count = count_model(module, torch.randn(*shape), freebie=False)
    assert _counts(count) == expected
    assert ("rnn_relu" if module.nonlinearity == "relu" else "rnn_tanh") in "".join(count.project_rules)


def test_every_step_of_a_sequence_is_counted_and_averaged_per_example():
    # nn.LSTM on a [T = 5, batch 1, E] input: 5 steps; count_model's examples are the first dim (T): per step
    count = count_model(nn.LSTM(E, H), torch.randn(5, 1, E), freebie=False)
    assert (count.examples, *_counts(count)) == (5, *LSTM_STEP)
    # batch-first, 2 sequences of 5: 10 steps over 2 examples
    count = count_model(nn.LSTM(E, H, batch_first=True), torch.randn(2, 5, E), freebie=False)
    assert (count.mults, count.adds) == (5 * LSTM_STEP[0], 5 * LSTM_STEP[1])


def test_a_packed_sequence_counts_the_steps_it_holds():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(E, H, batch_first=True)

        def forward(self, x):  # two sequences of lengths 3 and 2 (torch.lstm's data overload)
            packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 2]), batch_first=True)
            return self.lstm(packed)[0].data

    count = count_model(Packed(), torch.randn(2, 3, E), freebie=False)
    # 5 steps over the 2 sequences (count_model's examples): 2.5 LSTM steps per example
    assert (count.mults, count.adds) == (2.5 * LSTM_STEP[0], 2.5 * LSTM_STEP[1])


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_stacked_bidirectional_lstm_with_projection_hand_count():
    # nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2), one step. R = 2 (the projection).
    # layer 1, each direction: 16 rows × (3 + 2) = 80 mults, 16 × (4 + 1) = 80 adds; cell 44 mults, 16 adds;
    #   projection h = W_hr·(o·tanh c): 2 rows × 4 = 8 mults, 2 × 3 = 6 adds  => 132 mults, 102 adds
    # layer 2 reads both directions (2 × 2 = 4 inputs): 16 × (4 + 2) = 96 mults, 16 × (5 + 1) = 96 adds;
    #   cell 44, 16; projection 8, 6  => 148 mults, 118 adds
    # two directions each: 2 × (132 + 148) = 560 mults, 2 × (102 + 118) = 440 adds
    # stored per direction: layer 1 48 + 32 + 16 + 8 = 104; layer 2 64 + 32 + 16 + 8 = 120 => 448 params
    count = count_model(nn.LSTM(E, H, num_layers=2, bidirectional=True, proj_size=2), torch.randn(1, 1, E),
                        freebie=False)
    assert _counts(count) == (560, 440, 448)
    oplist = count_oplist([Recurrent(cell="lstm", input_size=E, hidden_size=H, proj_size=2),
                           Recurrent(cell="lstm", input_size=4, hidden_size=H, proj_size=2)])
    assert (2 * oplist.mults, 2 * oplist.adds, 2 * oplist.params) == (560, 440, 448)


def test_pruned_gate_rows_count_their_own_nonzeros_and_an_empty_row_is_its_bias():
    lstm = nn.LSTM(E, H)
    with torch.no_grad():
        for weight in (lstm.weight_ih_l0, lstm.weight_hh_l0):
            weight[weight == 0] = 0.5
        lstm.weight_ih_l0[0] = 0  # gate row 0: no input weights, 4 recurrent ones left: L = 4
        lstm.weight_ih_l0[1] = 0
        lstm.weight_hh_l0[1] = 0  # gate row 1: no weights at all: its pre-activation is the constant bias
        lstm.weight_hh_l0[2, :2] = 0  # gate row 2: 3 + 2 = 5 weights
    count = count_model(lstm, torch.randn(1, 1, E), freebie=False)
    # nonzeros: 112 - 3 - 3 - 4 - 2 = 100 dot-product mults; adds per row L - 1 + 1 (bias): rows 3..15 7 each
    # (13 × 7 = 91), row 0 4, row 1 none (the official (0-1) + 1 = 0), row 2 5  => 100 adds;
    # the cell's pointwise ops as before: 44 mults, 16 adds
    assert (count.mults, count.adds) == (100 + 44, 100 + 16)
    # storage: W_ih 42 of 48 nonzero, W_hh 58 of 64: sparse (nonzeros + 1 mask bit each) beats dense; bias 16
    assert count.param_bits == (42 * 32 + 48) + (58 * 32 + 64) + 16 * 32


def test_a_zero_initial_state_still_stores_and_counts_the_recurrent_weights():
    # The issue this guards: a zero state made W_hh·h0 look precomputed, W_hh left out for a one-token input.
    cell = nn.LSTMCell(E, H)
    count = count_model(cell, torch.randn(1, E), freebie=False)  # hx None: torch.zeros inside the module
    assert count.params == 4 * H * E + 4 * H * H + 4 * H
    assert count.mults == LSTM_STEP[0]


class QRNN(nn.Module):
    """A QRNN layer (window 2, fo-pooling) written from standard ops, fed one token at a time.

    z = tanh(W_z [x_{t-1}; x_t]), f = σ(W_f ·), o = σ(W_o ·) as one linear layer 2E -> 3H with a bias;
    c = f·c + (1 - f)·z; h = o·c. State: (previous input, c).
    """

    def __init__(self):
        super().__init__()
        self.gates = nn.Linear(2 * E, 3 * H)

    def initial_state(self, batch_size, device):
        return torch.zeros(batch_size, E, device=device), torch.zeros(batch_size, H, device=device)

    def forward(self, x, state):
        previous, c = state
        x = x.float().expand(1, E) / 10  # the "token" as a feature vector (test input only)
        z, f, o = self.gates(torch.cat([previous, x], -1)).chunk(3, -1)
        f = torch.sigmoid(f)
        c = f * c + (1 - f) * torch.tanh(z)
        return torch.sigmoid(o) * c, (x, c)


def test_a_qrnn_from_standard_ops_counts_its_ops_per_token():
    # per token: the "token to features" expand + divide: E = 3 mults (test scaffolding, index -> float);
    # gates: 12 outputs × L = 6: 72 mults, 12 × 5 + 12 bias = 72 adds; σ(f), σ(o): 8 × (2 + 1); tanh(z) 4;
    # fo-pooling f·c, (1 - f)·z: 8 mults, 1 - f: 4 adds, + : 4 adds; o·c: 4 mults
    # = 3 + 72 + 16 + 4 + 8 + 4 = 107 mults, 72 + 8 + 4 + 4 = 88 adds; stored 12 × 6 + 12 = 84
    count = count_stream(QRNN(), torch.tensor([3, 1, 4, 1, 5]), warmup_tokens=2, freebie=False)
    assert (count.examples, *_counts(count)) == (3, 107, 88, 84)


def test_an_unknown_recurrent_kernel_mode_fails_loudly():
    model = Online(_cudnn_step(7), lstm=False, device="meta", rnn=nn.GRU(E, H, device="meta"))
    with pytest.raises(UnsupportedOpError, match=r"aten\._cudnn_rnn runs a recurrent cell of mode 7"):
        count_stream(model, torch.tensor([1]))


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_a_dynamically_quantized_lstm_fails_loudly():
    # torch.ao's int8 LSTM runs its own packed kernels: no rule declares their widths, so the scorer refuses
    from torch.ao.nn.quantized.dynamic import LSTM as QuantizedLSTM
    with pytest.raises(UnsupportedOpError, match=r"aten\.quantized_lstm \(in layer '\(model\)', LSTM\) has no"):
        count_model(QuantizedLSTM(E, H), torch.randn(1, 1, E))


def test_recurrent_rules_are_listed_in_the_report():
    count = count_model(nn.GRU(E, H), torch.randn(1, 1, E))
    assert "one stored bias per gate row" in count.project_rules["gru"]
    # the project rows its cell counts through (sigmoid, mul, add are official) and the state convention
    assert {"tanh", "sub", "recurrent state"} <= set(count.project_rules)
