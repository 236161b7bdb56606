"""LSTM language models: the WikiText-103 baseline of the challenge and a small adaptive-softmax LSTM.

The cell is built from two ``nn.Linear`` per layer (not ``nn.LSTM``), so compress/ reaches every LSTM matrix
(pruning, weight quantization) and quantizes the recurrent input ``h`` through the recurrent layer's input
quantizer, and the scorer sees each dot product as a linear layer.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .lm_blocks import AdaptiveSoftmax, LanguageModel, LinearSoftmax, SequenceDropout, State
from .registry import register_model


class LSTMLayer(nn.Module):
    """One LSTM layer: gates = ``input(x_t) + recurrent(h_{t-1})``, gate order **i, f, o, g** along the 4H rows.

    ``input`` (E → 4H) holds the one stored bias; ``recurrent`` (H → 4H) has none (the two biases of
    ``nn.LSTM`` add up to one). i, f, o = sigmoid, g = tanh (the order puts the three sigmoids in one
    contiguous slice); c' = f·c + i·g, h' = o·tanh(c'). The input projections of a whole window are one
    matmul; only the recurrence runs per time step. Initialised like ``nn.LSTM``: U(-1/√H, 1/√H).
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input = nn.Linear(input_size, 4 * hidden_size)
        self.recurrent = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        bound = 1.0 / math.sqrt(hidden_size)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x [B, T, E]``, ``(h, c)`` each ``[B, H]`` → outputs ``[B, T, H]`` and the last ``(h, c)``."""
        h, c = state
        rows = (3 * self.hidden_size, self.hidden_size)
        outputs = []
        # unbind/split, not indexing: their backward is one stack/cat, not a zero-filled full-size gradient
        # per time step.
        for projected in self.input(x).unbind(1):
            sigmoid_gates, cell_gate = (projected + self.recurrent(h)).split(rows, dim=1)
            i, f, o = torch.sigmoid(sigmoid_gates).chunk(3, dim=1)
            c = f * c + i * torch.tanh(cell_gate)
            h = o * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h, c)


class LSTMLanguageModel(LanguageModel):
    """Embedding → ``num_layers`` LSTM layers → optional projection → softmax (full or adaptive).

    The state is a tuple with one ``(h, c)`` pair per layer, each ``[B, hidden_size]``. Dropout (all off in
    eval mode): ``emb_dropout`` on the embeddings, ``dropout`` between LSTM layers, ``out_dropout`` on the last
    layer's output; ``variational`` uses one mask per window for all three.
    """

    def __init__(self, num_classes: int, embed_dim: int, hidden_size: int, *, num_layers: int = 1,
                 output_proj: int | None = None, tie_weights: bool = True, cutoffs: Sequence[int] | None = None,
                 widths: Sequence[int] | None = None, div_value: float = 4.0, output_bias: bool = True,
                 emb_dropout: float = 0.0, dropout: float = 0.0, out_dropout: float = 0.0,
                 variational: bool = False) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} ; fix: use at least 1 LSTM layer")
        features = output_proj or hidden_size  # the softmax's input width
        if tie_weights and features != embed_dim:
            raise ValueError(f"tied embeddings need the softmax input width ({features}) to equal embed_dim "
                             f"({embed_dim}) ; fix: set output_proj={embed_dim}, or tie_weights=false")
        super().__init__()
        self.embedding = None if tie_weights else nn.Embedding(num_classes, embed_dim)
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.emb_dropout = SequenceDropout(emb_dropout, variational)
        self.layers = nn.ModuleList(
            LSTMLayer(embed_dim if i == 0 else hidden_size, hidden_size) for i in range(num_layers))
        self.layer_dropout = SequenceDropout(dropout, variational)
        self.out_dropout = SequenceDropout(out_dropout, variational)
        self.projection = nn.Linear(hidden_size, output_proj, bias=False) if output_proj else None
        self.decoder = (AdaptiveSoftmax(features, num_classes, cutoffs, widths, div_value=div_value, bias=output_bias)
                        if cutoffs else LinearSoftmax(features, num_classes, bias=output_bias))

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        dtype = self.layers[0].recurrent.weight.dtype
        return tuple((torch.zeros(batch_size, self.hidden_size, dtype=dtype, device=device),
                      torch.zeros(batch_size, self.hidden_size, dtype=dtype, device=device))
                     for _ in range(self.num_layers))

    def _check_state(self, state: State, batch_size: int) -> None:
        expected = (batch_size, self.hidden_size)
        if not isinstance(state, (tuple, list)) or len(state) != self.num_layers or any(
                not isinstance(pair, (tuple, list)) or len(pair) != 2
                or any(not isinstance(t, torch.Tensor) or tuple(t.shape) != expected for t in pair)
                for pair in state):
            raise ValueError(f"state must be {self.num_layers} (h, c) pairs of shape {list(expected)} ; fix: pass "
                             "None, initial_state(batch_size, device) or the state the previous call returned")

    def encode(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        self._check_state(state, x.shape[0])
        x = self.emb_dropout(x)
        new_state = []
        for i, (layer, layer_state) in enumerate(zip(self.layers, state)):
            if i:
                x = self.layer_dropout(x)
            x, layer_state = layer(x, layer_state)
            new_state.append(layer_state)
        x = self.out_dropout(x)
        return (x if self.projection is None else self.projection(x)), tuple(new_state)


@register_model
def lstm_lm_baseline(num_classes: int = 267_735, embed_dim: int = 512, hidden_size: int = 2048,
                     output_proj: int | None = 512, **kwargs) -> LSTMLanguageModel:
    """The challenge's WikiText-103 baseline: embedding V×512 tied with the softmax, 1-layer LSTM 512→2048
    (the recurrence on the 2048-d h), projection 2048→512 without bias, output layer 512→V with bias
    (159,376,343 parameters at V = 267,735). ``kwargs`` go to :class:`LSTMLanguageModel` (dropout, ...)."""
    return LSTMLanguageModel(num_classes, embed_dim, hidden_size, output_proj=output_proj, **kwargs)


@register_model
def lstm_lm(num_classes: int, embed_dim: int = 128, hidden_size: int = 128, num_layers: int = 1,
            cutoffs: Sequence[int] | None = (1_000, 5_000), widths: Sequence[int] | None = None,
            **kwargs) -> LSTMLanguageModel:
    """A small LSTM with a tied adaptive input and adaptive softmax (widths 128 / 32 / 8) for the embedded
    Wikipedia demo (a 10-30k vocabulary; ids 0-999 cover ~70% of its tokens). Sized for the time budget: on the
    shared 2-core CPU it trains at ~4-8k tokens/s, about one epoch of 0.45M tokens a minute, where 256 units
    reach half an epoch and a higher perplexity. ``kwargs`` go to :class:`LSTMLanguageModel`."""
    return LSTMLanguageModel(num_classes, embed_dim, hidden_size, num_layers=num_layers, cutoffs=cutoffs,
                             widths=widths, **kwargs)
