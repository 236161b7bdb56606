"""Pieces shared by the language models: the LM contract's base class, the output layers that own the token
table (full softmax, adaptive softmax), sequence dropout.

Every LM here is a :class:`LanguageModel`::

    forward(tokens [B, T], state=None, targets=None) -> (out, state)
      targets None: log-probabilities of the full next-token distribution, [B, T, V]
      targets:      per-token negative log-likelihood, [B, T] float32, computed the cheap way
    initial_state(batch_size, device) -> state     (same effect as state=None; a pytree of tensors)

The returned state is never detached here (the trainer detaches it between windows).

The output layer owns the table and the input side reads its weights functionally (``F.embedding(tokens,
decoder.weight)``, never a shared Parameter object), so a pruning mask or weight quantizer registered on the
output layer's weight with :mod:`torch.nn.utils.parametrize` applies to both uses. An output layer has three
methods: ``embed(tokens)`` (the tied input vectors), ``log_prob(hidden)`` and ``nll(hidden, targets)``.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

#: A stream's state: nested tuples of tensors (LSTM (h, c) per layer; attention keys and values per layer).
State = Any


class LanguageModel(nn.Module, metaclass=ABCMeta):
    """Base of the LMs: embeds tokens (tied through ``decoder`` unless ``embedding`` is an untied
    ``nn.Embedding``), runs the subclass's :meth:`encode` on the vectors and the state, and predicts with
    ``decoder``. A subclass sets ``embedding`` first and ``decoder`` last, so that modules register in data-flow
    order (compress/ takes the first and last registered linear layers for the input and output layers)."""

    embedding: nn.Embedding | None
    decoder: LinearSoftmax | AdaptiveSoftmax

    @abstractmethod
    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """The state at the start of ``batch_size`` streams (zero LSTM state / empty memory)."""

    @abstractmethod
    def encode(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Input vectors ``[B, T, E]`` and the state → the output layer's input ``[B, T, D]`` and the new state."""

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed(tokens) if self.embedding is None else self.embedding(tokens)

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        if tokens.dim() != 2 or tokens.dtype != torch.long or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a LongTensor [batch, time] with time >= 1, got {tokens.dtype} "
                             f"{list(tokens.shape)} ; fix: pass token ids shaped [batch, time]")
        if targets is not None and (targets.shape != tokens.shape or targets.dtype != torch.long):
            raise ValueError(f"targets must be a LongTensor shaped like tokens {list(tokens.shape)}, got "
                             f"{targets.dtype} {list(targets.shape)} ; fix: pass the next token of each position")
        if state is None:
            state = self.initial_state(tokens.shape[0], tokens.device)
        # One evaluation of each parametrized weight per call: the tied table is read twice (lookup and
        # softmax) and a recurrent matrix once per time step; masks and quantizers then run once per window.
        with parametrize.cached():
            hidden, state = self.encode(self.embed(tokens), state)
            out = self.decoder.log_prob(hidden) if targets is None else self.decoder.nll(hidden, targets)
        return out, state


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last dim in at least float32 (under autocast the logits may come out narrower)."""
    narrow = logits.dtype in (torch.float16, torch.bfloat16)
    return F.log_softmax(logits, dim=-1, dtype=torch.float32 if narrow else None)


class LinearSoftmax(nn.Linear):
    """Full softmax: an ``nn.Linear`` (``in_features`` → V) whose weight rows are also the tied token table."""

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)

    def log_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        return log_softmax(self(hidden))

    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(hidden)
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape).float()


class AdaptiveSoftmax(nn.Module):
    """Adaptive softmax (Grave et al. 2017) with the tied adaptive input of Baevski & Auli (2019).

    The vocabulary (frequency-sorted ids) splits at ``cutoffs`` into a head (the shortlist ``[0, cutoffs[0])``)
    and tail clusters. Cluster k has width ``widths[k]``: a projection ``projections[k]`` (``in_features`` →
    width, ``nn.Identity`` when the width is ``in_features``) and an output layer ``clusters[k]`` (width →
    its tokens; the head's also scores each tail cluster, so it has ``cutoffs[0] + len(cutoffs)`` outputs).
    log p(w) = log p_head(w) for a shortlist word, log p_head(cluster k) + log p_k(w) for a word of cluster k.

    Tied adaptive input: a token of cluster k is the row of ``clusters[k].weight`` (its width) mapped to
    ``in_features`` by the transpose of ``projections[k].weight``; only the tokens of a cluster are projected
    by it, so per-token counting charges each tail projection by its cluster's frequency.

    Not ``nn.AdaptiveLogSoftmaxWithLoss``: its tail widths are ``in_features // div_value**k`` (the 2019
    winner's 256/64/4 is not such a sequence), its head has no projection, and it has no tied input side.
    A cluster's members are found by ``nonzero`` and written back by index assignment, as there.
    """

    def __init__(self, in_features: int, num_classes: int, cutoffs: Sequence[int],
                 widths: Sequence[int] | None = None, *, div_value: float = 4.0, bias: bool = True) -> None:
        super().__init__()
        cutoffs = list(cutoffs)
        bounds = [0, *cutoffs, num_classes]
        if not cutoffs or any(not isinstance(c, int) or isinstance(c, bool) for c in cutoffs) or \
                any(lo >= hi for lo, hi in zip(bounds, bounds[1:])):
            raise ValueError(f"adaptive softmax cutoffs {cutoffs} must be one or more integers increasing strictly "
                             f"inside (0, {num_classes}) ; fix: pass cutoffs below the vocabulary size "
                             f"{num_classes} (or none at all for a full softmax)")
        if widths is None:
            widths = [max(1, int(in_features // div_value ** k)) for k in range(len(bounds) - 1)]
        widths = list(widths)
        if len(widths) != len(bounds) - 1 or any(not isinstance(w, int) or isinstance(w, bool) or w < 1
                                                 for w in widths):
            raise ValueError(f"adaptive softmax widths {widths} must be {len(bounds) - 1} positive integers (head "
                             f"and one per tail cluster) ; fix: pass one width per cluster, or widths=null")
        self.in_features, self.num_classes = in_features, num_classes
        self.cutoffs, self.widths, self.bounds = tuple(cutoffs), tuple(widths), tuple(bounds)
        sizes = [cutoffs[0] + len(cutoffs)] + [hi - lo for lo, hi in zip(bounds[1:], bounds[2:])]
        self.projections = nn.ModuleList(
            nn.Identity() if w == in_features else nn.Linear(in_features, w, bias=False) for w in widths)
        self.clusters = nn.ModuleList(nn.Linear(w, size, bias=bias) for w, size in zip(widths, sizes))

    def _cluster_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """The cluster (0 = head) of each token id."""
        ids = (tokens >= self.cutoffs[0]).long()
        for cutoff in self.cutoffs[1:]:
            ids = ids + (tokens >= cutoff)
        return ids

    def _cluster_log_prob(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        return log_softmax(self.clusters[k](self.projections[k](hidden)))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        ids = self._cluster_ids(flat)
        out = None
        for k, (cluster, projection) in enumerate(zip(self.clusters, self.projections)):
            rows = (ids == k).nonzero().squeeze(1)
            if not rows.numel():
                continue
            # The head's table is its whole weight: shortlist ids never reach its cluster-score rows.
            lookup = F.embedding(flat[rows] - self.bounds[k] if k else flat[rows], cluster.weight)
            if isinstance(projection, nn.Linear):
                lookup = F.linear(lookup, projection.weight.t())
            if out is None:  # a fresh buffer (under autocast a projected cluster may come out narrower)
                out = torch.empty(flat.numel(), self.in_features, dtype=lookup.dtype, device=lookup.device)
            out[rows] = lookup.to(out.dtype)
        return out.view(*tokens.shape, self.in_features)

    def log_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full distribution: the head and every tail cluster for every position."""
        head = self._cluster_log_prob(0, hidden)
        shortlist = self.cutoffs[0]
        parts = [head[..., :shortlist]]
        for k in range(1, len(self.clusters)):
            parts.append(self._cluster_log_prob(k, hidden) + head[..., shortlist + k - 1:shortlist + k])
        return torch.cat(parts, dim=-1)

    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-log p(target): the head for every position, a tail cluster only for the positions it holds."""
        flat_hidden, flat = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        head = self._cluster_log_prob(0, flat_hidden)
        ids = self._cluster_ids(flat)
        # A shortlist word's own head score, or the head's score of the word's cluster.
        log_p = head.gather(1, torch.where(ids == 0, flat, self.cutoffs[0] - 1 + ids)[:, None]).squeeze(1)
        for k in range(1, len(self.clusters)):
            # Also when no target is in the cluster (0 rows, no work): every parameter stays in the graph, as
            # DistributedDataParallel expects of each step.
            rows = (ids == k).nonzero().squeeze(1)
            tail = self._cluster_log_prob(k, flat_hidden[rows])
            log_p = log_p.index_add(0, rows, tail.gather(1, (flat[rows] - self.bounds[k])[:, None]).squeeze(1))
        return -log_p.view(targets.shape).float()


class SequenceDropout(nn.Module):
    """Dropout on ``[B, T, D]`` activations; ``variational`` drops the same units at every time step of a
    window (Gal & Ghahramani 2016, the locked dropout of AWD-LSTM). No op at all in eval mode."""

    def __init__(self, p: float, variational: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} is outside [0, 1) ; fix: pass a probability such as 0.1")
        self.p, self.variational = p, variational

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.variational:
            return F.dropout(x, self.p, training=True)
        mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1.0 - self.p) / (1.0 - self.p)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}, variational={self.variational}"
