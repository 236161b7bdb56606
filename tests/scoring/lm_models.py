"""Two language models written to the language-model contract, for the scorer's tests and benchmarks/count_speed.py
until the registered models (models/) replace them.

* :class:`BaselineLM`: the WikiText-103 baseline (a 267,735 × 512 table tied with the softmax, LSTM 512 -> 2048,
  projection 2048 -> 512, output bias), its LSTM either nn.LSTM or the contract's nn.Linear gate matrices.
* :class:`MemoryTransformer`: a Transformer-XL-style decoder fed on-line: a cache of the last ``mem_len`` keys and
  values per layer (the state), a learned relative-position term per head and distance, post-norm blocks, and a
  tied adaptive input and adaptive softmax (the head and every tail cluster every token).

Both: ``forward(tokens [1, 1], state) -> (log_probs [1, 1, V], state)`` and ``initial_state(batch_size, device)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BaselineLM(nn.Module):
    """The WikiText-103 baseline: a ``vocab`` × 512 table tied with the softmax (output bias), an LSTM 512 -> 2048 and
    a projection 2048 -> 512 (no bias). ``cell``: ``"torch"`` (nn.LSTM) or ``"linear"`` (nn.Linear gate matrices: the
    input one with the bias, the recurrent one without)."""

    dim, hidden = 512, 2048

    def __init__(self, cell: str = "torch", vocab: int = 267_735):
        super().__init__()
        self.cell, self.vocab = cell, vocab
        self.decoder = nn.Linear(self.dim, vocab)
        if cell == "torch":
            self.lstm = nn.LSTM(self.dim, self.hidden)
        else:
            self.ih, self.hh = nn.Linear(self.dim, 4 * self.hidden), nn.Linear(self.hidden, 4 * self.hidden, bias=False)
        self.proj = nn.Linear(self.hidden, self.dim, bias=False)

    def initial_state(self, batch_size: int, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(1, batch_size, self.hidden, device=device)
        return zeros, zeros

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        x = F.embedding(tokens, self.decoder.weight).transpose(0, 1)  # [steps, batch, 512]
        if self.cell == "torch":
            out, state = self.lstm(x, state)
        else:
            h, c = state
            i, f, g, o = (self.ih(x) + self.hh(h)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            out = torch.sigmoid(o) * torch.tanh(c)
            state = (out, c)
        return F.log_softmax(self.decoder(self.proj(out.transpose(0, 1))), -1), state


class _Block(nn.Module):
    """Attention over the cached keys and values and the new token's, then a feed-forward layer; post-norm."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn: int, mem_len: int):
        super().__init__()
        self.heads, self.head_dim, self.mem_len = heads, head_dim, mem_len
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.rel = nn.Parameter(torch.randn(mem_len + 1, heads, head_dim) * 0.02)  # distances mem_len .. 0
        self.out = nn.Linear(heads * head_dim, dim, bias=False)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]):
        batch = x.shape[0]
        q, k, v = self.qkv(x).view(batch, 1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        keys = torch.cat([cache[0], k], 2)[:, :, -(self.mem_len + 1):]  # itself and at most mem_len cached
        values = torch.cat([cache[1], v], 2)[:, :, -(self.mem_len + 1):]
        n = keys.shape[2]
        rel = self.rel[-n:].permute(1, 2, 0)  # [heads, head_dim, n]: the distances of the keys read
        scores = (q @ keys.transpose(-1, -2) + q @ rel) * self.head_dim ** -0.5
        attended = (scores.softmax(-1) @ values).transpose(1, 2).reshape(batch, 1, -1)
        x = self.norm1(x + self.out(attended))
        return self.norm2(x + self.ffn(x)), (keys[:, :, -self.mem_len:], values[:, :, -self.mem_len:])


class MemoryTransformer(nn.Module):
    """A Transformer-XL-style language model (the 2019 winner's shape by default: 8 layers, d = 256, 8 heads of 24,
    FFN 768, 96 cached positions, tied adaptive input and softmax with cutoffs 3,500 / 25,000 and widths 256 / 64 / 4).

    Cluster i owns a table (nn.Linear(width_i, size_i): the softmax's output layer) and a projection
    (nn.Linear(dim, width_i)); the input side looks up the table's rows and projects them back with the projection's
    transpose. The head's softmax also scores the two tail clusters (nn.Linear(dim, 2)).
    """

    def __init__(self, vocab: int = 267_735, dim: int = 256, layers: int = 8, heads: int = 8, head_dim: int = 24,
                 ffn: int = 768, mem_len: int = 96, cutoffs: tuple[int, ...] = (3_500, 25_000),
                 widths: tuple[int, ...] = (256, 64, 4)):
        super().__init__()
        self.bounds = (0, *cutoffs, vocab)
        self.heads, self.head_dim = heads, head_dim
        self.tables = nn.ModuleList(nn.Linear(width, high - low, bias=i == 0) for i, (width, low, high)
                                    in enumerate(zip(widths, self.bounds, self.bounds[1:])))
        self.projections = nn.ModuleList(nn.Linear(dim, width, bias=False) for width in widths)
        self.clusters = nn.Linear(dim, len(widths) - 1)
        self.blocks = nn.ModuleList(_Block(dim, heads, head_dim, ffn, mem_len) for _ in range(layers))

    def initial_state(self, batch_size: int, device: torch.device | str | None) -> list[torch.Tensor]:
        empty = torch.zeros(batch_size, self.heads, 0, self.head_dim, device=device)
        return [empty] * (2 * len(self.blocks))

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Adaptive input: each token's cluster table row, projected to ``dim`` (only the tokens of each cluster)."""
        out = torch.zeros(*tokens.shape, self.projections[0].in_features, device=tokens.device)
        for table, projection, low, high in zip(self.tables, self.projections, self.bounds, self.bounds[1:]):
            mask = (tokens >= low) & (tokens < high)
            ids = tokens[mask] - low
            if ids.numel():
                out[mask] = F.embedding(ids, table.weight) @ projection.weight
        return out

    def _log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Adaptive softmax, the full distribution: the head (shortlist + clusters), then every tail cluster."""
        head = F.log_softmax(torch.cat([self.tables[0](self.projections[0](h)), self.clusters(h)], -1), -1)
        shortlist = self.bounds[1]
        parts = [head[..., :shortlist]]
        for i, (table, projection) in enumerate(zip(self.tables[1:], self.projections[1:])):
            parts.append(F.log_softmax(table(projection(h)), -1) + head[..., shortlist + i:shortlist + i + 1])
        return torch.cat(parts, -1)

    def forward(self, tokens: torch.Tensor, state: list[torch.Tensor]):
        x = self._embed(tokens)
        new_state = []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, (state[2 * i], state[2 * i + 1]))
            new_state += cache
        return self._log_probs(x), new_state
